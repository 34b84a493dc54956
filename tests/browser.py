"""Headless Chromium driven by selenium, for the web page's test.

`./dev test` unpacks Debian's chromium and chromium-driver packages (with the libraries this
machine lacks) into the venv, under opt/chromium; a system-wide chromium and chromedriver on
PATH serve as well. Nothing is downloaded here: selenium is given both paths, so its driver
manager never runs.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

UNPACKED = Path(sys.prefix) / "opt" / "chromium"
LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu/pulseaudio")


def chromium(width: int = 1400, height: int = 1000) -> webdriver.Chrome:
    """A headless Chromium window of `width` x `height` CSS pixels."""
    binary, driver, env = _installation()
    options = Options()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver, env=env))


def _installation() -> tuple[str, str, dict[str, str]]:
    binary = UNPACKED / "usr/lib/chromium/chromium"
    if binary.exists():
        libraries = os.pathsep.join(str(UNPACKED / d) for d in LIBRARY_DIRS)
        previous = os.environ.get("LD_LIBRARY_PATH")
        env = {**os.environ, "LD_LIBRARY_PATH": libraries + (os.pathsep + previous if previous else "")}
        return str(binary), str(UNPACKED / "usr/bin/chromedriver"), env
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        raise RuntimeError("no Chromium: run the suite with ./dev test, which fetches Debian's "
                           "chromium and chromium-driver into the venv")
    return binary, driver, dict(os.environ)
