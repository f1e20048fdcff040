"""The web page in a real headless Chromium against the real gateway, model server and Redis.

The model is the session's ``published_model`` copied as versions 1 and 2 of a private registry, so the operator panel
has an A/B split to steer; the model server's config labels them ``stable`` (1) and ``canary`` (2). Screenshots land in var/screenshots/ (gitignored) as test artifacts."""
from __future__ import annotations

import contextlib
import csv
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.support.ui import Select, WebDriverWait as SeleniumWait

from devstack.servers import start_gateway
from tests.model_server_harness import start_server, stop_server, write_config
from tests.support import RedisServer, stop_process
from training_job.paths import PROJECT_ROOT


class WebDriverWait(SeleniumWait):
    """Selenium's wait, retrying through an element gone stale too: the page re-renders its live parts (the status
    rows, the audit, the weights after a change) while a condition reads them."""

    def __init__(self, driver, timeout: float, **kwargs):
        super().__init__(driver, timeout, ignored_exceptions=(StaleElementReferenceException,), **kwargs)


ADMIN_TOKEN = "web-test-token"
LABELS = {"stable": 1, "canary": 2}  # version_labels in the model server's config
MODEL = "mushrooms"
SCREENSHOTS = PROJECT_ROOT / "var" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


class Gateway:
    def __init__(self, url: str, process: subprocess.Popen, log_file: Path):
        self.url, self.process, self.log_file = url, process, log_file

    def api(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
            token: str | None = None):
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited: {self.log_file.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            time.sleep(0.2)
        raise TimeoutError(f"the gateway was not ready after {timeout}s: {self.log_file.read_text()[-2000:]}")

    def classify(self, photo: Path, top_k: int = 3) -> dict:
        return self.classify_bytes(photo.read_bytes(), top_k)

    def classify_bytes(self, photo: bytes, top_k: int = 3) -> dict:
        status, answer = self.api("POST", f"/v1/classify?top_k={top_k}", photo, "application/octet-stream")
        assert status == 200, answer
        return answer


@pytest.fixture(scope="module")
def stack(published_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("web-stack")
    models_dir = root / "models"
    for version in (1, 2):
        shutil.copytree(published_model.version_dir, models_dir / MODEL / str(version))
    config = root / "models.config"
    write_config(config, {MODEL: models_dir / MODEL}, labels={MODEL: LABELS}, policy="all {}")
    redis = RedisServer().start()
    server = start_server(models_dir, config)
    process, http_port, _, log_file = start_gateway(
        server.grpc_target, redis.url, MODEL, f"--model-base-path={models_dir / MODEL}",
        env={"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}, log_file=root / "gateway.log")
    try:
        gateway = Gateway(f"http://127.0.0.1:{http_port}", process, log_file)
        gateway.wait_ready()
        manifest = list(csv.DictReader(open(published_model.version_dir / "assets.extra" / "manifest.csv")))
        yield gateway, manifest
    finally:
        stop_process(process)
        stop_server(server)
        redis.stop()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("chromium and chromium-driver are missing: run scripts/setup.sh (apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="chromium-web-test-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={profile}", "--window-size=1100,1400"):
        options.add_argument(flag)
    # An explicit driver path keeps Selenium Manager from downloading anything.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(stack, browser, request):
    gateway, _ = stack
    browser.get(gateway.url + "/")
    WebDriverWait(browser, 15).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    yield browser
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / f"{request.node.name}.png"))


def wait_text(driver, element_id: str, predicate=bool, timeout: float = 30):
    return WebDriverWait(driver, timeout).until(
        lambda d: (lambda t: t if predicate(t) else None)(d.find_element(By.ID, element_id).text))


def shared_photo(manifest, label: str) -> Path:
    row = next(r for r in manifest if r["label"] == label and r["split"] == "train")
    return Path(row["path"])


def test_the_feedback_choices_are_the_classes_of_the_version_that_answered(page):
    # the page's own module, as the browser loaded it: versions of different classes (this stack's two share theirs)
    choices = page.execute_async_script("""const done = arguments[arguments.length - 1];
        import('/static/app.js').then((app) => done([2, 3].map((version) => app.labelsOf({ models: [{ name: 'm',
          versions: [{ version: 1, labels: ['amanita_muscaria', 'boletus_edulis'] },
                     { version: 2, labels: [{ label: 'amanita_vaginata', display_name: 'Grisette' }] }] }] },
          version))));""")
    assert choices == [[{"label": "amanita_vaginata", "display_name": "Grisette"}], []]


def test_upload_shows_the_species_the_api_answers(stack, page):
    gateway, manifest = stack
    photo = shared_photo(manifest, "amanita_muscaria")
    page.find_element(By.ID, "photo-input").send_keys(str(photo))
    wait_text(page, "result-meta")
    answer = gateway.classify(photo)  # a cache hit of the page's own request: the same answer
    top = answer["predictions"][0]
    assert top["label"] == "amanita_muscaria"
    assert (top.get("display_name") or top["label"]) in page.find_element(By.ID, "verdict").text
    shown = [li.get_attribute("data-label") for li in page.find_elements(By.CSS_SELECTOR, "#predictions li")]
    assert shown == [p["label"] for p in answer["predictions"]]
    meta = page.find_element(By.ID, "result-meta").text
    assert f"version {answer['model']['version']}" in meta
    # the feedback choices: every class of the version that answered (the gateway refuses any other label)
    listed = next(v["labels"] for v in gateway.api("GET", "/v1/models")[1]["models"][0]["versions"]
                  if v["version"] == answer["model"]["version"])
    options = [o.get_attribute("value") for o in page.find_elements(By.CSS_SELECTOR, "#feedback-true option")]
    assert options == [label["label"] for label in listed] and len(options) > len(answer["predictions"])
    page.find_element(By.ID, "feedback-right").click()
    assert "recorded" in wait_text(page, "feedback-status")


def test_a_non_image_gives_a_readable_error(stack, page, tmp_path):
    gateway, _ = stack
    not_a_photo = tmp_path / "notes.txt"
    not_a_photo.write_text("this is not a photo of anything\n")
    page.find_element(By.ID, "photo-input").send_keys(str(not_a_photo))
    WebDriverWait(page, 15).until(lambda d: d.find_element(By.ID, "upload-error").is_displayed())
    status, answer = gateway.api("POST", "/v1/classify", not_a_photo.read_bytes(), "application/octet-stream")
    assert 400 <= status < 500
    assert page.find_element(By.ID, "upload-error").text == answer["error"]["message"]
    assert page.find_element(By.ID, "result-layout").is_displayed() is False


# ------------------------------------------------------------------------------------------- answers arriving late
class HoldingProxy:
    """An HTTP proxy in front of the gateway that holds the answer to a request until the test releases it, so that
    answers reach the page in the order a test chooses, as slow answers do. ``hold(matches)`` holds the first
    request ``matches(path, body)`` picks from then on."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self._holds: list[Held] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                held = proxy._take(self.path, body)
                headers = {name: self.headers[name] for name in ("Content-Type", "X-Client-Id", "Authorization")
                           if self.headers[name]}
                request = urllib.request.Request(proxy.upstream + self.path, data=body or None, method=self.command,
                                                 headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        status, answer, reply_headers = response.status, response.read(), response.headers
                except urllib.error.HTTPError as error:
                    status, answer, reply_headers = error.code, error.read(), error.headers
                if held is not None:
                    held.arrived.set()
                    assert held.released.wait(60), "the test never released a held answer"
                self.send_response(status)
                for name in ("Content-Type", "Retry-After"):
                    if reply_headers[name]:
                        self.send_header(name, reply_headers[name])
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
                if held is not None:
                    held.answered.set()

            do_GET = do_POST = do_PUT = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def hold(self, matches) -> "Held":
        held = Held(matches)
        with self._lock:
            self._holds.append(held)
        return held

    def _take(self, path: str, body: bytes) -> "Held | None":
        with self._lock:
            for held in self._holds:
                if held.matches(path, body):
                    self._holds.remove(held)
                    return held
        return None

    def stop(self) -> None:
        with self._lock:
            for held in self._holds:
                held.released.set()
        self.server.shutdown()
        self.server.server_close()


class Held:
    """One held answer: ``arrived`` once the gateway answered it, ``released`` by the test, ``answered`` once the
    page has it."""

    def __init__(self, matches):
        self.matches = matches
        self.arrived, self.released, self.answered = threading.Event(), threading.Event(), threading.Event()

    def release(self) -> None:
        self.released.set()
        assert self.answered.wait(30), "the held answer did not reach the page"
        time.sleep(1)  # for the page's script to do whatever it does with it


def classify_of(name_start: str):
    return lambda path, body: path.startswith("/v1/classify") and f'filename="{name_start}'.encode() in body


def explain_request(path: str, body: bytes) -> bool:
    return path.startswith("/v1/classify") and "explain" in path


@pytest.fixture(scope="module")
def proxy(stack):
    gateway, _ = stack
    holding = HoldingProxy(gateway.url)
    yield holding
    holding.stop()


@pytest.fixture
def held_page(proxy, browser, request):
    """The page, loaded through the proxy."""
    browser.get(proxy.url + "/")
    WebDriverWait(browser, 15).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    yield browser
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / f"{request.node.name}.png"))


def named_copies(stack, tmp_path, **labels: str) -> dict[str, tuple[Path, str]]:
    """{name: (a copy, named ``name``.jpg, of a training photo of the class labelled ``labels[name]``, the verdict the
    page shows for it)}. Photos of different classes must get different verdicts, so that the verdict on the page
    tells which photo it answers."""
    gateway, manifest = stack
    photos = {}
    for index, (name, label) in enumerate(labels.items()):
        row = [r for r in manifest if r["label"] == label and r["split"] == "train"][index]
        copy = tmp_path / f"{name}.jpg"
        shutil.copy(row["path"], copy)
        top = gateway.classify(copy)["predictions"][0]
        photos[name] = copy, top.get("display_name") or top["label"]
    assert len({verdict for _, verdict in photos.values()}) == len(set(labels.values())), photos
    return photos


def showing(driver, verdict: str, timeout: float = 30) -> None:
    WebDriverWait(driver, timeout).until(
        lambda d: verdict in d.find_element(By.ID, "verdict").text and d.find_element(By.ID, "result-meta").text)


def test_progress_is_visible_while_the_first_photo_is_classified(stack, proxy, held_page, tmp_path):
    photos = named_copies(stack, tmp_path, slow_first="amanita_muscaria")
    held = proxy.hold(classify_of("slow_"))
    held_page.find_element(By.ID, "photo-input").send_keys(str(photos["slow_first"][0]))
    assert held.arrived.wait(30)
    progress = [e.text for e in held_page.find_elements(By.CSS_SELECTOR, "#upload *")
                if e.is_displayed() and "Classifying" in e.text]
    held.release()
    assert progress, "nothing on the page says the photo is being classified"
    showing(held_page, photos["slow_first"][1])


def test_a_slow_answer_to_an_earlier_photo_does_not_replace_the_later_ones(stack, proxy, held_page, tmp_path):
    photos = named_copies(stack, tmp_path, slow_boletus="boletus_edulis", fast_amanita="amanita_muscaria")
    held = proxy.hold(classify_of("slow_"))
    held_page.find_element(By.ID, "photo-input").send_keys(str(photos["slow_boletus"][0]))
    assert held.arrived.wait(30)
    held_page.find_element(By.ID, "photo-input").send_keys(str(photos["fast_amanita"][0]))
    showing(held_page, photos["fast_amanita"][1])
    held.release()
    assert photos["fast_amanita"][1] in held_page.find_element(By.ID, "verdict").text


def test_why_is_drawn_only_over_the_photo_it_explains(stack, proxy, held_page, tmp_path):
    """An explanation asked for photo A that arrives once photo B was chosen is dropped; choosing a photo hides the
    previous photo's explanation at once."""
    photos = named_copies(stack, tmp_path, first="amanita_muscaria", slow_second="boletus_edulis",
                          slow_third="amanita_muscaria")
    why = lambda: held_page.find_element(By.ID, "why")  # noqa: E731
    held_page.find_element(By.ID, "photo-input").send_keys(str(photos["first"][0]))
    showing(held_page, photos["first"][1])
    explanation = proxy.hold(explain_request)
    held_page.find_element(By.ID, "why-button").click()
    assert explanation.arrived.wait(60)
    second = proxy.hold(classify_of("slow_second"))
    held_page.find_element(By.ID, "photo-input").send_keys(str(photos["slow_second"][0]))
    assert second.arrived.wait(30)
    explanation.release()  # A's, while B is being classified
    assert not why().is_displayed(), "the first photo's explanation is shown over the second photo's turn"
    second.release()
    showing(held_page, photos["slow_second"][1])
    assert not why().is_displayed() and not why().find_elements(By.CSS_SELECTOR, "figure")
    held_page.find_element(By.ID, "why-button").click()  # B's own explanation, over B
    WebDriverWait(held_page, 60).until(lambda d: why().is_displayed())
    assert why().find_element(By.CSS_SELECTOR, ".heatmap-frame img").get_attribute("src") == \
        held_page.find_element(By.ID, "upload-preview").get_attribute("src")
    third = proxy.hold(classify_of("slow_third"))
    held_page.find_element(By.ID, "photo-input").send_keys(str(photos["slow_third"][0]))
    assert third.arrived.wait(30)
    hidden_at_once = not why().is_displayed()
    third.release()
    assert hidden_at_once, "B's explanation stayed on screen while another photo was being classified"


def test_slideshow_accuracy_matches_the_api(stack, page):
    gateway, manifest = stack
    status, demo = gateway.api("GET", "/v1/demo")
    assert status == 200
    photos = demo if isinstance(demo, list) else demo["photos"]
    assert photos, "the published model has no demo photos"
    Select(page.find_element(By.ID, "slide-batch")).select_by_visible_text("4")
    steps = 2
    for i in range(steps):
        page.find_element(By.ID, "slide-step").click()
        wait_text(page, "slide-progress", lambda t, n=4 * (i + 1): f"classified so far: {n}" in t)
    seen = [photos[i % len(photos)] for i in range(4 * steps)]
    # Both versions serve the same model, so the labels (not the version split) are what the API decides.
    right = 0
    for photo in seen:
        photo_bytes = urllib.request.urlopen(gateway.url + f"/v1/demo/photos/{photo['sha256']}").read()
        answer = gateway.classify_bytes(photo_bytes, top_k=1)
        right += answer["predictions"][0]["label"] == photo["label"]
    rows = page.find_elements(By.CSS_SELECTOR, "#slide-stats tr:not([data-version=all])")
    shown_n = sum(int(r.find_element(By.CLASS_NAME, "n").text) for r in rows)
    shown_right = sum(int(r.find_element(By.CLASS_NAME, "correct").text) for r in rows)
    assert (shown_n, shown_right) == (len(seen), right)
    overall = rows[0] if len(rows) == 1 else page.find_element(By.CSS_SELECTOR, '#slide-stats tr[data-version="all"]')
    assert overall.find_element(By.CLASS_NAME, "accuracy").text == f"{100 * right / len(seen):.1f}%"
    assert overall.find_element(By.CLASS_NAME, "error-rate").text == f"{100 - 100 * right / len(seen):.1f}%"
    wrong = len(seen) - right
    assert len(page.find_elements(By.CSS_SELECTOR, "#slide-misses li")) == wrong


def test_operator_changes_weights_and_the_routing_api_reports_them(stack, page):
    gateway, manifest = stack
    gateway.classify(shared_photo(manifest, "boletus_edulis"))  # the status table lists versions that answered
    page.find_element(By.ID, "admin-token").send_keys(ADMIN_TOKEN + "\n")
    WebDriverWait(page, 15).until(lambda d: d.find_element(By.ID, "operator-body").is_displayed())
    WebDriverWait(page, 15).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#weights input[type=range]"))
    wanted = {"1": 0.7, "2": 0.3}
    for version, weight in wanted.items():
        slider = page.find_element(By.ID, f"weight-{version}")
        page.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                            slider, str(weight))
    page.find_element(By.ID, "routing-apply").click()
    wait_text(page, "routing-status", lambda t: t == "Applied.")
    status, routing = gateway.api("GET", "/v1/admin/routing", token=ADMIN_TOKEN)
    assert status == 200
    weights = routing["weights"]
    if isinstance(weights, list):
        weights = {str(w["version"]): w["weight"] for w in weights}
    assert {str(k): pytest.approx(float(v)) for k, v in weights.items()} == wanted
    wait_text(page, "audit")
    wait_text(page, "status-rows")
    # The latency a rollout judges (cache misses only) is shown beside the p95 of every answer.
    figures = gateway.api("GET", "/v1/admin/status", token=ADMIN_TOKEN)[1]["versions"]
    shown = {row.get_attribute("data-version"): row.find_element(By.CLASS_NAME, "miss-p95").text
             for row in page.find_elements(By.CSS_SELECTOR, "#status-rows tr")}
    assert shown == {v: "–" if f["miss_p95_ms"] is None else f"{f['miss_p95_ms']:.1f}" for v, f in figures.items()}


def unlock_operator(page):
    field = page.find_element(By.ID, "admin-token")
    field.clear()  # the token may already be there from sessionStorage
    field.send_keys(ADMIN_TOKEN + "\n")
    WebDriverWait(page, 15).until(lambda d: d.find_element(By.ID, "operator-body").is_displayed())
    WebDriverWait(page, 15).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#weights input[type=range]"))


def set_slider(page, entry: str, weight: float) -> None:
    slider = page.find_element(By.ID, f"weight-{entry}")
    page.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                        slider, str(weight))


def test_operator_shows_labels_with_their_versions_adds_one_and_sends_labels_back(stack, page):
    gateway, _ = stack
    table = {"weights": {"stable": 80, "2": 20}, "shadow": "canary"}  # as `admin set stable=80 2=20 shadow=canary`
    status, body = gateway.api("PUT", "/v1/admin/routing", json.dumps(table).encode(), "application/json",
                               token=ADMIN_TOKEN)
    assert status == 200, body
    page.get(gateway.url + "/")
    WebDriverWait(page, 15).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    unlock_operator(page)

    def label_text(entry):
        return page.find_element(By.ID, f"weight-{entry}-label").text

    # A label is shown as a label with the version it resolves to, never as "Version stable".
    WebDriverWait(page, 15).until(lambda d: label_text("stable") == "stable → v1")
    assert "Version stable" not in page.find_element(By.ID, "weights").text
    assert (label_text("1"), label_text("2")) == ("Version 1", "Version 2")
    values = {e: page.find_element(By.ID, f"weight-{e}").get_attribute("value") for e in ("stable", "1", "2")}
    assert {e: float(v) for e, v in values.items()} == {"stable": 0.8, "1": 0.0, "2": 0.2}  # shares of 80/20
    assert "canary → v2" in page.find_element(By.ID, "shadow-info").text

    # A name TF Serving would refuse is refused here, naming the rule; nothing is added.
    new_label = page.find_element(By.ID, "new-label")
    new_label.send_keys("canary-b")
    page.find_element(By.ID, "add-label").click()
    error = page.find_element(By.ID, "new-label-error")
    assert error.is_displayed() and "[a-zA-Z0-9_]+" in error.text
    assert not page.find_elements(By.ID, "weight-canary-b")
    # Enter in the field adds the label (and does not apply the weights).
    new_label.clear()
    new_label.send_keys("canary\n")
    WebDriverWait(page, 5).until(lambda d: d.find_elements(By.ID, "weight-canary"))
    assert not page.find_element(By.ID, "new-label-error").is_displayed()
    assert label_text("canary") == "canary → v2"  # already resolved by the gateway, as the shadow
    assert page.find_element(By.ID, "routing-status").text == ""
    assert gateway.api("GET", "/v1/admin/routing", token=ADMIN_TOKEN)[1]["weights"] == {"2": 20.0, "stable": 80.0}

    for entry, weight in {"stable": 0.5, "canary": 0.3, "2": 0.2}.items():
        set_slider(page, entry, weight)
    page.find_element(By.ID, "routing-apply").click()
    wait_text(page, "routing-status", lambda t: t == "Applied.")
    status, routing = gateway.api("GET", "/v1/admin/routing", token=ADMIN_TOKEN)
    assert status == 200
    # Labels went back as labels (not as the versions they resolve to), and the shadow label unchanged.
    assert routing["weights"] == {"2": pytest.approx(0.2), "canary": pytest.approx(0.3), "stable": pytest.approx(0.5)}
    assert routing["shadow"] == "canary"
    assert routing["resolved"] == {"2": 2, "canary": 2, "stable": 1}
    WebDriverWait(page, 15).until(lambda d: (label_text("canary"), label_text("stable")) == ("canary → v2",
                                                                                          "stable → v1"))
    # Live figures: the share each version gets now, and through which labels; the audit shows the labels as set.
    share_of_2 = lambda d: d.find_element(By.CSS_SELECTOR, '#status-rows tr[data-version="2"] .share').text  # noqa: E731
    WebDriverWait(page, 15).until(lambda d: share_of_2(d) == "50.0% (canary)")
    newest = WebDriverWait(page, 15).until(lambda d: (items := d.find_elements(By.CSS_SELECTOR, "#audit li"))
                                           and items[0].text)
    assert '"canary":0.3' in newest and '"stable":0.5' in newest, newest
    assert "[object Object]" not in page.find_element(By.ID, "status-rows").text


def test_wrong_admin_token_is_a_readable_error(stack, page):
    page.find_element(By.ID, "token-forget").click()
    page.find_element(By.ID, "admin-token").send_keys("not-the-token\n")
    WebDriverWait(page, 15).until(lambda d: d.find_element(By.ID, "operator-error").is_displayed())
    assert "Not authorised" in page.find_element(By.ID, "operator-error").text


def test_usable_at_phone_width(stack, page):
    page.set_window_size(390, 844)
    try:
        page.refresh()
        WebDriverWait(page, 15).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        overflow = page.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.save_screenshot(str(SCREENSHOTS / "phone_width.png"))
        assert overflow <= 0, f"the page scrolls sideways by {overflow}px at phone width"
        for control in ("photo-input", "slide-start", "admin-token"):
            label = page.find_elements(By.CSS_SELECTOR, f'label[for="{control}"]')
            assert label or page.find_element(By.ID, control).text, f"{control} has no label"
    finally:
        page.set_window_size(1100, 1400)
