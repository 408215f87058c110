"""make bench-harvest-flash as a dry run: Flash's 4 blocks at a tiny width on the CPU, harvested, section written."""

import pipeline.bench
from pipeline.bench import harvest_flash


def test_tiny_dry_run_writes_its_section(tmp_path, monkeypatch):
    out = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(pipeline.bench, "BENCHMARKS", out)
    harvest_flash.main(["--tiny", "--tokens", "2048", "harvest.batch_size=8"])
    text = out.read_text()
    assert "<!-- bench-harvest-flash -->" in text and "<!-- /bench-harvest-flash -->" in text
    assert "make bench-harvest-flash ARGS='--tiny --tokens 2048 harvest.batch_size=8'" in text
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert ("4 blocks (sliding_attention, sliding_attention, compressed_sparse_attention, heavily_compressed_attention; "
            "hash_moe, hash_moe, hash_moe, moe), hidden 64, 8 experts top-6 + 1 shared (width 32), hc_mult 4") in rows["model"]
    assert "**" in rows["harvest / bare forward"] and "nan" not in rows["harvest / bare forward"]
    assert "GiB" in rows["peak RSS (build included)"]  # the CPU's peak, not the GPU's
    assert "(row: 536)" in rows["bytes per stored token"]  # 4 sites x 64 x 2 B + the token columns
    assert "2 batches of 8 x 128" in text
