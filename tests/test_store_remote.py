"""The activation store on object storage: an S3 server (moto's, on 127.0.0.1) and fsspec's memory://."""

import json
import logging

import numpy as np
import pytest
import zarr

from store_fixtures import IDENTITY, SITES, all_rows, assert_same_rows, concat, corpus, run_main, write_shard, write_store
from activations.store import STORAGE_OPTIONS_ENV, ActivationStore, ShardWriter, StoreError
from activations.store import merge, verify

A = next(iter(SITES))


@pytest.fixture(scope="module")
def s3_server():
    """An S3-compatible server on an ephemeral port; the options a client needs to reach it."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield {"endpoint_url": f"http://127.0.0.1:{server._server.server_port}", "key": "testing",
               "secret": "testing"}
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """A fresh bucket; dummy credentials, so nothing could reach a real account."""
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = request.node.name.replace("_", "-").replace("[", "-").replace("]", "")[:60].lower()
    s3fs.S3FileSystem(**s3_server).mkdir(bucket)
    return f"s3://{bucket}", s3_server


@pytest.fixture(params=["s3", "memory"])
def remote(request, tmp_path):
    """(URL of an empty place, storage options) on S3 or in fsspec's memory file system."""
    if request.param == "s3":
        return request.getfixturevalue("s3")
    return f"memory://{tmp_path.name}", {}


@pytest.mark.slow  # a moto S3 server round trip: 10 s
def test_write_read_and_check_a_store_on_object_storage(remote, tmp_path, monkeypatch, capsys):
    base, options = remote
    windows = corpus()
    store = write_store(f"{base}/run/activations", windows, 2, storage_options=options)
    local = write_store(tmp_path / "local", windows, 2)
    assert str(store.root) == f"{base}/run/activations"
    assert ActivationStore(f"{base}/run", options).n_tokens == store.n_tokens  # a run directory works too
    assert store.shards == local.shards and store.complete
    assert_same_rows(all_rows(store), all_rows(local))
    seen = np.concatenate([b[A].float().numpy() for b in store.iter_batches(A, 16, seed=3, drop_last=False)])
    np.testing.assert_array_equal(np.sort(seen, axis=0), np.sort(local.read(A, 0, local.n_tokens), axis=0))

    result = verify(f"{base}/run", options, progress=False)
    assert result.ok and result.summary.startswith(f"verify: ok: {store.n_tokens} committed tokens")
    monkeypatch.setenv(STORAGE_OPTIONS_ENV, json.dumps(options))  # how the command line gets them
    code, lines, _ = run_main(capsys, "info", "--json", f"{base}/run")
    info = json.loads("\n".join(lines))
    assert code == 0 and info["tokens"] == store.n_tokens and info["store"] == f"{base}/run/activations"
    assert info["sites"][A]["bytes"] > 0 and [s["rows"] for s in info["shards"]] == [s[1] for s in local.shards]

    merged = merge(f"{base}/run", tmp_path / "merged", order="windows", storage_options=options,
                   dst_storage_options={}, progress=False, fsync=False)
    assert_same_rows(all_rows(merged), all_rows(write_store(tmp_path / "single", windows, 1)))


def test_a_damaged_object_is_named(remote, capsys, monkeypatch):
    base, options = remote
    store = write_store(f"{base}/run", corpus(), 2, storage_options=options)
    key = "shards/r00001-of-00002/L2.ffn_out/c/1/0"
    data = store.root.read(key)
    store.root.write_atomically(key, data[:-3], fsync=False)
    monkeypatch.setenv(STORAGE_OPTIONS_ENV, json.dumps(options))
    code, lines, _ = run_main(capsys, "verify", f"{base}/run")
    assert code == 1 and lines[0].startswith("L2.ffn_out rows [8, 16) in shard r00001-of-00002: unreadable")


def test_a_missing_object_is_an_error_not_zeros(remote):
    base, options = remote
    store = write_store(f"{base}/run", corpus(), 2, storage_options=options)
    store.root.fs.rm_file(f"{store.root.path}/shards/r00001-of-00002/{A}/c/1/0")
    with pytest.raises(StoreError, match=f"{A} rows \\[8, 16\\) in shard r00001-of-00002: chunk missing"):
        ActivationStore(f"{base}/run", options).read(A, 0, store.n_tokens)


def test_a_writer_resumes_from_the_remote_manifest(remote, tmp_path):
    base, options = remote
    windows = corpus()
    url = f"{base}/run"
    killed = write_shard(url, windows, 0, 1, finish=False, storage_options=options)  # never closed: it "dies"
    committed = killed.committed_rows
    assert committed and json.loads(killed.root.read("manifests/r00000-of-00001.json"))["rows"] == committed
    # ... after writing a chunk its manifest never named
    stale = zarr.open_array(killed.root.child(f"shards/r00000-of-00001/{A}").zarr_store(read_only=False), mode="r+")
    stale.resize((committed + 8, SITES[A]))
    stale[committed:] = 7

    resumed = ShardWriter(url, 0, 1, SITES, IDENTITY, chunk_rows=8, background=True, storage_options=options)
    assert (resumed.committed_rows, resumed.consumed) == (committed, killed.consumed)
    assert ActivationStore(url, options).shard_array("r00000-of-00001", A).shape[0] == committed
    resumed.append({k: v[resumed.consumed :] for k, v in concat(windows).items()})
    resumed.finish()
    resumed.close()
    assert_same_rows(all_rows(ActivationStore(url, options)), all_rows(write_store(tmp_path / "clean", windows, 1)))


@pytest.mark.slow  # a harvest and a training run on S3
def test_harvest_and_train_a_run_whose_store_is_on_s3(s3, tmp_path):
    """store.url puts the activations in a bucket; train finds them through the run's harvest config."""
    from conftest import compose_config
    from activations.harvesting import harvest
    from sae.training import train

    base, options = s3
    endpoint = options["endpoint_url"]  # the credentials come from the AWS_* variables the fixture set
    runs = tmp_path / "runs"
    harvest(compose_config("harvest", [f"run.runs_dir={runs}", "model=tiny_deepseek_v4", "data.context_length=64",
                                       "harvest.sites=[L1.ffn_out]", "harvest.max_tokens=2048", "store.chunk_rows=256",
                                       f"store.url={base}/run/activations", f"+store.storage_options.endpoint_url={endpoint}"]))
    assert not (runs / "demo" / "activations").exists()
    assert ActivationStore(f"{base}/run", {"endpoint_url": endpoint}).n_tokens > 1500
    results = train(compose_config("train", [f"run.runs_dir={runs}", "sae.expansion_factor=2", "sae.k=4",
                                             "train.batch_size=256", "eval.ce=false", "eval.tokens=128"]))
    assert results["L1.ffn_out/base"]["fvu"] < 1.5
    assert (runs / "demo" / "saes" / "L1.ffn_out" / "cfg.json").exists()
