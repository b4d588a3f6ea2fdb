"""The web page of ``fastflow serve`` (fastflow/serve/static/index.html) in a real headless chromium.

The real server (``create_app`` + uvicorn in a thread, the embedded model, loopback, a free port)
serves the page; selenium drives Debian's chromium through chromedriver. The page must load, post a
prompt with ``"stream": true``, show the per-step progress from the server-sent events and put the
image in the gallery; a bad request shows the server's own message; an API key is asked for and sent.

No browser is downloaded: ``bash tools/install_browser.sh`` installs chromium + chromium-driver (apt).
Without them these tests FAIL (naming that script), unless FASTFLOW_SKIP_BROWSER=1.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

MODEL = "fastflow-tiny-digits"
INSTALL_HINT = "run `bash tools/install_browser.sh` (apt: chromium chromium-driver)"
SKIP = os.environ.get("FASTFLOW_SKIP_BROWSER") == "1"
API_KEY = "web-page-test-key-1234"
LOAD_S = 30  # page loads and small waits
GENERATE_S = 120  # one generation on a busy 2-core machine


def _missing(what: str, hint: str):
    message = f"{what} is missing: {hint}"
    if SKIP:
        pytest.skip(f"{message} (skipped: FASTFLOW_SKIP_BROWSER=1)")
    pytest.fail(f"{message}; set FASTFLOW_SKIP_BROWSER=1 to skip the browser tests", pytrace=False)


def browser_paths() -> tuple[str, str]:
    """chromium and chromedriver on PATH (Debian names them so; other distributions chromium-browser)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        _missing("chromium" if not chromium else "chromedriver", INSTALL_HINT)
    return chromium, driver


def test_browser_is_installed():
    """A plain FAILED line (not only fixture errors) when the browser is missing."""
    chromium, driver = browser_paths()
    assert os.access(chromium, os.X_OK) and os.access(driver, os.X_OK)


# ---------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def pipe():
    try:
        import fastflow
    except ImportError as e:  # pragma: no cover - the package itself
        pytest.fail(f"fastflow does not import: {e}")
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: the tiny model needs no more
    try:
        yield fastflow.load(MODEL)
    finally:
        torch.set_num_threads(threads)


class ServerThread:
    """uvicorn serving ``create_app(config, pipe)`` on a loopback socket bound before it starts."""

    def __init__(self, pipe, **config):
        try:
            import uvicorn

            from fastflow.serve import ServeConfig, create_app
        except ImportError as e:
            _missing(f"the serve stack ({e.name or e})", 'pip install -e ".[serve,test]"')
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        app = create_app(ServeConfig(model=MODEL, host="127.0.0.1", port=port, **config), pipe=pipe)
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread exited while starting")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        self.__exit__()
        raise TimeoutError(f"{self.url}/health did not answer 200 within 60 s")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        assert not self.thread.is_alive(), "the server thread did not stop within 30 s"


@pytest.fixture(scope="module")
def server(pipe):
    with ServerThread(pipe) as s:
        yield s


def post_json(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    """What the server itself answers (for comparing with what the page shows)."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=GENERATE_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = browser_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium", 'pip install -e ".[test]"')
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900",
                "--disable-extensions", "--no-first-run", "--disable-background-networking"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path, log_output=os.devnull), options=options)
    try:
        driver.set_page_load_timeout(LOAD_S)
        driver.set_script_timeout(LOAD_S)
        yield driver
    finally:
        driver.quit()


def wait(driver, timeout=LOAD_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05)


def by_id(driver, name):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def open_page(driver, url):
    driver.get(url + "/")
    wait(driver).until(lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'"))
    wait(driver).until(lambda d: by_id(d, "health").get_attribute("data-state") in ("ok", "down", "loading"))


def fill(driver, name, text):
    element = by_id(driver, name)
    element.clear()
    if text:
        element.send_keys(text)


def record_progress(driver):
    """Every value the page writes into #progress's data-step, in order (a MutationObserver sees
    each write, however quickly the events arrive)."""
    driver.execute_script("""
        const p = document.getElementById('progress');
        window.__steps = [];
        window.__progressObserver && window.__progressObserver.disconnect();
        window.__progressObserver = new MutationObserver((records) => {
          for (const r of records) window.__steps.push(Number(r.target.dataset.step));
        });
        window.__progressObserver.observe(p, {attributes: true, attributeFilter: ['data-step']});
    """)


def wait_for_images(driver, count):
    """Until the gallery holds ``count`` images; fails at once with the page's error message if one shows."""

    def done(d):
        error = by_id(d, "error")
        if error.is_displayed():
            pytest.fail(f"the page shows an error: {error.text}", pytrace=False)
        return len(gallery_images(d)) == count

    wait(driver, GENERATE_S).until(done)


def gallery_images(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#gallery img")


def png_of(img):
    from PIL import Image

    src = img.get_attribute("src")
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    return Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :])))


# ---------------------------------------------------------------- the tests


def test_page_loads_with_an_accessible_form(server, browser, pipe):
    from selenium.webdriver.common.by import By

    with urllib.request.urlopen(server.url + "/", timeout=LOAD_S) as r:
        assert r.headers.get("Content-Type", "").startswith("text/html")
        html = r.read().decode()
    # self-contained: nothing fetched from elsewhere
    for marker in ("http://", "https://", 'src="//', "@import"):
        assert marker not in html, f"the page refers to something outside the server: {marker}"

    open_page(browser, server.url)
    assert browser.title == "fastflow serve"
    wait(browser).until(lambda d: by_id(d, "health").get_attribute("data-state") == "ok")
    wait(browser).until(lambda d: by_id(d, "model-name").text == MODEL)

    form = by_id(browser, "generate-form")
    for name in ("prompt", "negative-prompt", "size", "sampler", "steps", "guidance", "seed", "seed-random", "n"):
        field = by_id(browser, name)
        assert form.find_elements(By.ID, name), f"#{name} is not in the form"
        labels = browser.find_elements(By.CSS_SELECTOR, f"label[for='{name}']")
        assert labels and labels[0].text.strip(), f"#{name} has no label"
        assert field.is_displayed()
    assert by_id(browser, "generate").text == "Generate"
    assert by_id(browser, "seed-random").is_selected() and not by_id(browser, "seed").is_enabled()

    # what /v1/models says: the sizes are whole multiples of the model's own, its samplers, and the
    # fields it does not take are disabled (the server would refuse them)
    h, w = pipe.default_size
    sizes = [o.get_attribute("value") for o in by_id(browser, "size").find_elements(By.TAG_NAME, "option")]
    assert sizes[0] == "" and f"{w}x{h}" in sizes and f"{2 * w}x{2 * h}" in sizes, sizes
    with urllib.request.urlopen(server.url + "/v1/models", timeout=LOAD_S) as r:
        entry = json.loads(r.read())["data"][0]
    samplers = [o.get_attribute("value") for o in by_id(browser, "sampler").find_elements(By.TAG_NAME, "option")]
    assert samplers == ["", *entry["samplers"]]
    assert by_id(browser, "guidance").is_enabled() == entry["guidance_scale"]
    assert by_id(browser, "negative-prompt").is_enabled() == entry["negative_prompt"]
    assert by_id(browser, "auth").is_displayed() is False, "no API key is configured, yet the page asks for one"


def test_generate_streams_progress_and_shows_the_image(server, browser, pipe):
    from selenium.webdriver.support.ui import Select

    steps, seed, prompt = 40, 1234, "a handwritten 7"
    open_page(browser, server.url)
    wait(browser).until(lambda d: len(d.find_elements("css selector", "#size option[value='32x32']")) == 1)
    fill(browser, "prompt", prompt)
    fill(browser, "steps", str(steps))
    Select(by_id(browser, "size")).select_by_value("32x32")
    by_id(browser, "seed-random").click()
    fill(browser, "seed", str(seed))
    before = len(gallery_images(browser))
    record_progress(browser)
    by_id(browser, "generate").click()

    # the progress bar moves through intermediate steps, then the image lands in the gallery
    wait(browser, GENERATE_S).until(lambda d: any(0 < s < steps for s in d.execute_script("return window.__steps")))
    wait_for_images(browser, before + 1)
    seen = browser.execute_script("return window.__steps")
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    assert seen[-1] == steps, seen
    progress = by_id(browser, "progress")
    assert progress.get_attribute("data-state") == "done"
    assert progress.get_attribute("data-steps") == str(steps)
    assert by_id(browser, "progress-text").text == f"step {steps} / {steps}"
    assert not by_id(browser, "error").is_displayed(), by_id(browser, "error").text

    img = gallery_images(browser)[0]
    wait(browser).until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img))
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img) == [32, 32]
    assert img.get_attribute("alt") == prompt
    assert img.get_attribute("data-seed") == str(seed)
    caption = img.find_element("xpath", "following-sibling::figcaption").text
    assert prompt in caption and str(seed) in caption and str(steps) in caption, caption

    # the served image is the in-process image for that seed and those settings
    served = png_of(img).convert("RGB")
    expected = pipe(prompt, height=32, width=32, num_inference_steps=steps, seed=seed, progress=False).images[0]
    assert served.size == (32, 32)
    assert served.tobytes() == expected.convert("RGB").tobytes()


def test_seeds_beyond_2_to_the_53_stay_exact(server, browser):
    """The server takes seeds up to 2**63 - 1: the page sends and shows their exact digits (a JS
    number holds integers exactly only up to 2**53)."""
    seed = 2**63 - 5
    open_page(browser, server.url)
    fill(browser, "prompt", "a 2")
    fill(browser, "steps", "2")
    fill(browser, "n", "2")
    by_id(browser, "seed-random").click()
    fill(browser, "seed", str(seed))
    before = len(gallery_images(browser))
    by_id(browser, "generate").click()
    wait_for_images(browser, before + 2)
    assert not by_id(browser, "error").is_displayed(), by_id(browser, "error").text
    shown = [img.get_attribute("data-seed") for img in gallery_images(browser)[:2]]
    assert shown == [str(seed), str(seed + 1)], shown  # in the answer's order
    by_id(browser, "seed").clear()
    gallery_images(browser)[1].find_element("xpath", "following-sibling::figcaption//button").click()
    assert by_id(browser, "seed").get_attribute("value") == str(seed + 1)


@pytest.mark.filterwarnings("ignore:a prompt is longer than:UserWarning")
def test_server_text_is_shown_as_text(server, browser):
    from selenium.webdriver.common.by import By

    prompt = '<img id="injected" src="x" onerror="window.__pwned=1"><b id="bold">3</b>'
    open_page(browser, server.url)
    fill(browser, "prompt", prompt)
    fill(browser, "steps", "2")
    before = len(browser.find_elements(By.CSS_SELECTOR, "#gallery > li"))
    by_id(browser, "generate").click()
    wait(browser, GENERATE_S).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery > li")) == before + 1)
    assert not browser.find_elements(By.ID, "injected") and not browser.find_elements(By.ID, "bold")
    assert browser.execute_script("return window.__pwned") is None
    assert prompt in browser.find_element(By.CSS_SELECTOR, "#gallery figcaption").text


def test_bad_request_shows_the_servers_message(server, browser):
    status, answer = post_json(server.url + "/v1/images/generations", {"prompt": "", "stream": True})
    assert status == 400, (status, answer)
    message = answer["error"]["message"]
    assert message

    open_page(browser, server.url)
    fill(browser, "prompt", "")
    before = len(gallery_images(browser))
    by_id(browser, "generate").click()
    error = by_id(browser, "error")
    wait(browser, GENERATE_S).until(lambda d: error.is_displayed() and message in error.text)
    assert error.get_attribute("role") == "alert"
    assert by_id(browser, "progress").get_attribute("data-state") == "error"
    assert by_id(browser, "generate").is_enabled(), "the form stays usable after an error"
    assert len(gallery_images(browser)) == before

    # a correct request afterwards clears the message
    fill(browser, "prompt", "a 1")
    fill(browser, "steps", "2")
    by_id(browser, "generate").click()
    wait_for_images(browser, before + 1)
    assert not by_id(browser, "error").is_displayed()


def test_api_key_is_asked_for_and_sent(pipe, browser):
    with ServerThread(pipe, api_key=API_KEY) as keyed:
        open_page(browser, keyed.url)
        fill(browser, "prompt", "a 4")
        fill(browser, "steps", "2")
        by_id(browser, "generate").click()
        # the 401 (or /health) makes the page show the key field with the server's message
        wait(browser, GENERATE_S).until(lambda d: by_id(d, "auth").is_displayed())
        status, answer = post_json(keyed.url + "/v1/images/generations", {"prompt": "a 4"})
        assert status == 401, (status, answer)
        wait(browser, GENERATE_S).until(lambda d: answer["error"]["message"] in by_id(d, "error").text)
        assert by_id(browser, "api-key").get_attribute("type") == "password"

        fill(browser, "api-key", API_KEY)
        before = len(gallery_images(browser))
        wait(browser).until(lambda d: by_id(d, "generate").is_enabled())
        by_id(browser, "generate").click()
        wait_for_images(browser, before + 1)
        assert not by_id(browser, "error").is_displayed()
        wait(browser).until(lambda d: by_id(d, "model-name").text == MODEL)


def test_cancel_stops_waiting_and_the_form_stays_usable(server, browser):
    steps = 200
    open_page(browser, server.url)
    wait(browser).until(lambda d: len(d.find_elements("css selector", "#size option[value='64x64']")) == 1)
    from selenium.webdriver.support.ui import Select

    fill(browser, "prompt", "a 9")
    fill(browser, "steps", str(steps))
    Select(by_id(browser, "size")).select_by_value("64x64")
    before = len(gallery_images(browser))
    record_progress(browser)
    by_id(browser, "generate").click()
    assert by_id(browser, "cancel").is_enabled() and not by_id(browser, "generate").is_enabled()
    wait(browser, GENERATE_S).until(lambda d: any(0 < s for s in d.execute_script("return window.__steps")))
    by_id(browser, "cancel").click()
    wait(browser, GENERATE_S).until(lambda d: by_id(d, "progress").get_attribute("data-state") in ("cancelled", "done"))
    if by_id(browser, "progress").get_attribute("data-state") == "done":
        pytest.fail("the generation finished before Cancel took effect: raise its steps or size")
    assert by_id(browser, "error").text == "cancelled"
    assert by_id(browser, "generate").is_enabled() and not by_id(browser, "cancel").is_enabled()
    assert len(gallery_images(browser)) == before

    # the server goes on answering: the next request from the page completes
    fill(browser, "steps", "2")
    Select(by_id(browser, "size")).select_by_value("")
    by_id(browser, "generate").click()
    wait_for_images(browser, before + 1)
    assert not by_id(browser, "error").is_displayed()


def test_an_error_event_in_the_stream_is_shown(pipe, browser):
    """A request past the server's timeout ends its stream with `event: error`: the page shows it."""
    from selenium.webdriver.support.ui import Select

    with ServerThread(pipe, timeout_s=0.2) as short:  # 200 steps at 64x64 take seconds on a CPU
        open_page(browser, short.url)
        wait(browser).until(lambda d: len(d.find_elements("css selector", "#size option[value='64x64']")) == 1)
        fill(browser, "prompt", "a 6")
        fill(browser, "steps", "200")
        Select(by_id(browser, "size")).select_by_value("64x64")
        before = len(gallery_images(browser))
        by_id(browser, "generate").click()
        error = by_id(browser, "error")
        wait(browser, GENERATE_S).until(lambda d: error.is_displayed())
        assert "took longer than" in error.text, error.text
        assert by_id(browser, "progress").get_attribute("data-state") == "error"
        assert len(gallery_images(browser)) == before and by_id(browser, "generate").is_enabled()
