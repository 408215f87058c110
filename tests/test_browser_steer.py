"""The feature page's Steer panel in headless Chromium, against `make browse`'s report + steering API
(steering/browse.py) over a real SmolLM2 and its SAE.

A screenshot of the panel is saved under the test's tmp dir, and also as
$DIALBOX_SCREENSHOT_DIR/steer-panel.png when that is set (DIALBOX_SCREENSHOT_DIR=docs/img).
"""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from activations.sites import Site
from conftest import SMOL_SITE, compose_config, live_feature
from features.report import build_report
from features.report_server import make_server
from pipeline.browse import load_steerer
from report_fixtures import write_site
from steering.feature_vectors import max_activations
from steering.browse import browse_server
from browser_fixtures import browser, check_inert, csp_violations, publish, serving, wait_for  # noqa: F401 (fixture)

HOSTILE = '<img src=x onerror=window.pwned=1> <b>bold</b> ' * 6


@pytest.fixture(scope="module")
def steer_report(smol_steerer, tmp_path_factory):
    """A report of the SAE's site, the live feature calibrated to add at 6x its max activation on the prompt."""
    tmp = tmp_path_factory.mktemp("steer_report")
    live = live_feature(smol_steerer, SMOL_SITE)
    out = write_site(tmp / "features", SMOL_SITE, smol_steerer.sae(Site.parse(SMOL_SITE)).cfg.d_sae)
    table = pq.read_table(out / "features.parquet")
    n = table.num_rows
    table = (table.append_column("steer_op", pa.array(["add" if i == live else None for i in range(n)]))
             .append_column("steer_scale", pa.array([6.0 if i == live else None for i in range(n)]))
             .append_column("steer_units", pa.array(["max_act" if i == live else None for i in range(n)]))
             .append_column("steer_positions", pa.array(["prompt" if i == live else None for i in range(n)])))
    pq.write_table(table, out / "features.parquet")
    build_report(tmp / "features", tmp / "report")
    return tmp / "report", live


def steer(browser, prompt: str, tokens: int) -> tuple[str, str]:
    box = browser.find_element(By.ID, "steer-prompt")
    box.clear()
    box.send_keys(prompt)
    count = browser.find_element(By.ID, "steer-tokens")
    count.clear()
    count.send_keys(str(tokens))
    browser.find_element(By.ID, "steer-go").click()
    WebDriverWait(browser, 120).until(lambda d: d.find_element(By.ID, "steer-go").is_enabled() and (
        d.find_element(By.ID, "steer-steered").text or d.find_element(By.ID, "steer-status").text))
    assert browser.find_element(By.ID, "steer-status").text == ""
    return (browser.execute_script("return document.getElementById('steer-plain').textContent"),
            browser.execute_script("return document.getElementById('steer-steered').textContent"))


def test_steer_from_the_feature_page_side_by_side(browser, smol, steer_report, tmp_path):
    root, live = steer_report
    maxes, _ = max_activations(smol.run, SMOL_SITE, smol.sae(Site.parse(SMOL_SITE)))
    other = int(maxes.argsort()[-2])  # the second most active feature: clamping it means something
    with serving(root, browse_server(smol, root, port=0, max_tokens=32)) as base:
        browser.get(f"{base}#{SMOL_SITE}/{live}")
        wait_for(browser, "#steer-prompt")
        assert Select(browser.find_element(By.CSS_SELECTOR, ".steer-op")).first_selected_option.text == "add"
        assert browser.find_element(By.CSS_SELECTOR, ".steer-scale").get_attribute("value") == "6"  # calibrated
        prompt = "Tell me about the sea."
        plain, steered = steer(browser, prompt, 12)
        assert plain == smol.generate(prompt, (), max_new_tokens=12, chat=False)[0].text
        ours = [{"feature": f"{SMOL_SITE}/{live}", "op": "add", "scale": 6, "units": "max_act", "positions": "prompt"}]
        assert steered == smol.generate(prompt, ours, max_new_tokens=12, chat=False)[0].text != plain

        browser.find_element(By.ID, "steer-more").click()  # composition: a second feature
        second = browser.find_elements(By.CSS_SELECTOR, ".steer-row")[1]
        second.find_element(By.CSS_SELECTOR, ".steer-feature").send_keys(f"{SMOL_SITE}/{other}")
        Select(second.find_element(By.CSS_SELECTOR, ".steer-op")).select_by_value("clamp")
        second.find_element(By.CSS_SELECTOR, ".steer-scale").send_keys("2")
        _, both = steer(browser, prompt, 12)
        composed = ours + [{"feature": f"{SMOL_SITE}/{other}", "op": "clamp", "scale": 2}]
        assert both == smol.generate(prompt, composed, max_new_tokens=12, chat=False)[0].text
        screenshot(browser, tmp_path)
        assert csp_violations(browser) == []


def test_a_hostile_continuation_renders_as_text(browser, smol, steer_report):
    root, live = steer_report
    with serving(root, browse_server(smol, root, port=0, max_tokens=32)) as base:
        browser.get(f"{base}#{SMOL_SITE}/{live}")
        wait_for(browser, "#steer-prompt")
        plain, _ = steer(browser, HOSTILE, 16)
        assert plain == smol.generate(HOSTILE, (), max_new_tokens=16, chat=False)[0].text
        assert "<" in plain  # the model carried the markup on
        check_inert(browser, [plain.strip().splitlines()[0]])


def test_a_static_copy_says_how_to_start_the_api(browser, steer_report):
    root, live = steer_report
    with serving(root, make_server(root, port=0)) as base:
        browser.get(f"{base}#{SMOL_SITE}/{live}")
        hint = wait_for(browser, "#steer-hint")[0]
        WebDriverWait(browser, 10).until(lambda d: "make browse" in hint.text)
        assert not browser.find_elements(By.ID, "steer-go")


def screenshot(browser, tmp_path):
    panel = browser.find_element(By.ID, "steer")
    browser.execute_script("arguments[0].scrollIntoView()", panel)
    path = tmp_path / "steer-panel.png"
    assert panel.screenshot(str(path))
    publish(path)


def test_browse_falls_back_to_the_static_report_when_the_model_cannot_load(tmp_path, capsys):
    assert load_steerer(compose_config("report", [f"run.runs_dir={tmp_path}", "run.run_name=nothing"])) is None
    assert "steering off, the run's model did not load" in capsys.readouterr().out
