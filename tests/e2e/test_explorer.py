"""The routing explorer (GET /explorer) in a real browser: Debian's chromium, headless, driven by selenium through
chromium-driver, against a real `moe-serve serve` with an API key, serving models/bbc-news-moe. The page is used
as a person would (the key typed in, a text classified through the form) and what it draws is checked against
the API's own answers and the model folder's files. Screenshots go to docs/images/ (README shows them)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.e2e.conftest import run_server

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
MODEL = "bbc-news-moe"
KEY = "explorer-test-key"
TEXT = "Shares in the bank rose 5% after profits beat forecasts, and the striker scored twice."
IMAGES = ROOT / "docs" / "images"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")

if CHROMIUM is None or DRIVER is None:
    pytest.skip(
        "no chromium and chromedriver found: install Debian's chromium and chromium-driver (scripts/install-tools.sh)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with run_server(ROOT / "models", log, models=MODEL, api_key=KEY, max_wait_ms=2) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1150"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: WebDriver, condition, timeout: float = 15):  # type: ignore[no-untyped-def]
    return WebDriverWait(driver, timeout).until(lambda d: condition(d) or None)


def api(url: str, path: str, body: dict | None = None) -> dict:
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + path, json=body, headers=headers) if body else httpx.get(url + path, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def open_and_classify(driver: WebDriver, url: str, size: tuple[int, int] = (1280, 1150)) -> dict:
    """Load the page, give it the key, classify TEXT through the form; the API's answer for the same text."""
    driver.set_window_size(*size)
    driver.get(url + "/explorer")
    wait(driver, lambda d: "API key" in d.find_element(By.ID, "status").text)  # 401 until the key is given
    driver.find_element(By.ID, "api-key").send_keys(KEY)
    driver.find_element(By.ID, "use-key").click()
    wait(driver, lambda d: [o.text for o in Select(d.find_element(By.ID, "model")).options] == [MODEL])
    driver.find_element(By.ID, "text").send_keys(TEXT)
    driver.find_element(By.ID, "classify").click()
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#tokens .token"))
    return api(url, "/v1/classify", {"inputs": [TEXT], "return_routing": True})["predictions"][0]


def colour(element) -> str:  # type: ignore[no-untyped-def]
    return element.value_of_css_property("background-color")


def cell_values(driver: WebDriver, box: str) -> list[list[float]]:
    """A heatmap's values by row, read in one script: the live maps are redrawn every 2 s."""
    cells = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(c => [+c.dataset.row, +c.dataset.value])",
        f"#{box} rect.cell",
    )
    rows: dict[int, list[float]] = {}
    for row, value in cells:
        rows.setdefault(row, []).append(value)
    return [rows[i] for i in sorted(rows)]


def assert_chosen_experts(tokens: list, experts: list[list[int]], legend: dict[int, str]) -> None:
    """Each token carries its first (highest-gate) expert and that expert's legend colour."""
    assert len(tokens) == len(experts)
    for t, chosen in zip(tokens, experts, strict=True):
        assert int(t.get_attribute("data-expert")) == chosen[0]
        assert colour(t) == legend[chosen[0]]


def test_tokens_are_coloured_by_their_chosen_expert(server: str, browser: WebDriver) -> None:
    expected = open_and_classify(browser, server)
    routing = expected["routing"]
    rows = browser.find_elements(By.CSS_SELECTOR, "#labels .score-row")
    assert [r.get_attribute("data-label") for r in rows] == [s["label"] for s in expected["scores"]]

    chips = browser.find_elements(By.CSS_SELECTOR, "#legend span")
    legend = {int(s.get_attribute("data-expert")): colour(s) for s in chips}
    assert len(legend) == 8 and len(set(legend.values())) == 8  # one distinct colour per expert
    tokens = browser.find_elements(By.CSS_SELECTOR, "#tokens .token")
    assert [t.text for t in tokens] == routing["tokens"]
    assert_chosen_experts(tokens, routing["layers"][0]["experts"], legend)

    ActionChains(browser).move_to_element(tokens[3]).perform()  # gate weights on hover, every layer
    detail = browser.find_element(By.ID, "token-detail").text
    for layer in routing["layers"]:
        e, g = layer["experts"][3][0], layer["gates"][3][0]
        assert f"expert {e}: gate {g:.3f}" in detail

    Select(browser.find_element(By.ID, "layer-view")).select_by_value("1")
    tokens = browser.find_elements(By.CSS_SELECTOR, "#tokens .token")
    assert_chosen_experts(tokens, routing["layers"][1]["experts"], legend)
    # This model routes whole texts in layer 0 by topic; in layer 1 this two-topic text goes to several experts.
    assert len({colour(t) for t in tokens}) > 1


def test_all_layers_as_a_grid(server: str, browser: WebDriver) -> None:
    routing = open_and_classify(browser, server)["routing"]
    Select(browser.find_element(By.ID, "layer-view")).select_by_value("all")
    columns = browser.find_elements(By.CSS_SELECTOR, "#tokens .column")
    assert [c.find_element(By.CLASS_NAME, "word").text for c in columns] == routing["tokens"]
    for i, column in enumerate(columns):
        cells = column.find_elements(By.CLASS_NAME, "cell")
        want = [layer["experts"][i][0] for layer in routing["layers"]]
        assert [int(c.get_attribute("data-expert")) for c in cells] == want
    browser.save_screenshot(str(IMAGES / "explorer-grid.png"))


def test_heatmaps_show_the_live_and_the_evaluated_routing(server: str, browser: WebDriver) -> None:
    open_and_classify(browser, server)
    # Both classify calls are in; the page refreshes every 2 s, until it shows what the API says.
    live = api(server, f"/v1/models/{MODEL}/routing")
    for box, part in (("heat-total", "since_start"), ("heat-window", "window")):
        want = [layer["share"] for layer in live[part]["layers"]]
        wait(browser, lambda d, box=box, want=want: cell_values(d, box) == want)
        assert all(abs(sum(row) - 1) < 1e-3 for row in want) and len(want[0]) == 8
    stats = browser.find_elements(By.CSS_SELECTOR, "#layer-stats tr[data-layer]")
    assert len(stats) == len(live["since_start"]["layers"])

    folder = ROOT / "models" / MODEL
    profile = json.loads((folder / "routing_profile.json").read_text())
    assert cell_values(browser, "heat-training") == [layer["share"] for layer in profile["layers"]]
    by_class = json.loads((folder / "eval.json").read_text())["expert_by_class"]
    Select(browser.find_element(By.ID, "class-layer")).select_by_value("1")
    assert cell_values(browser, "heat-classes") == list(by_class[1]["share"].values())
    Select(browser.find_element(By.ID, "layer-view")).select_by_value("1")  # the layer where this text's experts vary
    browser.save_screenshot(str(IMAGES / "explorer.png"))


def test_the_key_stays_in_memory_and_a_narrow_window_fits(server: str, browser: WebDriver) -> None:
    open_and_classify(browser, server, size=(400, 1400))
    stored = browser.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]")
    assert stored == [0, 0, ""] and KEY not in browser.current_url
    # One column, nothing wider than the window.
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0
    panel = browser.find_element(By.ID, "classify-panel").rect
    assert browser.find_element(By.ID, "model-panel").rect["y"] >= panel["y"] + panel["height"]
    browser.save_screenshot(str(IMAGES / "explorer-narrow.png"))
