"""Screenshots of the web page for the README: the real demo (SmolLM2-135M-Instruct, NF4, the
five trained adapters) after one comparison, as `./dev serve` and a browser show it.

    .venv/bin/python scripts/web_screenshots.py     # writes docs/web-page.png, docs/web-admin.png

It starts `loraplex serve --demo smollm2` with an admin token and HTTP on free ports, opens the
page in headless Chromium (tests/browser.py: what `./dev test` unpacked into the venv), asks the
README's first question of the base model and every adapter at once (greedy, 64 tokens), waits
for every answer, and saves the page; then enters the admin token and pins one adapter, and
saves the live panel with its admin buttons.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "What is the capital of France?"
MAX_TOKENS = 64
WAIT = 600  # seconds: six answers from a 135M model on 2 cores, with a cold start


def main() -> int:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.browser import chromium
    from tests.server_process import start_server

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        admin_token = Path(tmp) / "admin-token"
        admin_token.write_text(secrets.token_urlsafe(32))
        server = start_server("--demo", "smollm2", "--http-port", "auto",
                              "--admin-token-file", str(admin_token),
                              "--store", str(Path(tmp) / "store"), timeout=900)
        browser = chromium(1400, 1300)
        try:
            wait = WebDriverWait(browser, WAIT, poll_frequency=0.5).until
            browser.get(server.http_url + "/")
            wait(lambda _: browser.find_elements(By.CSS_SELECTOR, "#model-picks input"))
            box = browser.find_element(By.ID, "prompt")
            box.clear()
            box.send_keys(PROMPT)
            tokens = browser.find_element(By.ID, "max-tokens")
            tokens.clear()
            tokens.send_keys(str(MAX_TOKENS))
            browser.find_element(By.ID, "compare").click()
            wait(lambda _: browser.execute_script(
                "const cards = [...document.querySelectorAll('#answers .answer')];"
                "return cards.length > 0 && cards.every(c => c.dataset.state === 'done');"))
            wait(lambda _: browser.find_element(By.ID, "running").text == "0")
            browser.save_screenshot(str(ROOT / "docs" / "web-page.png"))

            browser.find_element(By.CSS_SELECTOR, "#tokens summary").click()
            field = browser.find_element(By.ID, "admin-token")
            field.send_keys(admin_token.read_text())
            browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)
            pin = 'li.adapter[data-name="json"] button[data-action="pin"]'
            wait(lambda _: [b for b in browser.find_elements(By.CSS_SELECTOR, pin)
                            if b.is_displayed()])
            browser.find_element(By.CSS_SELECTOR, pin).click()
            wait(lambda _: browser.execute_script(
                "return document.querySelector('li.adapter[data-name=\"json\"]')"
                ".dataset.pinned === 'true';"))
            browser.find_element(By.ID, "live").screenshot(str(ROOT / "docs" / "web-admin.png"))
        finally:
            browser.quit()
            server.stop()
    print("wrote docs/web-page.png and docs/web-admin.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
