"""Headless Chromium for the browser tests (test_browser, test_browser_steer), and the helpers they share."""

import contextlib
import os
import shutil
import threading
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from features.report_server import make_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if missing:
        pytest.fail(f"the browser tests need {' and '.join(missing)}: run `make setup` (installs Debian's chromium)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # where CSP violations are reported
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


@contextlib.contextmanager
def serving(root: Path, server=None):
    """`root` over HTTP on 127.0.0.1 (a free port); yields the base URL."""
    server = server or make_server(root, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def wait_for(driver, css: str, timeout: float = 10):
    """The elements matching `css`, once there are some."""
    return WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))


def csp_violations(browser) -> list[str]:
    """The console's Content-Security-Policy complaints since the last call."""
    return [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]


def check_inert(browser, texts):
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # an alert() that ran would still be open
    visible = browser.find_element(By.TAG_NAME, "main").text
    assert all(text in visible for text in texts)
    assert browser.execute_script("return window.pwned") is None
    assert csp_violations(browser) == []  # nothing even tried to run
    assert browser.find_elements(By.CSS_SELECTOR, "main img, main script, main textarea") == []


def publish(screenshot: Path) -> None:
    """Copy a screenshot a test took into $DIALBOX_SCREENSHOT_DIR when set (DIALBOX_SCREENSHOT_DIR=docs/img)."""
    if os.environ.get("DIALBOX_SCREENSHOT_DIR"):
        target = Path(os.environ["DIALBOX_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, target / screenshot.name)
