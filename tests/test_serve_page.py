"""The ``ghostmatch serve`` page in headless Chromium (Debian's chromium and chromedriver,
driven by Selenium): upload a photo, see the expected first result, search by a result,
open the duplicates view, trash a copy and undo it; a file named like an HTML tag shows as
text. A screenshot of each step is saved in the test's tmp folder."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_support import XSS_NAME, Indexed, Server, build_index, jpeg, model_env, serving

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="chromium and chromedriver are not installed "
        "(apt-get install chromium chromium-driver)",
    ),
    pytest.mark.usefixtures("shared_model_cache"),
]

# Hands the page a JPEG (base64) as a file dropped on the drop zone or pasted.
DROP_OR_PASTE = """
const [data, kind, name] = arguments;
const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
const options = { bubbles: true, cancelable: true };
if (kind === "drop") {
  document.getElementById("drop").dispatchEvent(
    new DragEvent("drop", { ...options, dataTransfer: transfer }));
} else {
  document.dispatchEvent(new ClipboardEvent("paste", { ...options, clipboardData: transfer }));
}
"""

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
]


@pytest.fixture(scope="module")
def indexed(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Indexed]:
    with model_env(model_cache):
        yield build_index(tmp_path_factory.mktemp("page"))


@pytest.fixture(scope="module")
def server(indexed: Indexed, model_cache: Path) -> Iterator[Server]:
    with model_env(model_cache), serving(indexed.index) as running:
        yield running


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, condition: Any, timeout: float = 120) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def texts(driver: Any, selector: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, selector)]


def no_alert(driver: Any) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        driver.switch_to.alert  # noqa: B018 (raises when there is none)
    except NoAlertPresentException:
        return True
    return False


def test_search_review_trash_and_undo_in_a_browser(
    browser: Any, server: Server, indexed: Indexed, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    f = indexed.files
    shots = tmp_path / "screenshots"
    shots.mkdir()
    browser.get(server.url + "/")
    wait_for(browser, lambda d: "images in" in d.find_element(By.ID, "summary").text)

    # Pick a photo that is not indexed: a smaller rocket; the indexed rocket comes first.
    photo = tmp_path / "my rocket.jpg"
    photo.write_bytes(jpeg("rocket", (320, 213), quality=80))
    browser.find_element(By.ID, "file-input").send_keys(str(photo))
    wait_for(browser, lambda d: texts(d, "#results .card .path")[:1] == [str(f["rocket"])])
    assert browser.find_element(By.ID, "query-name").text == "my rocket.jpg"
    browser.save_screenshot(str(shots / "1-search.png"))

    # Search by the coffee's copy, whose name is an HTML tag: it shows as text.
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    xss_path = str(f["coffee-copy"])
    target = next(c for c in cards if c.find_element(By.CLASS_NAME, "path").text == xss_path)
    target.click()
    wait_for(browser, lambda d: d.find_element(By.ID, "query-name").text == xss_path)
    wait_for(browser, lambda d: texts(d, "#results .card .path")[:1] == [str(f["coffee"])])
    assert XSS_NAME in browser.find_element(By.ID, "query-name").text
    assert browser.find_elements(By.CSS_SELECTOR, "img[src='x']") == []
    assert no_alert(browser)
    browser.save_screenshot(str(shots / "2-search-by-result.png"))

    # Drop a photo, then paste one (the page gets a File either way).
    chelsea = base64.b64encode(jpeg("chelsea", (300, 200), quality=85)).decode()
    for event, name in (("drop", "dropped.jpg"), ("paste", "pasted.jpg")):
        browser.execute_script(DROP_OR_PASTE, chelsea, event, name)
        wait_for(browser, lambda d, n=name: d.find_element(By.ID, "query-name").text == n)
        wait_for(browser, lambda d: texts(d, "#results .card .path")[:1] == [str(f["chelsea"])])

    # The duplicates view: the kept astronaut beside its copy; trash the copy, then undo.
    browser.find_element(By.ID, "tab-dupes").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".group")) == 2)
    group = next(
        g
        for g in browser.find_elements(By.CSS_SELECTOR, ".group")
        if g.find_element(By.CSS_SELECTOR, ".card.kept .path").text == str(f["astronaut"])
    )
    copies = [e.text for e in group.find_elements(By.CSS_SELECTOR, ".card:not(.kept) .path")]
    assert copies == [str(f["astronaut-copy"])]
    label = group.find_element(By.CSS_SELECTOR, ".card:not(.kept) .label").text
    assert "exact" in label.lower()
    browser.save_screenshot(str(shots / "3-duplicates.png"))
    group.find_element(By.CLASS_NAME, "trash").click()
    undo = wait_for(browser, lambda d: group.find_elements(By.CLASS_NAME, "undo"))[0]
    assert not f["astronaut-copy"].exists() and f["astronaut"].exists()
    assert "trashed 1 copy" in browser.find_element(By.ID, "status").text
    assert group.find_elements(By.CSS_SELECTOR, ".card.missing .path")[0].text == copies[0]
    browser.save_screenshot(str(shots / "4-trashed.png"))
    undo.click()
    wait_for(browser, lambda d: "restored 1 file" in d.find_element(By.ID, "status").text)
    assert f["astronaut-copy"].exists()
    assert group.find_elements(By.CSS_SELECTOR, ".card.missing") == []
    assert no_alert(browser)

    # The coffee group: keep the copy instead, then say the two are not duplicates.
    coffee = next(
        g
        for g in browser.find_elements(By.CSS_SELECTOR, ".group")
        if g.find_element(By.CSS_SELECTOR, ".card.kept .path").text == str(f["coffee"])
    )
    coffee.find_element(By.CLASS_NAME, "keep-instead").click()
    kept = coffee.find_element(By.CSS_SELECTOR, ".card.kept .path").text
    assert kept == str(f["coffee-copy"])
    coffee.find_element(By.CLASS_NAME, "not-dup").click()
    wait_for(browser, lambda d: "not a duplicate" in d.find_element(By.ID, "status").text)
    assert coffee.find_elements(By.CSS_SELECTOR, ".card:not(.kept)") == []
    with server.client() as c:
        keeps = {g["keep"]["path"] for g in c.get("/api/v1/duplicates").json()["groups"]}
    assert keeps == {str(f["astronaut"])}  # stored: the pair is no longer grouped
    browser.save_screenshot(str(shots / "5-undone.png"))
    print(f"screenshots: {shots}")


def test_the_api_docs_render_without_a_network(
    browser: Any, server: Server, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/docs")
    wait_for(
        browser,
        lambda d: any("/api/v1/query" in t for t in texts(d, ".opblock-summary-path")),
    )
    assert "ghostmatch" in browser.find_element(By.CSS_SELECTOR, ".info .title").text
    browser.save_screenshot(str(tmp_path / "docs.png"))
