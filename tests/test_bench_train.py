"""make bench-train at tiny sizes: it runs all four ways and writes its section."""

import pipeline.bench
from pipeline.bench import train


def test_quick_bench_writes_its_ratios(tmp_path, monkeypatch):
    out = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(pipeline.bench, "BENCHMARKS", out)
    train.main(["--quick", "--d-in", "32", "--d-sae", "256", "--batch", "128", "--batches", "4"])
    text = out.read_text()
    assert "<!-- bench-train -->" in text and "<!-- /bench-train -->" in text
    assert "make bench-train ARGS='--quick" in text
    for row in ("| Dialbox / sae-lens SAETrainer (default) |", "| Dialbox / sae-lens SAETrainer (autocast=True) |",
                "| Dialbox from activation store / from memory |"):
        line = next(line for line in text.splitlines() if line.startswith(row))
        assert "**" in line and "nan" not in line and "inf" not in line
