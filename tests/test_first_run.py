"""`./dev serve`, the README's first command, explains itself: it makes an admin token once (in the
demo cache, mode 0600), passes it to the server and says where it is and how to use it, so
`loraplex-client`'s admin commands work on the first try."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.server_process import start_server

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
DEV_SERVE = ["bash", "-c", f'exec "{REPO}/dev" serve "$@" 1>&2', "dev"]  # its notes onto stderr too


def test_dev_serve_makes_an_admin_token_and_the_client_can_use_it(tmp_path):
    env = {"LORAPLEX_VENV": str(VENV), "LORAPLEX_CACHE_DIR": str(tmp_path)}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_ADMIN")}, **env}
    server = start_server("--http-port", "auto", env=env, launcher=DEV_SERVE)
    try:
        token = tmp_path / "demo" / "admin-token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text().strip()) >= 32
        first_token = token.read_text()
        log = server.output()
        assert f"its token is in {token} (mode 0600)" in log
        assert "--admin-token-file" in log and "list" in log
        assert "http://127.0.0.1:8000" not in log  # --http-port given: kept as given
        listed = subprocess.run([sys.executable, "-m", "clients.cli", "--target", server.target,
                                 "--admin-token-file", str(token), "list"], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
    finally:
        server.stop()
    again = start_server("--http-port", "auto", env=env, launcher=DEV_SERVE)
    try:  # the same token on the next run
        assert f"its token is in {token}" in again.output() and token.read_text() == first_token
    finally:
        again.stop()
