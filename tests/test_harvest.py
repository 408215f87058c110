"""The harvest stage end to end: real models, real zarr stores on disk, real subprocesses."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, compose_config, run_stage
from activations.adapters import make_adapter
from activations.config import DataConfig
from activations.corpus import CorpusError, fingerprint, iter_windows
from activations.demo_corpus import DemoCorpusError, mixed_documents, plain_text
from activations.harvesting import harvest
from activations.models import load_model, load_tokenizer
from activations.sites import Site, SiteError
from activations.store import ActivationStore, StoreError

TINY = ["model=tiny_deepseek_v4", "data.context_length=32", "harvest.batch_size=4"]


def config(runs_dir, *overrides):
    return compose_config("harvest", [f"run.runs_dir={runs_dir}", *overrides])


def test_smollm2_store_matches_a_direct_forward(runs_dir):
    cfg = config(runs_dir, "harvest.sites=[L3.resid_post,L5.ffn_out]", "harvest.max_tokens=1024",
                 "data.context_length=64", "store.dtype=float32", "store.chunk_rows=256")
    store = harvest(cfg)
    model, tokenizer = load_model(cfg.model)
    adapter = make_adapter(model, cfg.model)

    windows = list(iter_windows(cfg.data, tokenizer, max_windows=16))
    keep = np.concatenate([w.keep for w in windows])
    tokens = np.concatenate([w.tokens for w in windows])
    assert store.n_tokens == keep.sum() == 1024 - 16  # BOS rows are left out by default
    np.testing.assert_array_equal(store.tokens(0, store.n_tokens)["tokens"], tokens[keep])
    assert tokenizer.bos_token_id not in store.tokens(0, store.n_tokens)["tokens"]

    ids = torch.from_numpy(np.stack([w.tokens for w in windows[:2]]))
    direct = adapter.capture([Site(3, "resid_post"), Site(5, "ffn_out")], ids)
    for site, tensor in direct.items():
        expected = tensor.reshape(-1, tensor.shape[-1])[torch.from_numpy(keep[:128])].numpy()
        np.testing.assert_allclose(store.read(str(site), 0, 126), expected, rtol=1e-5, atol=1e-5)

    saved = (runs_dir / "demo" / "config" / "harvest.yaml").read_text()
    assert "L5.ffn_out" in saved and "smollm2_135m" in saved


def test_bf16_store_keeps_the_exact_bits(runs_dir):
    cfg = config(runs_dir, *TINY, "harvest.sites=[L1.ffn_out]", "harvest.max_tokens=256")
    store = harvest(cfg)
    model, tokenizer = load_model(cfg.model)
    # the harvest's own batch (its 4 windows): float32 sums vary with the batch's shape on some CPUs (AVX2), and
    # a value that lands near a bf16 rounding boundary would then round to the neighbouring bf16 number
    ids = torch.from_numpy(np.stack([w.tokens for w in iter_windows(cfg.data, tokenizer, max_windows=4)]))
    direct = make_adapter(model, cfg.model).capture([Site(1, "ffn_out")], ids)[Site(1, "ffn_out")][0, 1:]
    expected = direct.to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(store.read("L1.ffn_out", 0, 31), expected)


def test_deepseek_v4_hyper_connection_sites(runs_dir):
    cfg = config(runs_dir, *TINY, "harvest.sites=[L0.resid_pre,L1.resid_post,L1.attn_in,L2.ffn_out]",
                 "harvest.max_tokens=512", "model.hc_reduce=concat")
    store = harvest(cfg)
    d = store.identity["d_model"]
    hc = store.identity["hc_mult"]
    assert store.identity["hc_reduce"] == "concat"
    assert store.width("L1.resid_post") == hc * d and store.width("L2.ffn_out") == d
    # Before block 0 every stream is the same embedding, so the concat repeats it hc times.
    first = store.read("L0.resid_pre", 0, 8).reshape(8, hc, d)
    np.testing.assert_array_equal(first, np.repeat(first[:, :1], hc, axis=1))
    for site in store.sites:
        stats = store.stats(site)
        assert stats["nonfinite_rows"] == 0 and stats["max_norm"] >= stats["mean_norm"] > 0


def test_two_writers_together_hold_what_one_writer_holds(runs_dir):
    common = [*TINY, "harvest.sites=[L1.ffn_out]", "harvest.max_tokens=640", "store.chunk_rows=64"]
    single = harvest(config(runs_dir, *common, "run.run_name=single"))
    cfg = config(runs_dir, *common, "run.run_name=split", "harvest.rank=1", "harvest.world_size=2")
    harvest(cfg)
    assert not ActivationStore(runs_dir / "split").complete  # rank 0 has not run yet
    harvest(config(runs_dir, *common, "run.run_name=split", "harvest.rank=0", "harvest.world_size=2"))
    split = ActivationStore(runs_dir / "split")
    assert split.complete and split.n_tokens == single.n_tokens

    # Shards are read in rank order: windows 0, 2, 4, ... then 1, 3, 5, ...
    _, tokenizer = load_model(cfg.model)
    counts = [int(w.keep.sum()) for w in iter_windows(cfg.data, tokenizer, max_windows=20)]
    starts = np.cumsum([0] + counts)
    rows = lambda ws: np.concatenate([np.arange(starts[w], starts[w + 1]) for w in ws])  # noqa: E731
    order = rows(list(range(0, 20, 2)) + list(range(1, 20, 2)))
    np.testing.assert_array_equal(split.tokens(0, split.n_tokens)["tokens"],
                                  single.tokens(0, single.n_tokens)["tokens"][order])
    # Different batch groupings round differently; the values agree to bf16 precision.
    np.testing.assert_allclose(split.read("L1.ffn_out", 0, split.n_tokens),
                               single.read("L1.ffn_out", 0, single.n_tokens)[order], rtol=2e-2, atol=1e-3)


def test_harvest_refuses_another_model_in_the_same_run(runs_dir):
    harvest(config(runs_dir, *TINY, "harvest.sites=[L1.ffn_out]", "harvest.max_tokens=64"))
    with pytest.raises(StoreError, match="smollm2_135m.*tiny_deepseek_v4|tiny_deepseek_v4.*another run"):
        harvest(config(runs_dir, "harvest.sites=[L1.ffn_out]", "harvest.max_tokens=64"))


def test_harvest_refuses_a_changed_corpus_in_the_same_run(runs_dir):
    harvest(config(runs_dir, *TINY, "harvest.sites=[L1.ffn_out]", "harvest.max_tokens=64"))
    with pytest.raises(StoreError, match="data"):
        harvest(config(runs_dir, *TINY, "harvest.sites=[L1.ffn_out]", "harvest.max_tokens=64",
                       "data.context_length=16"))


def test_demo_corpus_mixes_bible_and_wikipedia_in_a_fixed_order():
    first = list(itertools.islice(mixed_documents(["bible", "wikipedia"]), 60))
    assert first == list(itertools.islice(mixed_documents(["bible", "wikipedia"]), 60))
    bible = [d for d in first if d.startswith(("Genesis", "Exodus"))]
    wiki = [d for d in first if d not in bible]
    assert first[0].startswith("Genesis 1\n1 In the beginning") and first[1].startswith("Anarchism\n")
    assert 0.8 < sum(map(len, wiki)) / sum(map(len, bible)) < 1.25  # about equal characters of each
    assert not any(mark in d for d in wiki for mark in ("{{", "[[", "<ref", "''"))
    assert list(itertools.islice(mixed_documents(["bible"]), 3)) == bible[:3]
    with pytest.raises(DemoCorpusError, match="bible, wikipedia"):
        next(mixed_documents(["fortunes"]))


def test_wikitext_becomes_prose():
    text = ("{{Infobox person|name=X}}'''Ada''' was a [[mathematician]] and [[Writer|writer]].<ref>Book</ref> "
            "[[File:Ada.jpg|thumb|A [[portrait]]]]\n{| class=wikitable\n|-\n| cell\n|}\n* She [http://a.org wrote] notes.")
    assert plain_text(text).split() == "Ada was a mathematician and writer. She wrote notes.".split()


def test_the_demo_mix_is_part_of_the_corpus_fingerprint():
    tokenizer = load_tokenizer(compose_config("harvest", []).model)
    assert fingerprint(DataConfig(), tokenizer) != fingerprint(DataConfig(demo_mix=["bible"]), tokenizer)
    jsonl = [DataConfig(source="jsonl", paths=["a.jsonl"], demo_mix=mix) for mix in (["bible"], ["wikipedia"])]
    assert fingerprint(jsonl[0], tokenizer) == fingerprint(jsonl[1], tokenizer)  # only the demo source reads it


@pytest.mark.parametrize(
    "site, message",
    [("L1.mlp_out", "unknown site kind 'mlp_out'.*resid_pre, resid_post"), ("L7.ffn_out", "layers 0..3")],
)
def test_bad_sites_are_refused_with_the_valid_choices(runs_dir, site, message):
    with pytest.raises(SiteError, match=message):
        harvest(config(runs_dir, *TINY, f"harvest.sites=[{site}]"))


def test_empty_and_unreadable_corpora_are_refused(runs_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "   "}\n')
    with pytest.raises(CorpusError, match="empty"):
        harvest(config(runs_dir, *TINY, "harvest.sites=[L1.ffn_out]", "data=jsonl", f"data.paths=[{empty}]"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("not json\n")
    with pytest.raises(CorpusError, match="broken.jsonl:1 is not JSON"):
        harvest(config(runs_dir, *TINY, "harvest.sites=[L1.ffn_out]", "data=jsonl", f"data.paths=[{broken}]"))
    with pytest.raises(CorpusError, match="no files match"):
        harvest(config(runs_dir, *TINY, "harvest.sites=[L1.ffn_out]", "data=jsonl",
                       f"data.paths=[{tmp_path}/missing*.jsonl]"))


def test_jsonl_corpus(runs_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"body": f"Document number {i} talks about bridges."}) + "\n"
                              for i in range(40)))
    store = harvest(config(runs_dir, *TINY, "data=jsonl", f"data.paths=[{corpus}]", "data.text_field=body",
                           "harvest.sites=[L0.ffn_in]", "harvest.max_tokens=0"))
    doc_ids = store.tokens(0, store.n_tokens)["doc_ids"]
    assert doc_ids.min() == 0 and doc_ids.max() == 39


@pytest.mark.slow  # stage subprocesses
def test_cli_prints_one_line_errors_and_the_resolved_config(runs_dir):
    bad = run_stage("pipeline.harvest", f"run.runs_dir={runs_dir}", *TINY, "harvest.sites=[L1.nope]", check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1:] == [
        "harvest: error: unknown site kind 'nope' in L1.nope: valid kinds are "
        "resid_pre, resid_post, attn_in, attn_out, ffn_in, ffn_out"
    ]
    job = run_stage("pipeline.harvest", *TINY, "--cfg", "job")
    assert "context_length: 32" in job.stdout and "name: tiny_deepseek_v4" in job.stdout


@pytest.mark.slow
def test_disk_full_keeps_committed_rows_readable(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        result = run_stage("pipeline.harvest", f"run.runs_dir={mount}", *TINY, "store.dtype=float32",
                           "harvest.sites=[L1.resid_post]", "model.hc_reduce=concat", "harvest.max_tokens=20000",
                           "store.chunk_rows=128", check=False)
        assert result.returncode == 2, result.stderr
        last = result.stderr.strip().splitlines()[-1]  # above it: the progress bar
        assert last.startswith("harvest: error:") and "No space left" in last and "committed rows" in last
        store = ActivationStore(mount / "demo")
        assert 0 < store.n_tokens < 20000
        assert np.isfinite(store.read("L1.resid_post", 0, store.n_tokens)).all()
    finally:
        subprocess.run(["umount", str(mount)])


def _manifest_rows(run_dir) -> int:
    manifests = list((run_dir / "activations" / "manifests").glob("*.json"))
    try:
        return json.loads(manifests[0].read_text())["rows"] if manifests else 0
    except (json.JSONDecodeError, KeyError):
        return 0


KILL_RUN = [*TINY, "harvest.sites=[L1.resid_post,L2.ffn_out]", "harvest.router=true", "harvest.max_tokens=20000",
            "store.chunk_rows=64", "data.context_length=64"]


@pytest.fixture(scope="module")
def clean_kill_run(tmp_path_factory) -> Path:
    """The harvest the killed-and-resumed ones must equal, run once for both kill points."""
    runs = tmp_path_factory.mktemp("clean")
    run_stage("pipeline.harvest", f"run.runs_dir={runs}", *KILL_RUN)
    return runs / "demo"


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_rows", [1, 1500])
def test_sigkill_then_resume_equals_a_clean_run(runs_dir, clean_kill_run, kill_after_rows):
    common = [f"run.runs_dir={runs_dir}", *KILL_RUN]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.harvest", *common, "run.run_name=killed"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _manifest_rows(runs_dir / "killed") < kill_after_rows and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted = _manifest_rows(runs_dir / "killed")
    run_stage("pipeline.harvest", *common, "run.run_name=killed")

    a, b = ActivationStore(clean_kill_run), ActivationStore(runs_dir / "killed")
    assert 0 < interrupted < a.n_tokens, "the kill should land mid-harvest"
    assert a.n_tokens == b.n_tokens
    for key in ("tokens", "doc_ids", "positions"):
        np.testing.assert_array_equal(a.tokens(0, a.n_tokens)[key], b.tokens(0, b.n_tokens)[key])
    for site in a.sites:
        np.testing.assert_allclose(a.read(site, 0, a.n_tokens), b.read(site, 0, b.n_tokens), rtol=2e-2, atol=2e-2)
    assert sorted(a.router) == sorted(b.router) == [0, 1, 2]
    for layer in a.router:  # the routing is exact: no row lost, doubled or shifted by the resume
        for x, y in zip(a.read_router(layer, 0, a.n_tokens), b.read_router(layer, 0, b.n_tokens)):
            np.testing.assert_array_equal(x, y)


def test_hf_datasets_path_streams_a_local_dataset(runs_dir, tmp_path):
    """data=hf runs the real `datasets.load_dataset(..., streaming=True)` path; here on a local
    dataset directory, since this machine reaches no hub."""
    dataset = tmp_path / "local_dataset"
    dataset.mkdir()
    (dataset / "train.jsonl").write_text("".join(json.dumps({"content": f"Row {i} of a streamed dataset."}) + "\n"
                                                 for i in range(30)))
    store = harvest(config(runs_dir, *TINY, "data=hf", f"data.dataset={dataset}", "data.subset=null",
                           "data.text_field=content", "harvest.sites=[L0.ffn_out]", "harvest.max_tokens=0"))
    assert store.tokens(0, store.n_tokens)["doc_ids"].max() == 29
