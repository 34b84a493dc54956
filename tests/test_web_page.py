"""The web page on the HTTP port, against a real server on the tiny demo: its JSON routes with
plain HTTP, then the page itself in headless Chromium (selenium): the inference token, a
comparison streamed side by side, adapters moving into device slots on the live panel, admin
actions with the admin token."""

from __future__ import annotations

import pytest
import requests
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from server.api.http_admin import NO_ADMIN_API
from server.tools.demo import build_demo
from tests.browser import chromium
from tests.server_process import start_server

BASE = "model"  # the tiny demo model's id
ADAPTERS = ["all-r16", "all-r64-rslora", "attn-r4", "attn-r8", "mlp-r8-bf16"]  # sorted
TOKEN = "web-inference-token"
ADMIN_TOKEN = "web-admin-token"
PAGE_WAIT = 120  # seconds a browser condition may take on a loaded 2-core machine


@pytest.fixture(scope="module")
def server(demo_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    (tmp / "token").write_text(TOKEN)
    (tmp / "admin-token").write_text(ADMIN_TOKEN)
    process = start_server("--http-port", "auto", "--threads", "1", "--store", str(tmp / "store"),
                           "--inference-token-file", str(tmp / "token"),
                           "--admin-token-file", str(tmp / "admin-token"),
                           env={"LORAPLEX_CACHE_DIR": str(demo_cache)})
    yield process
    assert process.stop() == 0, process.output()
    assert "Traceback" not in process.output(), process.output()


class Http:
    """Plain HTTP to one server: `get(path, ...)` and so on, as requests takes them."""

    def __init__(self, base_url: str):
        self.base_url, self.session = base_url, requests.Session()

    def __getattr__(self, method: str):
        return lambda path, **kwargs: self.session.request(method.upper(), self.base_url + path,
                                                           timeout=120, **kwargs)


@pytest.fixture(scope="module")
def http(server):
    client = Http(server.http_url)
    yield client
    client.session.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def status(http) -> dict:
    response = http.get("/api/status", headers=bearer(TOKEN))
    assert response.status_code == 200, response.text
    return response.json()


def adapter(http, name: str) -> dict:
    return next(a for a in status(http)["adapters"] if a["name"] == name)


# ---- the JSON routes --------------------------------------------------------------------------

def test_the_page_and_its_files_need_no_token(http):
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for path in ("/ui/app.js", "/ui/style.css"):
        assert http.get(path).status_code == 200
    script = http.get("/ui/app.js").text
    assert "/ui/app.js" in page.text  # and nothing from another origin (no CDN):
    assert "://" not in page.text + script.replace("http://www.w3.org/2000/svg", "")


def test_status_needs_the_inference_token(http):
    assert http.get("/api/status").status_code == 401
    assert http.get("/api/status", headers=bearer("wrong")).status_code == 401
    assert http.get("/api/status", headers=bearer(ADMIN_TOKEN)).status_code == 200


def test_status_lists_the_model_every_adapter_with_its_tier_and_the_cost_figures(http):
    s = status(http)
    assert s["model"]["name"] == BASE and s["admin_api"] is True
    assert [a["name"] for a in s["adapters"]] == ADAPTERS
    assert {a["tier"] for a in s["adapters"]} <= {"slot", "host", "store"}
    cost, memory = s["cost"], s["memory"]
    assert cost["adapters"] == len(ADAPTERS)
    assert cost["loraplex_bytes"] == (memory["base_model_bytes"] + memory["adapter_slot_bytes"]
                                      + sum(a["size_bytes"] for a in s["adapters"]))
    chart = cost["chart"]
    assert chart["ns"][0] == 1 and chart["ns"][-1] == 1000
    assert len(chart["ns"]) == len(chart["loraplex"]) == len(chart["bf16_copies"])


def test_a_generated_adapter_moves_into_a_device_slot(http):
    assert adapter(http, "attn-r8")["tier"] != "slot"
    response = http.post("/v1/completions", headers=bearer(TOKEN),
                         json={"model": "attn-r8", "prompt": "hi", "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert adapter(http, "attn-r8")["tier"] == "slot"


def test_admin_routes_need_the_admin_token(http):
    for headers, code in (({}, 401), (bearer(TOKEN), 403), (bearer("wrong"), 401)):
        response = http.post("/api/admin/adapters/attn-r4/pin", headers=headers)
        assert response.status_code == code, response.text


def test_pin_and_unpin(http):
    pinned = http.post("/api/admin/adapters/attn-r4/pin", headers=bearer(ADMIN_TOKEN))
    assert pinned.status_code == 200 and pinned.json()["pinned"] is True
    assert adapter(http, "attn-r4")["pinned"] is True
    unpinned = http.post("/api/admin/adapters/attn-r4/unpin", headers=bearer(ADMIN_TOKEN))
    assert unpinned.status_code == 200 and unpinned.json()["pinned"] is False


def test_an_unknown_adapter_is_404(http):
    response = http.post("/api/admin/adapters/nope/pin", headers=bearer(ADMIN_TOKEN))
    assert response.status_code == 404 and "nope" in response.json()["error"]["message"]


def upload(http, name: str, files: dict) -> requests.Response:
    return http.put(f"/api/admin/adapters/{name}", headers=bearer(ADMIN_TOKEN), files=files)


def demo_files(demo_cache, adapter_name: str) -> dict:
    directory = build_demo(demo_cache, progress=None).adapters[adapter_name]
    return {"adapter_config": ("adapter_config.json",
                               (directory / "adapter_config.json").read_bytes()),
            "adapter_model": ("adapter_model.safetensors",
                              (directory / "adapter_model.safetensors").read_bytes())}


def test_upload_serve_and_delete(http, demo_cache):
    response = upload(http, "uploaded", demo_files(demo_cache, "attn-r4"))
    assert response.status_code == 200, response.text
    assert response.json()["name"] == "uploaded" and response.json()["version"] == 1
    copy = http.post("/v1/completions", headers=bearer(TOKEN),
                     json={"model": "uploaded", "prompt": "Once", "max_tokens": 8,
                           "temperature": 0}).json()
    original = http.post("/v1/completions", headers=bearer(TOKEN),
                         json={"model": "attn-r4", "prompt": "Once", "max_tokens": 8,
                               "temperature": 0}).json()
    assert copy["choices"][0]["text"] == original["choices"][0]["text"]
    assert upload(http, "uploaded", demo_files(demo_cache, "attn-r8")).json()["version"] == 2
    deleted = http.delete("/api/admin/adapters/uploaded", headers=bearer(ADMIN_TOKEN))
    assert deleted.status_code == 200
    assert "uploaded" not in [a["name"] for a in status(http)["adapters"]]


@pytest.mark.parametrize("case", ["missing weights", "bad name", "bad config", "not multipart"])
def test_a_bad_upload_is_400_with_the_reason(http, demo_cache, case):
    files = demo_files(demo_cache, "attn-r4")
    name = "fine"
    if case == "missing weights":
        del files["adapter_model"]
    elif case == "bad name":
        name = "..bad"
    elif case == "bad config":
        files["adapter_config"] = ("adapter_config.json", b"{not json")
    if case == "not multipart":
        response = http.put(f"/api/admin/adapters/{name}", headers=bearer(ADMIN_TOKEN),
                            data=b"raw bytes")
    else:
        response = upload(http, name, files)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]
    assert name not in [a["name"] for a in status(http)["adapters"]]


def test_admin_routes_say_how_to_turn_the_admin_api_on(demo_cache, tmp_path):
    process = start_server("--http-port", "auto", "--threads", "1", "--store",
                           str(tmp_path / "store"), env={"LORAPLEX_CACHE_DIR": str(demo_cache)})
    try:
        response = requests.post(process.http_url + "/api/admin/adapters/attn-r4/pin",
                              headers=bearer("anything"))
        assert response.status_code == 404
        assert response.json()["error"]["message"] == NO_ADMIN_API
        assert requests.get(process.http_url + "/api/status").json()["admin_api"] is False
    finally:
        assert process.stop() == 0


# ---- the page in a browser --------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def wait(browser, condition, what: str):
    return WebDriverWait(browser, PAGE_WAIT, poll_frequency=0.2).until(
        lambda _: condition(), message=what)


def adapter_item(browser, name: str) -> dict | None:
    """The data attributes of an adapter's entry on the live panel (read in one script: the
    panel is redrawn when the server's state changes)."""
    return browser.execute_script(
        "const li = document.querySelector(`li.adapter[data-name='${arguments[0]}']`);"
        "return li ? {...li.dataset} : null;", name)


def tier_of(browser, name: str) -> str | None:
    item = adapter_item(browser, name)
    return item and item["tier"]


def enter_token(browser, field: str, token: str) -> None:
    if not browser.find_element(By.ID, "tokens").get_attribute("open"):
        browser.find_element(By.CSS_SELECTOR, "#tokens summary").click()
    box = browser.find_element(By.ID, field)
    box.clear()
    box.send_keys(token)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", box)


@pytest.fixture
def page(server, browser):
    """The page loaded afresh in the browser's tab, with the inference token."""
    browser.get(server.http_url + "/")
    enter_token(browser, "inference-token", TOKEN)
    wait(browser, lambda: tier_of(browser, "all-r16") is not None, "adapters listed")
    return browser


def test_the_page_asks_for_the_inference_token_then_shows_the_server(server, browser, http):
    browser.get(server.http_url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait(browser, lambda: "401" in browser.find_element(By.ID, "message").text,
         "the page says the status needs a token")
    enter_token(browser, "inference-token", TOKEN)
    wait(browser, lambda: tier_of(browser, "all-r16") is not None, "adapters listed")
    assert BASE in browser.find_element(By.ID, "model-line").text
    assert browser.find_element(By.ID, "message").text == ""
    labels = [e.get_attribute("value") for e in
              browser.find_elements(By.CSS_SELECTOR, "#model-picks input")]
    assert labels == [BASE, *[a["name"] for a in status(http)["adapters"]]]


def test_a_comparison_streams_every_answer_and_fills_the_device_slots(page, http):
    browser = page
    untouched = "all-r64-rslora"  # no earlier test ran it
    assert tier_of(browser, untouched) != "slot"
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("Tell me a story")
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("12")
    browser.find_element(By.ID, "compare").click()

    models = [BASE, *ADAPTERS]
    cards = lambda: browser.find_elements(By.CSS_SELECTOR, "#answers .answer")
    wait(browser, lambda: [c.get_attribute("data-state") for c in cards()] == ["done"] * len(models),
         "every answer finished")
    chat = status(http)["model"]["chat_template"]
    for card in cards():
        text, tokens = _greedy(http, card.get_attribute("data-model"), "Tell me a story", 12, chat)
        assert card.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent") == text
        assert card.find_element(By.CSS_SELECTOR, ".stats").text.startswith(f"{tokens} tokens")
    assert [c.get_attribute("data-model") for c in cards()] == models
    wait(browser, lambda: tier_of(browser, untouched) == "slot",
         "the live panel shows the adapter in a device slot")


def _greedy(http, model: str, prompt: str, max_tokens: int, chat: bool) -> tuple[str, int]:
    """The whole answer the HTTP API gives, and its number of tokens."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        answer = http.post("/v1/chat/completions", headers=bearer(TOKEN), json=body).json()
        text = answer["choices"][0]["message"]["content"]
    else:
        body["prompt"] = prompt
        answer = http.post("/v1/completions", headers=bearer(TOKEN), json=body).json()
        text = answer["choices"][0]["text"]
    return text, answer["usage"]["completion_tokens"]


def test_admin_buttons_appear_with_the_admin_token_and_pin(page, http):
    browser = page
    buttons = lambda: [b for b in browser.find_elements(
        By.CSS_SELECTOR, 'li.adapter[data-name="attn-r8"] button[data-action="pin"]')
        if b.is_displayed()]
    assert not buttons()
    enter_token(browser, "admin-token", ADMIN_TOKEN)
    wait(browser, lambda: click(buttons), "a pin button")
    wait(browser, lambda: adapter_item(browser, "attn-r8")["pinned"] == "true",
         "the panel shows the adapter pinned")
    assert adapter(http, "attn-r8")["pinned"] is True


def test_upload_and_delete_from_the_page(page, http, demo_cache):
    browser = page
    enter_token(browser, "admin-token", ADMIN_TOKEN)
    directory = build_demo(demo_cache, progress=None).adapters["attn-r4"]
    browser.find_element(By.ID, "upload-name").send_keys("from-page")
    browser.find_element(By.ID, "upload-config").send_keys(str(directory / "adapter_config.json"))
    browser.find_element(By.ID, "upload-weights").send_keys(
        str(directory / "adapter_model.safetensors"))
    browser.find_element(By.CSS_SELECTOR, "#upload button[type=submit]").click()
    wait(browser, lambda: tier_of(browser, "from-page") == "store", "the uploaded adapter listed")
    assert adapter(http, "from-page")["version"] == 1

    delete = lambda: browser.find_elements(
        By.CSS_SELECTOR, 'li.adapter[data-name="from-page"] button[data-action="delete"]')
    wait(browser, lambda: click(delete), "a delete button")
    browser.switch_to.alert.accept()  # "Delete adapter from-page?"
    wait(browser, lambda: tier_of(browser, "from-page") is None, "the adapter gone from the panel")
    assert "from-page" not in [a["name"] for a in status(http)["adapters"]]


def click(find) -> bool:
    """Clicks the first element `find()` returns; False when there is none yet or the panel
    was redrawn under it (the caller waits and tries again)."""
    try:
        elements = find()
        if not elements:
            return False
        elements[0].click()
        return True
    except StaleElementReferenceException:
        return False
