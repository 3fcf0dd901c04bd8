"""The offload benchmarks run end to end at toy sizes and print their summary lines (numbers are
measurements, so only their form and sanity are checked here; BENCHMARKS.md holds real runs)."""

from __future__ import annotations

import re

from engram_jax.bench import offload


def test_offload_bench_prints_its_two_summary_lines(capsys):
    offload.main(
        ["--scale_rows_base=500", "--offload_rows_base=2000", "--steps=2", "--warmup=1",
         "--decode_tokens=3", "--decode_repeats=2", "--backbone=toy"]
    )  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    scaling = re.fullmatch(
        r"table scaling: train step x([\d.]+) at 10x the rows \(sparse\), x([\d.]+) \(dense\)",
        lines[-2],
    )
    penalty = re.fullmatch(
        r"offload penalty: train (-?[\d.]+)%, decode (-?[\d.]+)%, table (\d+) params", lines[-1]
    )
    assert scaling and penalty, lines[-2:]
    assert all(float(x) > 0 for x in scaling.groups())
    # 2 orders x 2 heads of 2000 rows (each padded to a prime), rows of 32 floats.
    assert 4 * 2000 * 32 <= int(penalty.group(3)) < 4 * 2100 * 32
    # The training table's host row, then the decode table's: default (unsplit on this CPU), split.
    decode = [line for line in lines if line.startswith("| host")]
    assert len(decode) == 3 and "| False |" in decode[1] and "| True |" in decode[2], decode
