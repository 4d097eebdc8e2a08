"""The playground page at / (server/playground.py, server/static/playground.html).

In-process: its headers (CSP hashes of the inline style and script, nosniff), no auth to load it, `--no-playground`.
In headless Chromium driven by Selenium: against `klein-serve --demo` on a loopback port (text-to-image in portrait,
image-to-image from an uploaded file, the 401 and 422 messages, a fifth reference refused in the page), and against
an in-process server of fake models (the model picker, the 503 with Retry-After while compiling, the 413, keyboard
order). The browser tests skip only when Debian's chromium / chromium-driver are absent (.ci/run installs them).

KLEIN_PLAYGROUND_SCREENSHOTS=1 also writes docs/playground-desktop.png and docs/playground-phone.png.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import shutil
import socket
import threading

import httpx
import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait
from server_support import (
    REPO,
    AppClient,
    FakePipeline,
    LoopThread,
    ServerProcess,
    png_bytes,
    session_compile_cache,
)

from server import Settings, create_app
from server.__main__ import build_parser, settings_from_args

KEY = "playground-key"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")
needs_browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                   reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                          "chromium-driver; .ci/run does)")


# ---------------------------------------------------------------------------------------------- in-process


@pytest.fixture(scope="module")
def app_client():
    client = AppClient(create_app({"flux2-klein-4b": FakePipeline()}, Settings(api_keys=(KEY,))))
    yield client
    client.close()


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def test_page_loads_without_a_key_with_safe_headers(app_client):
    answer = app_client.request("GET", "/")
    assert answer.status == 200 and answer.headers["Content-Type"] == "text/html; charset=utf-8"
    html = answer.body.decode()
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    (style,) = re.findall(r"<style>(.*?)</style>", html, re.DOTALL)
    policy = dict(part.split(" ", 1) for part in answer.headers["Content-Security-Policy"].split("; "))
    assert policy == {
        "default-src": "'none'", "script-src": f"'sha256-{_sha256(script)}'", "style-src": f"'sha256-{_sha256(style)}'",
        "img-src": "'self' blob: data:", "connect-src": "'self'", "form-action": "'none'", "base-uri": "'none'",
        "frame-ancestors": "'none'"}
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.headers["Referrer-Policy"] == "no-referrer" and answer.headers["X-Frame-Options"] == "DENY"
    assert app_client.generate({"prompt": "p"}, key=None).status == 401  # the page is open, generating is not


def test_page_needs_nothing_beyond_the_server_and_keeps_the_key_in_memory(app_client):
    html = app_client.request("GET", "/").body.decode()
    assert not re.findall(r"""(?:src|href|action)\s*=\s*["'](?!data:)[^"']+""", html)  # no external asset or post
    assert "fetch(\"v1/generate\", { method: \"POST\"" in html
    for banned in ("localStorage", "sessionStorage", "document.cookie", "indexedDB", "console.", "innerHTML"):
        assert banned not in html, banned
    assert not re.findall(r"<[^>]*\s(?:style|on[a-z]+)=", html)  # inline attributes: the CSP would refuse them
    assert not re.findall(r"<input[^>]* name=", html)  # without its script the form sends no field anywhere


def test_no_playground_flag_serves_404_json(monkeypatch):
    def playground(*argv: str) -> bool:
        return settings_from_args(build_parser().parse_args(["--demo", *argv]), (KEY,)).playground

    assert playground() and not playground("--no-playground")
    monkeypatch.setenv("KLEIN_NO_PLAYGROUND", "1")
    assert not playground()
    client = AppClient(create_app({"flux2-klein-4b": FakePipeline()}, Settings(api_keys=(KEY,), playground=False)))
    try:
        answer = client.request("GET", "/")
        assert answer.status == 404 and answer.json() == {
            "detail": "not found: see /openapi.json for the routes of this server"}
        assert "/" not in client.request("GET", "/openapi.json").json()["paths"]
    finally:
        client.close()


# ------------------------------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (*CHROMIUM_ARGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
                "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    env = {"KLEIN_API_KEYS": KEY, "KLEIN_COMPILE_CACHE": str(session_compile_cache(tmp_path_factory))}
    server = ServerProcess(["--demo", "--aspect-ratios", "square,portrait", "--compile-references", "0",
                            "--max-batch", "1"], tmp_path_factory.mktemp("playground-demo"), env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


class HypercornThread:
    """create_app(...) served by Hypercorn on a loopback port, on an event loop in a thread."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = Config()
        config.bind = [f"fd://{sock.detach()}"]
        config.accesslog = None
        self.loop = LoopThread()
        self.stopping = self.loop.run(self._event())
        self.done = asyncio.run_coroutine_threadsafe(serve(app, config, shutdown_trigger=self.stopping.wait),
                                                     self.loop.loop)

    @staticmethod
    async def _event() -> asyncio.Event:
        return asyncio.Event()

    def close(self):
        self.loop.loop.call_soon_threadsafe(self.stopping.set)
        self.done.result(30)
        self.loop.close()


def open_page(driver, base_url: str, key: str = "") -> None:
    driver.get(base_url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "server").text.startswith(("Ready", "Not ready")))
    if key:
        driver.find_element(By.ID, "key").send_keys(key)


def text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def click_generate(driver, timeout_s: float = 120) -> None:
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, timeout_s).until(lambda d: text(d, "generate") == "Generate")


def natural_size(driver, element) -> tuple[int, int]:
    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return arguments[0].complete", element))
    return tuple(driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", element))


def add_url(driver, url: str) -> None:
    field = driver.find_element(By.ID, "ref-url")
    field.send_keys(url)
    field.send_keys(Keys.ENTER)


def generate_requests(server: ServerProcess) -> int:
    return sum(json.loads(line).get("path") == "/v1/generate" for line in server.stdout().splitlines()
               if line.startswith("{"))


def csp_violations(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if "Content Security Policy" in entry["message"]]


@needs_browser
def test_text_to_image_in_portrait(browser, demo):
    open_page(browser, demo.base_url, KEY)
    assert browser.find_element(By.ID, "model-row").get_attribute("hidden") is not None  # one model: no picker
    assert browser.find_element(By.ID, "lora-row").get_attribute("hidden") is not None  # no adapters
    aspect = Select(browser.find_element(By.ID, "aspect"))
    assert [o.text for o in aspect.options] == ["square 1024×1024", "portrait 768×1344"]
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("a lighthouse at dusk")
    aspect.select_by_value("portrait")
    browser.find_element(By.ID, "seed").send_keys("7")
    prompt.send_keys(Keys.ENTER)  # Enter submits
    WebDriverWait(browser, 120).until(lambda d: text(d, "generate") == "Generate")
    assert prompt.get_attribute("value") == "a lighthouse at dusk"
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None, text(browser, "error")
    assert natural_size(browser, browser.find_element(By.ID, "result-img")) == (768, 1344)
    assert text(browser, "meta-workflow") == "text-to-image" and text(browser, "meta-seed") == "7"
    assert text(browser, "meta-model") == "flux2-klein-4b" and text(browser, "meta-size") == "768 × 1344"
    assert re.fullmatch(r"parse \d+ ms, fetch \d+ ms, decode \d+ ms, prepare \d+ ms, queue \d+ ms, generate \d+ ms, "
                        r"encode \d+ ms", text(browser, "meta-timings")), text(browser, "meta-timings")
    assert "noise" in text(browser, "meta-demo") and text(browser, "status").startswith("Image 1 done in")
    (item,) = browser.find_elements(By.CSS_SELECTOR, "#gallery li")
    link = item.find_element(By.LINK_TEXT, "Download")
    assert link.get_attribute("download") == "klein-1-seed-7.png" and link.get_attribute("href").startswith("blob:")
    assert csp_violations(browser) == []
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    try:  # phone width: one column, nothing wider than the screen
        assert browser.execute_script("return document.documentElement.scrollWidth") == 390
        assert browser.find_element(By.ID, "result-img").size["width"] <= 390 - 2 * 10
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    if os.environ.get("KLEIN_PLAYGROUND_SCREENSHOTS") == "1":
        save_screenshots(browser)


def save_screenshots(driver) -> None:
    """docs/playground-desktop.png (1280x960) and docs/playground-phone.png (390 wide, the whole page), 64 colours."""
    for name, width, mobile in (("desktop", 1280, False), ("phone", 390, True)):
        metrics = {"width": width, "height": 960, "deviceScaleFactor": 1, "mobile": mobile}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        if mobile:
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": height})
        image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        image.quantize(64).save(REPO / "docs" / f"playground-{name}.png", optimize=True)
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


@needs_browser
def test_uploaded_reference_is_image_to_image(browser, demo, tmp_path):
    open_page(browser, demo.base_url, KEY)
    reference = tmp_path / "reference.png"
    reference.write_bytes(png_bytes(size=(128, 96), color=(30, 120, 220)))
    browser.find_element(By.ID, "ref-file").send_keys(str(reference))
    (thumb,) = browser.find_elements(By.CSS_SELECTOR, "#refs img")
    assert natural_size(browser, thumb) == (128, 96)
    assert text(browser, "refs-count") == "(1/4: image-to-image)"
    browser.find_element(By.ID, "prompt").send_keys("the same in winter")
    Select(browser.find_element(By.ID, "aspect")).select_by_value("square")
    click_generate(browser, timeout_s=180)  # the program for one reference compiles on first use
    assert text(browser, "meta-workflow") == "image-to-image", text(browser, "error")
    assert natural_size(browser, browser.find_element(By.ID, "result-img")) == (1024, 1024)
    browser.find_element(By.CSS_SELECTOR, "#refs button").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#refs li") == []
    assert text(browser, "refs-count") == "(0/4: text-to-image)"


def _server_detail(server, fields: dict, key: str) -> str:
    answer = httpx.post(server.base_url + "/v1/generate", data=fields, headers={"Authorization": f"Bearer {key}"},
                        timeout=30, trust_env=False)
    return answer.json()["detail"]


@needs_browser
def test_wrong_key_shows_the_401_message(browser, demo):
    open_page(browser, demo.base_url, "wrong-key")
    browser.find_element(By.ID, "prompt").send_keys("a fox")
    click_generate(browser)
    detail = _server_detail(demo, {"prompt": "a fox"}, "wrong-key")
    assert text(browser, "error") == f"Error 401: {detail}\nCheck the API key field."
    assert text(browser, "status") == "Failed (401)."
    assert browser.find_element(By.ID, "result").get_attribute("hidden") is not None


@needs_browser
def test_fifth_reference_is_refused_in_the_page(browser, demo, tmp_path):
    open_page(browser, demo.base_url, KEY)
    tiny = "data:image/png;base64," + base64.b64encode(png_bytes(size=(64, 64))).decode()
    for _ in range(4):
        add_url(browser, tiny)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#refs img")) == 4
    assert text(browser, "refs-count") == "(4/4: multi-reference)"
    before = generate_requests(demo)
    add_url(browser, "https://example.com/fifth.png")
    assert text(browser, "error") == "At most 4 reference images: adding 1 would make 5. Remove one first."
    fifth = tmp_path / "fifth.png"
    fifth.write_bytes(png_bytes())
    browser.find_element(By.ID, "ref-file").send_keys(str(fifth))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#refs li")) == 4
    assert generate_requests(demo) == before


@needs_browser
def test_unreachable_url_shows_the_422_message(browser, demo):
    open_page(browser, demo.base_url, KEY)
    url = "http://127.0.0.1:9/x.png"  # loopback: the server refuses it before connecting
    add_url(browser, url)
    assert browser.find_element(By.CSS_SELECTOR, "#refs .tile").text == "127.0.0.1:9"
    browser.find_element(By.ID, "prompt").send_keys("a fox")
    click_generate(browser)
    detail = _server_detail(demo, {"prompt": "a fox", "aspect_ratio": "square", "image_uris": json.dumps([url])}, KEY)
    assert "127.0.0.1" in detail
    assert text(browser, "error") == f"Error 422: {detail}\nCorrect the field it names and try again."


@pytest.fixture(scope="module")
def fake_server():
    """Two fake models behind a gate: not ready (503, Retry-After: 1) until the test opens it; no auth; 20 kB bodies."""
    gate = threading.Event()
    models = {"flux2-klein-4b": FakePipeline(compile_gate=gate), "second": FakePipeline()}
    settings = Settings(auth=False, aspect_ratios=("square", "wide"), max_body_bytes=20_000,
                        retry_after_not_ready_s=1)
    server = HypercornThread(create_app(models, settings))
    server.gate = gate
    yield server
    gate.set()
    server.close()


@needs_browser
def test_not_ready_model_picker_and_413(browser, fake_server, tmp_path):
    open_page(browser, fake_server.base_url)
    assert text(browser, "server").startswith("Not ready: the server is starting: compiling programs")
    assert text(browser, "key-hint") == "Not needed: this server runs without API keys."
    browser.find_element(By.ID, "prompt").send_keys("a fox")
    click_generate(browser)
    assert text(browser, "error") == "Error 503: the server is starting: compiling programs; retry shortly\nRetry in 1 s."
    fake_server.gate.set()
    WebDriverWait(browser, 10).until(lambda d: text(d, "server") == "Ready.")  # the page polled /readyz again
    model = Select(browser.find_element(By.ID, "model"))
    assert browser.find_element(By.ID, "model").is_displayed()
    assert [o.get_attribute("value") for o in model.options] == ["flux2-klein-4b", "second"]
    model.select_by_value("second")
    Select(browser.find_element(By.ID, "aspect")).select_by_value("wide")
    click_generate(browser)
    assert text(browser, "meta-model") == "second"
    assert natural_size(browser, browser.find_element(By.ID, "result-img")) == (1568, 672)
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes() + b"\0" * 30_000)
    browser.find_element(By.ID, "ref-file").send_keys(str(big))
    click_generate(browser)
    assert re.fullmatch(r"Error 413: request body too large: at most 20000 bytes and \d+ form fields\n"
                        r"Send fewer or smaller reference images\.", text(browser, "error")), text(browser, "error")
    assert csp_violations(browser) == []


@needs_browser
def test_keyboard_order_and_labels(browser, fake_server):
    fake_server.gate.set()
    open_page(browser, fake_server.base_url)
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input, select, textarea')].filter(c => !c.labels.length)"
        ".map(c => c.id)")
    assert unlabelled == []
    browser.find_element(By.ID, "prompt").click()
    order = []
    for _ in range(8):
        ActionChains(browser).send_keys(Keys.TAB).perform()  # to the page, not into the focused file input
        order.append(browser.switch_to.active_element.get_attribute("id"))
    assert order == ["model", "aspect", "seed", "ref-file", "ref-url", "ref-url-add", "key", "generate"]
    assert browser.find_element(By.ID, "status").get_attribute("aria-live") == "polite"
    assert browser.find_element(By.ID, "error").get_attribute("role") == "alert"
