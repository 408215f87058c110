"""The test suite's fixtures: named builders for the small runs, each built once per test run.

Shared runs are read-only: a test that writes into one copies it first (copy_run). Steering
tests get their own copy (smol_run, tiny_run), since steering saves vectors into its run. smol_runs,
smol_labelled and tiny_harvest are built once for the whole run, not once per pytest-xdist worker
(built_once).

  smol_runs     runs dir: SmolLM2 harvested at L3.resid_post (8,192 tokens), a small TopK SAE
  smol_run      run dir: a copy of smol_runs/demo for steering; `smol_steerer` is its Steerer, and `smol`
                the same Steerer over a copy of the run of each test's own
  tiny_harvest  runs dir: the tiny random DeepSeek-V4 harvested at L1.resid_post and L2.ffn_out, with
                its routing (layers 0-2)
  tiny_run      run dir: a copy of tiny_harvest/demo with SAEs trained; `tiny` is its Steerer
  smol_labelled runs dir: a copy of smol_runs with every feature labelled (heuristic labels)
  server        the steering server over `smol`, on 127.0.0.1
  windows/split synthetic stores as harvests lay them out (tests/store_fixtures.py)
"""

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")


from pipeline.config import compose as compose_config  # noqa: E402  (re-exported for the tests)
from store_fixtures import corpus, write_store  # noqa: E402

SMOL_SITE, TINY_SITES = "L3.resid_post", ("L1.resid_post", "L2.ffn_out")
SMOL_RUN = ["data.context_length=64", "harvest.batch_size=8", f"harvest.sites=[{SMOL_SITE}]", "store.chunk_rows=512"]
SMOL_SAE = ["sae.expansion_factor=2", "sae.k=8", "train.batch_size=256", "eval.ce=false", "eval.tokens=256"]
# label settings small enough for the smol run's tests (16-token contexts, few examples per feature)
LABEL_SMALL = ["label.context_tokens=16", "label.top_examples=10", "label.sampled_examples=12", "label.pool_blocks=64",
               "label.explain_top=4", "label.explain_per_quantile=1", "label.score_examples=4"]
TINY = ["model=tiny_deepseek_v4", "data.context_length=64", "harvest.batch_size=8"]
TINY_SAE = ["sae.expansion_factor=2", "sae.k=16", "train.batch_size=256", "eval.ce=false", "eval.tokens=256",
            "eval.batch_size=4"]


def run_stage(module: str, *overrides: str, check: bool = True, timeout: float = 600, **kwargs):
    """Run a stage as users do, in a real subprocess, from the repository root."""
    result = subprocess.run(
        [sys.executable, "-m", module, *overrides], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{module} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


# The slowest test files, slowest first (`pytest -n 0 --durations=80` on 2 cores, 2026-12-03: 176 s down to
# 33 s). make test hands whole files to its 2 workers in collection order (--no-loadscope-reorder); pytest-xdist
# would otherwise order them by their number of tests, and a slow file with few tests, such as the notebook's
# one, could start last while the other worker sat idle. Longest first leaves short files to even out the end.
SLOW_FILES = ("test_steer_features.py", "test_label.py", "test_train.py", "test_harvest.py", "test_notebook.py",
              "test_launch.py", "test_steer.py", "test_store_remote.py", "test_browser.py", "test_topk_step.py")


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: each file keeps its order


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    return tmp_path / "runs"


def make_trained_run(runs: Path, tokens: int = 8192, data: tuple = ()) -> Path:
    """A SmolLM2 run `demo` (L3.resid_post, `tokens` harvested) with a small trained TopK SAE; returns runs."""
    from activations.harvesting import harvest
    from sae.training import train

    harvest(compose_config("harvest", [f"run.runs_dir={runs}", *SMOL_RUN, f"harvest.max_tokens={tokens}", *data]))
    train(compose_config("train", [f"run.runs_dir={runs}", *SMOL_SAE]))
    return runs


def copy_run(runs: Path, dest: Path) -> Path:
    shutil.copytree(runs, dest, ignore=shutil.ignore_patterns("wandb"))
    return dest


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The directory `name`, built by build(path) once for the whole test run: the first pytest-xdist worker
    to need it builds it under a file lock, and the other finds it there instead of building its own."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the workers' temps share a parent
    path, built = root / name, root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock")):
        if not built.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(path)
            built.touch()
    return path


@pytest.fixture(scope="session")
def smol_runs(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "smol_runs", make_trained_run)


@pytest.fixture(scope="session")
def smol_run(smol_runs, tmp_path_factory) -> Path:
    return copy_run(smol_runs, tmp_path_factory.mktemp("smol_steer") / "runs") / "demo"


@pytest.fixture
def own_smol_run(smol_run, tmp_path) -> Path:
    """A copy of smol_run for a test that writes into a run (a stage saves its config, vectors, tables)."""
    return copy_run(smol_run.parent, tmp_path / "own") / "demo"


@pytest.fixture(scope="session")
def smol_labelled_by_stage(smol_runs, tmp_path_factory):
    """The smol run labelled once by the label stage with LABEL_SMALL: (runs, what the stage printed)."""
    def label(path):
        copy_run(smol_runs, path / "runs")
        result = run_stage("pipeline.label", f"run.runs_dir={path / 'runs'}", *LABEL_SMALL)
        (path / "stdout.txt").write_text(result.stdout)

    path = built_once(tmp_path_factory, "smol_labelled", label)
    return path / "runs", (path / "stdout.txt").read_text()


@pytest.fixture(scope="session")
def smol_labelled(smol_labelled_by_stage) -> Path:
    return smol_labelled_by_stage[0]


@pytest.fixture(scope="session")
def tiny_harvest(tmp_path_factory) -> Path:
    """A finished tiny DeepSeek-V4 harvest at a hyper-connection site and an FFN output, routing stored."""
    from activations.harvesting import harvest

    def build(runs):
        harvest(compose_config("harvest", [f"run.runs_dir={runs}", *TINY, f"harvest.sites=[{','.join(TINY_SITES)}]",
                                           "harvest.max_tokens=8192", "store.chunk_rows=256", "harvest.router=true"]))

    return built_once(tmp_path_factory, "tiny_runs", build)


@pytest.fixture(scope="session")
def tiny_run(tiny_harvest, tmp_path_factory) -> Path:
    from sae.training import train

    runs = copy_run(tiny_harvest, tmp_path_factory.mktemp("tiny_steer") / "runs")
    train(compose_config("train", [f"run.runs_dir={runs}", *TINY_SAE]))
    return runs / "demo"


@pytest.fixture(scope="session")
def smol_steerer(smol_run):
    """The one SmolLM2 Steerer of the session, over smol_run (fixtures of a wider scope use it as it is)."""
    from steering.steerer import Steerer

    return Steerer(smol_run)


@pytest.fixture
def smol(smol_steerer, smol_run, tmp_path, monkeypatch):
    """The session's SmolLM2 Steerer with its run swapped, for this test, for a copy of its own: the vectors,
    tables and configs a test writes reach no other test. The copy holds the same store and SAEs, so what
    the Steerer has loaded from them still holds; a server over the same Steerer serves the copy too."""
    from activations.rundir import RunDir

    monkeypatch.setattr(smol_steerer, "run", RunDir.at(copy_run(smol_run.parent, tmp_path / "smol") / "demo"))
    return smol_steerer


@pytest.fixture(scope="session")
def tiny(tiny_run):
    from steering.steerer import Steerer

    return Steerer(tiny_run)


def live_feature(steerer, site: str) -> int:
    """The feature with the largest max activation in the store (so max-activation units mean something)."""
    from activations.sites import Site
    from steering.feature_vectors import max_activations

    maxes, _ = max_activations(steerer.run, site, steerer.sae(Site.parse(site)))
    return int(maxes.argmax())


def random_vector(steerer, name: str, kind: str, layers, norm: float, seed: int = 0, op: str = "add"):
    """A random vector of the given norm per layer, saved in the steerer's run."""
    from activations.sites import Site
    from steering.vectors import SteeringVector

    generator = torch.Generator().manual_seed(seed)
    directions = {}
    for layer in layers:
        width = steerer.adapter.site(Site(layer, kind)).width
        v = torch.randn(width, generator=generator)
        directions[layer] = v * norm / v.norm()
    vector = SteeringVector(name, kind, op, "fraction" if op == "project" else "raw", directions, steerer.identity)
    vector.save(steerer.run.vectors)
    return vector


@pytest.fixture(scope="session")
def server(smol_steerer):
    from steering.server import SteeringServer

    random_vector(smol_steerer, "served", "resid_post", [2], 40.0)
    server = SteeringServer(smol_steerer, "127.0.0.1", 0, max_tokens=16)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def wait_for(condition, within_s: float = 30.0) -> None:
    """Until condition() holds: a server's own state, read as it changes, rather than a guess at how long."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "the server never reached the state the test waits for"
        time.sleep(0.01)


@contextlib.contextmanager
def serving(server):
    """A SteeringServer answering on its own thread for the block."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def windows():
    return corpus()


@pytest.fixture
def split(tmp_path, windows):
    """A finished two-writer store."""
    return write_store(tmp_path / "split" / "activations", windows, 2)
