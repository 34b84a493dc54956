"""Start the real `loraplex serve` in a child process on a free port, as a user would.

Every port is the server's own pick (`--port 0`, `--http-port auto`, `--metrics-port auto`), read
back from its log: no port is chosen here and then raced for. The child runs in a process group
of its own; stopping it falls back to killing the group, and an exit hook kills the groups of
children still running when the test process ends (tests/processes.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests import processes

LORAPLEX = [sys.executable, "-m", "server.cli"]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int = 0
    http_port: int = 0  # with --http-port auto (or a number)
    metrics_port: int = 0  # with --metrics-port auto (or a number)
    log: list[str] = field(default_factory=list)  # every stderr line so far
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        """Sends `sig`; after `timeout` seconds kills the process group. Returns the exit code."""
        return processes.stop(self.proc, sig, timeout)

    def output(self) -> str:
        with self._lock:  # the reader thread appends meanwhile
            return "".join(self.log)


def start_server(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
                 launcher: list[str] | None = None) -> ServerProcess:
    """Runs `loraplex serve --port 0 ARGS` (or `launcher --port 0 ARGS`, whose output all goes
    to stderr); returns once it logs "serving on HOST:PORT".

    A thread keeps reading its stderr, so the server never blocks on a full pipe.
    """
    proc = processes.start((launcher or LORAPLEX + ["serve"]) + ["--port", "0", *args], text=True,
                           stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                           env={**os.environ, **(env or {})})
    server = ServerProcess(proc)
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            with server._lock:
                server.log.append(line)
            for pattern, attribute in ((r"http on [\w.:]+:(\d+)", "http_port"),
                                       (r"metrics on :(\d+)/metrics", "metrics_port")):
                match = re.search(pattern, line)
                if match:
                    setattr(server, attribute, int(match[1]))
            match = re.search(r"serving on [\w.]+:(\d+)", line)
            if match:
                server.port = int(match[1])
                ready.set()
        ready.set()  # the process ended

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout) or not server.port:
        processes.kill_group(proc)
        raise AssertionError("server did not start:\n" + server.output())
    return server


@contextmanager
def stopped_cleanly(process: ServerProcess) -> Iterator[ServerProcess]:
    """Yields the server; afterwards it must stop with status 0 and no traceback in its log."""
    yield process
    assert process.stop() == 0, process.output()
    assert "Traceback" not in process.output(), process.output()


def start_demo_http_server(demo_cache: Path, store: Path) -> ServerProcess:
    """The tiny demo with the HTTP API (one thread, unquantized, its own adapter store): what the
    API tests run against."""
    return start_server("--http-port", "auto", "--threads", "1", "--quantize", "none",
                        "--store", str(store), env={"LORAPLEX_CACHE_DIR": str(demo_cache)})


def openai_client(server: ServerProcess, timeout: float, api_key: str = "unused"):
    """The openai SDK on the server's HTTP API, without retries."""
    import openai

    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=api_key, max_retries=0,
                         timeout=timeout)

