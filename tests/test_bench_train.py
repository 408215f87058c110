"""make bench-train at tiny sizes: it runs all four ways and writes its section, each ratio the quotient
of the figures beside it."""

import re

import pytest

import pipeline.bench
from pipeline.bench import train

RATIO_ROWS = ("Dialbox / sae-lens SAETrainer (default)", "Dialbox / sae-lens SAETrainer (autocast=True)",
              "Dialbox from activation store / from memory")


def ratios_in(text: str) -> dict[str, tuple[float, float, float]]:
    """{measure: (numerator, denominator, ratio)} of the rows `a / b tok/s | **r**` of a written table."""
    found = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in RATIO_ROWS:
            a, b = (float(v.replace(",", "")) for v in re.fullmatch(r"([\d,]+) / ([\d,]+) tok/s", cells[1]).groups())
            found[cells[0]] = (a, b, float(cells[2].strip("*x")))
    return found


def test_quick_bench_writes_its_ratios(tmp_path, monkeypatch):
    out = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(pipeline.bench, "BENCHMARKS", out)
    # The store way times whole shuffle windows (8 chunks): at width 256 a chunk is 8,192 rows, 8 batches of 1024,
    # where width 32 would make a window 4,096 steps.
    train.main(["--quick", "--d-in", "256", "--batch", "1024", "--batches", "4"])
    text = out.read_text()
    assert "<!-- bench-train -->" in text and "<!-- /bench-train -->" in text
    assert "make bench-train ARGS='--quick" in text
    rows = ratios_in(text)
    assert set(rows) == set(RATIO_ROWS)
    for a, b, ratio in rows.values():
        # shown to 2 decimals, from tok/s shown rounded to integers: at 1,502 tok/s (sae-lens' autocast in emulated
        # bf16) the rounding alone moves a ratio of 26.9 by 0.009
        assert a > 0 and b > 0 and ratio == pytest.approx(a / b, abs=0.006 + a / b * (0.5 / a + 0.5 / b))


def test_each_ratio_is_computed_from_its_own_inputs():
    args = train.parse_args(["--quick", "--d-in", "32", "--d-sae", "256", "--reader-width", "1000"])
    tps = {"dialbox": 3000.0, "sae-lens": 1000.0, "sae-lens autocast": 1500.0, "dialbox store": 2700.0}
    rows = train.result_rows(args, tps, peak=1e12, reader_rows=500_000, decoder_ms={}, encoder_ms={})
    assert ratios_in(train.table(["measure", "values", "ratio", "target"], rows)) == {
        RATIO_ROWS[0]: (3000, 1000, 3.0), RATIO_ROWS[1]: (3000, 1500, 2.0), RATIO_ROWS[2]: (2700, 3000, 0.9)}
    flops = 3000 * 6 * 32 * (256 + 8 + 16)  # tokens/s x 6 d_in (d_sae + k + d_in / 2)
    assert rows[3][2] == f"**{flops / 1e12:.1%}**"
    assert rows[4][2] == "**1.00 GB/s**"  # 500k rows x 1000 wide x 2 bytes
