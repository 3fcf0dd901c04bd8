"""How long each run of a finished experiment took to beat a compressor on its held-out bytes.

    python -m engram_jax.experiments.time_to_floor --workdir=DIR [--compressor=xz_9e]

Reads DIR/results.json (the floors of the bytes its evaluations score, and the runs) and each
run's `train.log`, whose evaluation lines carry the time they were logged. For every run it
prints the first evaluation whose bits per byte are below the floor, with the step and the wall
time since the run's first log line (start-up and compilation included, as a user waits for them).
A run resumed from a checkpoint counts from its first start, pauses included, so the figure is
an upper bound there. Evaluations are the experiment's `--evals` points: the crossing is known to
within one evaluation interval.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re

# absl's log prefix: severity, MMDD, HH:MM:SS.micro.
_STAMP = re.compile(r"^[IWEF](\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2})\.(\d{6}) ")
_EVAL = re.compile(r"eval step (\d+) \|.*\| bits/byte ([0-9.]+)")


@dataclasses.dataclass(frozen=True)
class Crossing:
    """The first evaluation below the floor (None fields: never below)."""

    name: str
    floor: float
    step: int | None
    bits_per_byte: float | None
    seconds: float | None
    final_bits_per_byte: float | None


def _stamp(line: str, year: int) -> datetime.datetime | None:
    m = _STAMP.match(line)
    if not m:
        return None
    month, day, hour, minute, second, micro = (int(g) for g in m.groups())
    return datetime.datetime(year, month, day, hour, minute, second, micro)


def first_below(log_lines: list[str], floor: float, name: str = "", year: int = 2000) -> Crossing:
    """The first `eval step N | ... | bits/byte X` line with X < floor, timed from the first
    timestamped line (`year` only matters across a new year's night: the log has no year)."""
    start = None
    final = None
    found: tuple[int, float, float] | None = None
    for line in log_lines:
        when = _stamp(line, year)
        if when is None:
            continue
        if start is None:
            start = when
        m = _EVAL.search(line)
        if not m:
            continue
        step, bpb = int(m.group(1)), float(m.group(2))
        final = bpb
        if found is None and bpb < floor:
            if when < start:  # the log crossed a year boundary
                when = when.replace(year=when.year + 1)
            found = (step, bpb, (when - start).total_seconds())
    if found is None:
        return Crossing(name, floor, None, None, None, final)
    return Crossing(name, floor, *found, final)


def crossings(workdir: str, compressor: str = "xz_9e") -> list[Crossing]:
    """One `Crossing` per run of the experiment in `workdir`."""
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    floors = results["compression_floors"]["evaluated"]
    if compressor not in floors:
        raise ValueError(f"--compressor: got {compressor!r}; expected one of {sorted(floors)}")
    out = []
    for run in results["runs"]:
        path = os.path.join(workdir, run["run_dir"], "train.log")
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
        out.append(first_below(lines, floors[compressor], run["name"]))
    return out


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS
    rows = crossings(f.workdir, f.compressor)
    print(
        f"| run | final bits/byte | first below {f.compressor} ({rows[0].floor:.4f}) | wall time |"
    )
    print("|---|---:|---|---:|")
    for r in rows:
        final = "-" if r.final_bits_per_byte is None else f"{r.final_bits_per_byte:.4f}"
        if r.step is None:
            print(f"| {r.name} | {final} | never | - |")
        else:
            crossed = f"step {r.step} ({r.bits_per_byte:.4f})"
            print(f"| {r.name} | {final} | {crossed} | {r.seconds / 60:.1f} min |")


if __name__ == "__main__":
    from absl import flags

    from engram_jax import cli

    flags.DEFINE_string("workdir", None, "A finished experiment's --workdir.")
    flags.DEFINE_string("compressor", "xz_9e", "Which floor: xz_9e or bzip2_9.")
    flags.mark_flag_as_required("workdir")
    cli.run(main)
