"""Start the real `loraplex serve` in a child process on a free port, as a user would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field

LORAPLEX = [sys.executable, "-m", "server.cli"]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int = 0
    log: list[str] = field(default_factory=list)  # every stderr line so far

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def output(self) -> str:
        return "".join(self.log)


def start_server(*args: str, env: dict[str, str] | None = None, timeout: float = 300
                 ) -> ServerProcess:
    """Runs `loraplex serve --port 0 ARGS`; returns once it logs "serving on HOST:PORT".

    A thread keeps reading its stderr, so the server never blocks on a full pipe.
    """
    proc = subprocess.Popen(LORAPLEX + ["serve", "--port", "0", *args], text=True,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    server = ServerProcess(proc)
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            server.log.append(line)
            match = re.search(r"serving on [\w.]+:(\d+)", line)
            if match:
                server.port = int(match[1])
                ready.set()
        ready.set()  # the process ended

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout) or not server.port:
        server.stop(signal.SIGKILL)
        raise AssertionError("server did not start:\n" + server.output())
    return server
