"""Child processes of the tests (servers, Prometheus, Envoy, moto): each in a process group of its
own, stopped gently and then killed with its group, and killed at exit if a test left it running.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess

_running: set[subprocess.Popen] = set()


def start(args: list[str], **popen) -> subprocess.Popen:
    """Popen in a new session (its own process group), remembered until stopped."""
    proc = subprocess.Popen(args, start_new_session=True, **popen)
    _running.add(proc)
    return proc


def kill_group(proc: subprocess.Popen) -> int:
    """SIGKILL the child's process group (it and whatever it started); its exit code."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _running.discard(proc)
    return proc.wait()


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Sends `sig`, waits up to `timeout` seconds, then kills the group; the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = kill_group(proc)
    _running.discard(proc)
    return code


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_running):
        kill_group(proc)


def unused_port() -> int:
    """A loopback port nothing listened on a moment ago: for a client that must find no server,
    or a tool that cannot pick its own port (start it with `retrying_on_a_taken_port`, since
    another process may take the port first)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def retrying_on_a_taken_port(launch, attempts: int = 5):
    """`launch(port)` starts a tool on `port` and returns once it answers, or raises
    PortTaken when the port was taken meanwhile; tries other ports."""
    for _ in range(attempts - 1):
        try:
            return launch(unused_port())
        except PortTaken:
            continue
    return launch(unused_port())


class PortTaken(Exception):
    """The tool could not bind the port it was given (another process took it)."""
