"""make bench-synth on a small model of SynthSAEBench's recipe (512 features in 64 dimensions, with its
hierarchy and correlations, built by sae_lens.synthetic): `make train`'s trainer recovers the true
features in seconds, a broken trainer does not, every trainer sees the same samples, and the benchmark
writes its section."""

import pytest
import torch

import pipeline.bench
import sae.training
from pipeline.bench import synth

CPU = torch.device("cpu")
STEPS = 256  # of 256 samples: F1 0.47, MCC 0.66 when measured; a zero learning rate gives 0.04 and 0.39
F1_FLOOR, MCC_FLOOR = 0.35, 0.55


@pytest.fixture(autouse=True)
def one_thread():
    """The small model's matrices are too small to share out, and on a busy 2-core machine a second
    thread waiting for the first made each step 40 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("synth-cache")


@pytest.fixture(scope="module")
def model(cache):
    return synth.cached_model(synth.model_config(quick=True), cache, CPU)


@pytest.fixture(scope="module")
def eval_set(model):
    return synth.draw_eval_set(model, batches=8, batch=256, seed=1)


def trained_topk(model, steps: int = STEPS) -> synth.Contender:
    args = synth.parse_args(["--quick"])
    torch.manual_seed(2)
    contender = synth.dialbox("topk", args, steps, model.sample(args.batch), CPU)
    synth.train(model, [contender], steps, args, CPU)
    return contender


def test_make_trains_trainer_recovers_the_true_features(model, eval_set):
    contender = trained_topk(model)
    result = synth.evaluate(contender, model, eval_set, 256)
    assert result.classification.f1_score >= F1_FLOOR and result.mcc >= MCC_FLOOR, result
    assert result.sae_l0 == pytest.approx(4)  # quick k
    again = synth.evaluate(contender, model, eval_set, 256)  # the same samples, replayed
    assert again.classification.f1_score == result.classification.f1_score

    # A decoder whose rows no longer belong to their latents keeps its directions (MCC matches directions
    # only, one to one, so it cannot tell) but each latent now detects the wrong feature.
    with torch.no_grad():
        contender.sae.W_dec.copy_(contender.sae.W_dec[torch.randperm(contender.sae.cfg.d_sae)])
    assert synth.evaluate(contender, model, eval_set, 256).classification.f1_score < F1_FLOOR / 3


def test_a_trainer_that_does_not_learn_fails_the_floors(model, eval_set, monkeypatch):
    monkeypatch.setattr(sae.training, "learning_rate", lambda cfg, d_sae: 0.0)
    result = synth.evaluate(trained_topk(model, steps=16), model, eval_set, 256)
    assert result.classification.f1_score < F1_FLOOR / 3 and result.mcc < MCC_FLOOR


def recording(step, rows: list):
    """`step`, keeping a copy of every batch it is handed."""
    def record(batch):
        rows.append(batch.clone())
        step(batch)
    return record


def test_dialbox_and_sae_lens_see_identical_samples(model):
    args = synth.parse_args(["--quick"])
    racers = synth.contenders(args, model.cfg.hidden_dim, 4, model.sample(args.batch), CPU)
    seen = {c.name: [] for c in racers}
    for c in racers:
        c.step = recording(c.step, seen[c.name])
    synth.train(model, racers, 4, args, CPU)
    torch.manual_seed(args.seed)
    drawn = [model.sample(args.batch) for _ in range(4)]  # the model's own sampler, seeded as the stream is
    for name, rows in seen.items():
        assert len(rows) == 4 and all(torch.equal(a, b) for a, b in zip(rows, drawn)), name
    assert {name.split()[0] for name in seen} == {"Dialbox", "sae-lens"}


def test_quick_bench_writes_its_section(cache, tmp_path, monkeypatch):
    out = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(pipeline.bench, "BENCHMARKS", out)
    synth.main(["--quick", "--cache", str(cache), "--samples", "4096", "--eval-samples", "1024"])
    text = out.read_text()
    assert "<!-- bench-synth-quick -->" in text and "<!-- /bench-synth-quick -->" in text
    assert "make bench-synth ARGS='--quick" in text
    for name in ("Dialbox topk", "Dialbox batchtopk", "Dialbox matryoshka", "Dialbox matryoshka_topk", "sae-lens batchtopk",
                 "sae-lens matryoshka_batchtopk"):
        assert f"| {name} | **" in text
    assert "| 512 | 1,024 | 2,048 | 4,096 |" in text  # F1 against samples seen
    assert "| Matryoshka BatchTopK (128/512/2048) | 0.879 | 0.793 | 0.999 | 0.779 |" in text


def test_bad_input_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        synth.main(["--samples", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "bench-synth: error: --samples=0: must be positive"
