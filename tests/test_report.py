"""The report stage: label-stage tables in, the browser's JSON files out (no browser here)."""

import contextlib
import http.client
import json
from pathlib import Path
import socket
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_stage
from features.report import ReportError, build_report, rounded_acts
from features.report_server import make_server
from report_fixtures import MARKUP, WORDS, write_site



def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_report_files(tmp_path):
    write_site(tmp_path / "features", "L5.ffn_out", n=40)
    write_site(tmp_path / "features", "L3.resid_post", n=300)
    out = tmp_path / "report"
    (out / "data" / "L3.resid_post").mkdir(parents=True)
    (out / "data" / "L3.resid_post" / "chunk-9.json").write_text("stale")  # from an older, larger build

    build_report(tmp_path / "features", out, chunk_size=128)

    assert {p.name for p in out.iterdir()} == {"index.html", "app.js", "style.css", "favicon.svg", "data"}
    assert not (tmp_path / "report.partial").exists()
    sites = read(out / "data" / "sites.json")
    assert sites["chunk_size"] == 128
    assert [s["site"] for s in sites["sites"]] == ["L3.resid_post", "L5.ffn_out"]  # by layer
    site = sites["sites"][0]
    assert (site["n_features"], site["n_dead"], site["n_unlabelled"], site["n_labelled"]) == (300, 30, 38, 232)
    assert len(site["hist_edges"]) == 9 and site["tokens_mined"] == 200_000

    index = read(out / "data" / "L3.resid_post" / "index.json")
    assert all(len(column) == 300 for column in index.values())
    assert index["index"][:3] == [0, 1, 2]
    assert (index["dead"][9], index["label"][9], index["score"][9]) == (1, None, None)
    assert (index["dead"][6], index["label"][6]) == (0, None)
    assert index["label"][5] == "heaven and earth" and index["score"][5] == 0.6
    assert index["top"][0] == WORDS[:3] and index["max_act"][16] == 17.0

    data = out / "data" / "L3.resid_post"
    assert sorted(p.name for p in data.glob("chunk-*")) == ["chunk-0.json", "chunk-1.json", "chunk-2.json"]
    chunk = read(data / "chunk-2.json")
    assert [f["index"] for f in chunk] == list(range(256, 300))
    f = chunk[257 - 256]
    assert f["id"] == "L3.resid_post/257" and f["label"] == "heaven and earth" and f["score"] == 0.7
    assert f["logit_pos"] == [[WORDS[5], 3.0], [WORDS[6], 2.0], [WORDS[7], 1.0]]
    assert f["neighbours"] == [[258, 0.9, None], [259, 0.5, None]]  # unlabelled, dead
    assert f["hist_counts"] == [500, 200, 90, 40, 10, 5, 1, 257 % 3]
    top, quantile, random = (f["examples"][k] for k in ("top", "quantile", "random"))
    assert [e["rank"] for e in top] == [0, 1] and [e["quantile"] for e in quantile] == [0, 1]
    assert [e["split"] for e in top] == ["score", "explain"]
    assert top[0]["tokens"] == WORDS and top[0]["acts"][257 % 12] == f["max_act"] == 3.0
    assert random[0]["max_act"] == 0 and not any(random[0]["acts"])
    dead = read(data / "chunk-0.json")[9]
    assert dead["dead"] and dead["label"] is None and dead["examples"] == {"top": [], "quantile": [], "random": []}
    assert read(data / "chunk-0.json")[6]["label_error"] == "explainer timed out"


def test_activations_rounded_to_the_peak():
    table = pa.table({"acts": pa.array([[0.0, 0.1234567, 12.3456789], [0.000123456]], pa.list_(pa.float32())),
                      "max_act": pa.array([12.3456789, 0.000123456], pa.float32())})
    assert rounded_acts(table).to_pylist() == [[0.0, 0.12, 12.35], [0.0001235]]


def test_corpus_text_stays_data(tmp_path):
    write_site(tmp_path / "features", n=12, tokens=MARKUP, labels={0: MARKUP[1]})
    build_report(tmp_path / "features", tmp_path / "report")
    feature = read(tmp_path / "report" / "data" / "L3.resid_post" / "chunk-0.json")[0]
    assert feature["label"] == MARKUP[1] and feature["examples"]["top"][0]["tokens"] == MARKUP
    for page in ("index.html", "app.js"):
        assert "pwned" not in (tmp_path / "report" / page).read_text()


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "examples.parquet").unlink(), "has no examples.parquet: run `make label` for site L3.resid_post"),
    (lambda d: (d / "meta.json").write_text(json.dumps({**read(d / "meta.json"), "site": "L4.resid_post"})),
     "meta.json is for site 'L4.resid_post'"),
    (lambda d: (d / "meta.json").write_text(json.dumps({**read(d / "meta.json"), "n_features": 30})),
     "holds 200 rows, not features 0..29 once each"),
    (lambda d: pq.write_table(pq.read_table(d / "examples.parquet").sort_by([("index", "descending")]),
                              d / "examples.parquet"), "examples.parquet is not sorted by feature index"),
])
def test_bad_tables_refused(tmp_path, damage, message):
    damage(write_site(tmp_path / "features", n=200))  # two chunks
    with pytest.raises(ReportError, match="make label") as error:
        build_report(tmp_path / "features", tmp_path / "report")
    assert message in str(error.value)
    assert not (tmp_path / "report").exists() and not (tmp_path / "report.partial").exists()


def test_report_stage(runs_dir):
    write_site(runs_dir / "r" / "features", n=20)
    result = run_stage("pipeline.report", "run.run_name=r", f"run.runs_dir={runs_dir}", "report.chunk_size=8")
    assert "L3.resid_post: 20 features, 16 labelled, 2 unlabelled, 2 dead" in result.stdout
    assert len(list((runs_dir / "r" / "report" / "data" / "L3.resid_post").glob("chunk-*.json"))) == 3
    assert "chunk_size: 8" in (runs_dir / "r" / "config" / "report.yaml").read_text()

    missing = run_stage("pipeline.report", "run.run_name=none", f"run.runs_dir={runs_dir}", check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"report: error: no feature tables in {runs_dir}/none/features: run `make label` first"


@contextlib.contextmanager
def browsing(root: Path):
    """make_server over `root` on a free port; yields a get(path, headers) -> (status, headers, body) over raw HTTP."""
    with make_server(root, port=0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()

        def get(path: str, headers: dict | None = None):
            connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
            connection.request("GET", path, headers=headers or {})  # sent as written: `..` stays in it
            response = connection.getresponse()
            answer = response.status, response.headers, response.read()
            connection.close()
            return answer

        try:
            yield get
        finally:
            server.shutdown()


def test_browse_serves_report(tmp_path, runs_dir):
    write_site(tmp_path / "features", n=10)
    build_report(tmp_path / "features", tmp_path / "report")
    with browsing(tmp_path / "report") as get:
        status, headers, page = get("/")
        assert status == 200 and headers["Cache-Control"] == "no-cache" and b'src="app.js"' in page
        status, _, chunk = get("/data/L3.resid_post/chunk-0.json")
        assert status == 200 and json.loads(chunk)[3]["id"] == "L3.resid_post/3"

    refused = run_stage("pipeline.browse", "run.run_name=none", f"run.runs_dir={runs_dir}", check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"browse: error: no report in {runs_dir}/none/report: "
                                      "run `make report RUN=none` first")


def test_browse_serves_the_report_and_nothing_else(tmp_path):
    """No directory listing, nothing from outside the report (by `..` or by symlink), and the headers that
    keep the page to its own files, unframed, with no content sniffed; the Server header names no Python."""
    write_site(tmp_path / "features", n=10)
    root = tmp_path / "report"
    build_report(tmp_path / "features", root)
    (tmp_path / "secret.txt").write_text("secret")
    (root / "etc").symlink_to("/etc")
    (root / "secret.txt").symlink_to(tmp_path / "secret.txt")
    (root / "icon.svg").symlink_to(root / "favicon.svg")  # a link that stays inside is fine
    with browsing(root) as get:
        for path in ("/data/", "/data/L3.resid_post/", "/etc/passwd", "/etc/", "/secret.txt", "/../secret.txt",
                     "/%2e%2e/secret.txt", "/%00"):
            status, _, body = get(path)
            assert status == 404 and b"secret" not in body and b"root:" not in body, path
        assert get("/icon.svg")[0] == 200
        for path in ("/", "/app.js", "/data/sites.json", "/nowhere"):
            _, headers, _ = get(path)
            assert headers["Content-Security-Policy"].startswith("default-src 'self';")
            assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert headers["Server"] == "dialbox"


def test_browse_answers_only_its_own_host_and_origin(tmp_path):
    """After DNS rebinding, a page at evil.example reaches 127.0.0.1 with Host evil.example: it reads nothing
    of the report (corpus text included), and neither does a request from another origin."""
    write_site(tmp_path / "features", n=10)
    build_report(tmp_path / "features", tmp_path / "report")
    with browsing(tmp_path / "report") as get:
        for headers in ({"Host": "evil.example:8765"}, {"Host": "evil.example"}, {"Origin": "http://evil.example"}):
            status, _, body = get("/data/L3.resid_post/chunk-0.json", headers)
            assert status == 403 and b"L3.resid_post/3" not in body, headers
        assert get("/data/sites.json", {"Host": "localhost:8765"})[0] == 200
        assert get("/data/sites.json", {"Host": "[::1]:8765"})[0] == 200


def test_browse_answers_an_http2_request_with_a_status_line(tmp_path):
    write_site(tmp_path / "features", n=10)
    build_report(tmp_path / "features", tmp_path / "report")
    with make_server(tmp_path / "report", port=0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with socket.create_connection(server.server_address[:2], timeout=30) as sock:
            sock.sendall(b"GET / HTTP/2.0\r\n\r\n")
            assert sock.makefile("rb").readline().startswith(b"HTTP/1.0 505")
        server.shutdown()
