"""The feature browser in a real headless Chromium, served over HTTP by `make browse`'s server.

A screenshot of a feature page is saved under the test's tmp dir, and also as
$DIALBOX_SCREENSHOT_DIR/feature-browser.png when that is set (DIALBOX_SCREENSHOT_DIR=docs/img).
"""

import functools
import json
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from browser_fixtures import browser, check_inert, csp_violations, publish, serving, wait_for  # noqa: F401 (browser: a fixture)
from conftest import make_trained_run, run_stage
from features.report import build_report
from report_fixtures import MARKUP, is_dead, write_site


def report(tmp_path: Path, sites: dict, **fixture) -> Path:
    for site, n in sites.items():
        write_site(tmp_path / "features", site, n, **fixture)
    build_report(tmp_path / "features", tmp_path / "report")
    return tmp_path / "report"


def table_rows(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#feature-table tbody tr")


def test_the_report_opened_from_disk_says_how_to_serve_it(browser, tmp_path):
    root = report(tmp_path / "runs" / "mine", {"L3.resid_post": 20})
    browser.get((root / "index.html").as_uri())  # as a user double-clicks it: file://, where fetch is refused
    assert wait_for(browser, "main h1")[0].text == "This report needs to be served"
    assert "make browse RUN=mine" in browser.find_element(By.TAG_NAME, "main").text


def test_the_index_shows_output_scores_as_percentiles(browser, tmp_path):
    out = write_site(tmp_path / "features", "L3.resid_post", 40)
    scores = [None if is_dead(i) else (i - 20) * 1e-7 for i in range(40)]  # raw shifts in probability, as label writes
    table = pq.read_table(out / "features.parquet").append_column("output_score", pa.array(scores, pa.float64()))
    pq.write_table(table, out / "features.parquet")
    build_report(tmp_path / "features", tmp_path / "report")
    with serving(tmp_path / "report") as base:
        browser.get(base + "#L3.resid_post")
        wait_for(browser, "#feature-table tbody tr")
        # the index opens sorted by output score (the predictor of steering), highest first
        cells = [row.find_elements(By.TAG_NAME, "td") for row in table_rows(browser)]
        assert [(c[0].text, c[6].text) for c in cells[:2]] == [("38", "100"), ("37", "97")]  # 36 scored features
        assert cells[0][6].get_attribute("title").endswith("(percentile 100 of this site)")
        assert cells[0][6].get_attribute("title").startswith("output score 0.0000018")
        assert [(c[0].text, c[6].text) for c in cells[35:37]] == [("0", "0"), ("9", "–")]  # dead ones have none


def test_browse_search_open_follow(browser, tmp_path):
    root = report(tmp_path, {"L3.resid_post": 300, "L5.ffn_out": 40})
    with serving(root) as base:
        browser.get(base)
        sites = wait_for(browser, "main table a")
        assert [a.text for a in sites] == ["L3.resid_post", "L5.ffn_out"]
        assert "300 232 38 30 200,000" in browser.find_element(By.TAG_NAME, "main").text
        sites[0].click()
        wait_for(browser, "#feature-table tbody tr")
        assert len(table_rows(browser)) == 100  # one page, not 300 rows
        assert browser.find_element(By.ID, "page-info").text == "Page 1 of 3 · 300 features"

        browser.find_element(By.ID, "search").send_keys("heaven and")
        WebDriverWait(browser, 5).until(lambda d: len(table_rows(d)) == 38)
        assert {row.find_element(By.CSS_SELECTOR, ".label").text for row in table_rows(browser)} == {"heaven and earth"}
        assert browser.current_url.endswith("#L3.resid_post?q=heaven+and")
        table_rows(browser)[0].find_element(By.CSS_SELECTOR, ".label a").click()

        assert wait_for(browser, "#feature-label")[0].text == "heaven and earth"
        assert browser.find_element(By.ID, "feature-id").text == "L3.resid_post/5"
        page = browser.find_element(By.TAG_NAME, "main").text
        assert "label from heuristic · score 0.6 (detection 0.5, fuzzing 0.7)" in page
        assert "Density 0.289% of 200,000 tokens" in page and "Promoted tokens" in page
        lit = browser.find_elements(By.CSS_SELECTOR, ".contexts .tok.on")
        assert len(lit) == 2 * 4  # the peak and the token after it, in 2 top and 2 quantile contexts
        assert lit[0].text == " the" and lit[0].get_attribute("title") == " the · activation 6"
        # Background opacity follows the activation: the peak opaque, a quarter of it faint.
        assert [t.get_attribute("style") for t in lit[:2]] == [
            "background-color: rgb(255, 120, 0);", "background-color: rgba(255, 120, 0, 0.325);"]
        assert len(browser.find_elements(By.CSS_SELECTOR, "svg.hist rect")) == 8
        browser.find_element(By.ID, "copy-id").click()  # the clipboard answers asynchronously
        WebDriverWait(browser, 5).until(lambda d: d.find_element(By.ID, "copy-id").text in ("Copied", "Press Ctrl+C"))
        screenshot(browser, tmp_path)

        browser.find_element(By.LINK_TEXT, "L3.resid_post/6").click()  # nearest feature
        status = wait_for(browser, ".status.unlabelled")[0]
        assert status.text == "Unlabelled: explainer timed out"
        browser.back()
        browser.back()  # to the index, with its search kept
        WebDriverWait(browser, 5).until(lambda d: len(table_rows(d)) == 38)
        assert csp_violations(browser) == []  # under make browse's Content-Security-Policy header


def screenshot(browser, tmp_path):
    path = tmp_path / "feature-browser.png"
    assert browser.save_screenshot(str(path))
    publish(path)


def test_filter_and_sort(browser, tmp_path):
    root = report(tmp_path, {"L3.resid_post": 300})
    with serving(root) as base:
        browser.get(base)
        wait_for(browser, "#feature-table tbody tr")
        Select(browser.find_element(By.ID, "show")).select_by_value("dead")
        WebDriverWait(browser, 5).until(lambda d: len(table_rows(d)) == 30)
        assert all(row.find_element(By.CSS_SELECTOR, ".label").text == "dead" for row in table_rows(browser))
        browser.find_element(By.LINK_TEXT, "9").click()
        assert wait_for(browser, ".status.dead")[0].text.startswith("Dead: never fired")
        assert not browser.find_elements(By.ID, "feature-label")

        browser.get(base + "#L3.resid_post")
        wait_for(browser, "#feature-table tbody tr")
        browser.find_element(By.CSS_SELECTOR, "button[data-sort=score]").click()  # highest first
        first = table_rows(browser)[0].find_elements(By.TAG_NAME, "td")
        assert first[5].text == "0.85"
        browser.find_element(By.CSS_SELECTOR, "button[data-sort=max_act]").click()
        assert table_rows(browser)[0].find_elements(By.TAG_NAME, "td")[4].text == "17"
        browser.find_element(By.ID, "search").send_keys("L3.resid_post/250")
        WebDriverWait(browser, 5).until(lambda d: table_rows(d)[0].find_element(By.TAG_NAME, "td").text == "250")


def test_corpus_text_renders_as_text(browser, tmp_path):
    """Tokens and labels holding markup show as the characters they are, and nothing runs."""
    labels = {i: MARKUP[i % len(MARKUP)] for i in range(20)}
    root = report(tmp_path, {"L3.resid_post": 20}, tokens=MARKUP, labels=labels)
    with serving(root) as base:
        browser.get(base + "#L3.resid_post")
        wait_for(browser, "#feature-table tbody tr")
        browser.find_element(By.ID, "search").send_keys("<img")
        check_inert(browser, MARKUP[2:4])
        browser.get(base + "#L3.resid_post/1")
        wait_for(browser, ".contexts .tok")
        check_inert(browser, MARKUP)
        assert browser.find_element(By.ID, "feature-label").text == MARKUP[1]


def test_plain_static_server(browser, tmp_path):
    """Any static file server will do: here Python's own http.server, as `python -m http.server`."""
    root = report(tmp_path, {"L3.resid_post": 20})
    plain = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=str(root)))
    with serving(root, plain) as base:
        browser.get(base + "#L3.resid_post/12")
        assert wait_for(browser, "#feature-label")[0].text == "heaven and earth"


@pytest.mark.slow
def test_large_site_opens_in_two_seconds(browser, tmp_path):
    root = report(tmp_path, {"L0.resid_post": 65_536}, examples={"top": 1})
    with serving(root) as base:
        browser.get(base + "#L0.resid_post")
        wait_for(browser, "#feature-table tbody tr", timeout=30)
        # Milliseconds from the start of navigation to the first page of rows on screen.
        opened = browser.execute_script("return performance.getEntriesByName('index-rendered')[0].startTime")
        print(f"65,536-feature index opened in {opened:.0f} ms")
        assert opened < 2000
        assert len(table_rows(browser)) == 100
        assert browser.find_element(By.ID, "page-info").text == "Page 1 of 656 · 65,536 features"
        browser.get(base + "#L0.resid_post/65535")
        assert wait_for(browser, "#feature-id")[0].text == "L0.resid_post/65535"


@pytest.mark.slow
def test_labelled_run_end_to_end(browser, tmp_path):
    """harvest -> train -> label (heuristic) -> report of SmolLM2 on a corpus full of markup, read in Chromium."""
    corpus = tmp_path / "corpus.jsonl"
    markup = [MARKUP[0], MARKUP[2], MARKUP[4]]
    corpus.write_text("".join(json.dumps({"text": f"In the beginning {markup[i % 3]} God created "
                                                  f"{markup[(i + 1) % 3]} the heaven and the earth. " * 4}) + "\n"
                              for i in range(100)))
    runs = make_trained_run(tmp_path / "runs", tokens=4096, data=("data=jsonl", f"data.paths=[{corpus}]"))
    run_stage("pipeline.label", f"run.runs_dir={runs}", "label.output_score=false")  # the markup is under test
    run_stage("pipeline.report", f"run.runs_dir={runs}")

    site = json.loads((runs / "demo" / "report" / "data" / "sites.json").read_text())["sites"][0]
    assert site["site"] == "L3.resid_post" and site["n_labelled"] > 0

    with serving(runs / "demo" / "report") as base:
        browser.get(base)
        wait_for(browser, "#feature-table tbody tr")
        summary = f"{site['n_features']:,} features · {site['n_labelled']:,} labelled"
        assert summary in browser.find_element(By.TAG_NAME, "main").text
        browser.find_element(By.CSS_SELECTOR, "button[data-sort=density]").click()  # densest first: the most contexts
        label = browser.find_element(By.CSS_SELECTOR, "#feature-table .label a")
        label.click()
        wait_for(browser, ".contexts .tok.on")
        assert browser.find_element(By.ID, "feature-id").text.startswith("L3.resid_post/")
        check_inert(browser, markup)
