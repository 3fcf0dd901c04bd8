"""The flags every experiment takes, their checked values (`Options`) and `--set` overrides."""

from __future__ import annotations

import ast
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from engram_jax import config as config_lib
from engram_jax import configs


def define_flags(*, default_steps: int, default_seeds: int, tables: bool = False) -> None:
    """The flags every experiment takes (each module adds its own); `tables` adds
    `--updates_per_row` to the experiments whose models carry Engram tables."""
    from absl import flags

    flags.DEFINE_string("data_path", None, "Text corpus (any format engram_jax.data reads).")
    flags.DEFINE_string("workdir", None, "Output directory: runs/, results.json, PNGs, summary.md.")
    flags.DEFINE_integer("steps", default_steps, "Training steps per run (the base budget).")
    flags.DEFINE_integer(
        "seeds",
        default_seeds,
        "Seeds per configuration (0, 1, ...); runs of one seed are paired: the same data order "
        "and the same initial values of every parameter the models share.",
    )
    flags.DEFINE_integer(
        "jobs", 1, "Runs trained at once: 1 trains in this process, J > 1 in J subprocesses."
    )
    flags.DEFINE_float(
        "holdout_fraction", 0.05, "Last fraction of the corpus text (by characters) held out."
    )
    flags.DEFINE_integer(
        "eval_tokens",
        32768,
        "Held-out tokens each evaluation reads (the first ones, in corpus order); capped at the "
        "held-out split.",
    )
    flags.DEFINE_integer("evals", 10, "Evaluations per run (the validation curve's points).")
    flags.DEFINE_multi_string(
        "set",
        [],
        "Override of the experiment's base config, KEY=VALUE (e.g. model.hidden_size=64); "
        "repeatable. Values are Python literals, else strings.",
    )
    if tables:
        flags.DEFINE_float(
            "updates_per_row",
            0.0,
            "Target mean number of steps in which an Engram table row is updated, over --steps: "
            "table rows are sized for it from the corpus's distinct n-grams per batch and the "
            "row width then holds the same parameters (total and activated parameters stay "
            "equal to the MoE baseline). 0 keeps the layout's row width and sizes rows by "
            "parameters alone.",
        )
    flags.mark_flags_as_required(["data_path", "workdir"])


@dataclasses.dataclass(frozen=True)
class Options:
    """The common flags' values."""

    data_path: str
    workdir: str
    steps: int
    seeds: int
    jobs: int
    holdout_fraction: float
    eval_tokens: int
    evals: int
    overrides: tuple[str, ...]
    updates_per_row: float = 0.0

    @classmethod
    def from_flags(cls) -> Options:
        from absl import flags

        f = flags.FLAGS
        options = cls(
            data_path=f.data_path,
            workdir=os.path.abspath(f.workdir),
            steps=f.steps,
            seeds=f.seeds,
            jobs=f.jobs,
            holdout_fraction=f.holdout_fraction,
            eval_tokens=f.eval_tokens,
            evals=f.evals,
            overrides=tuple(f.set),
            updates_per_row=f["updates_per_row"].value if "updates_per_row" in f else 0.0,
        )
        options.check()
        return options

    def check(self) -> None:
        problems = []
        for name in ("steps", "seeds", "jobs", "eval_tokens", "evals"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"--{name}: got {value!r}; expected an integer >= 1")
        if not 0 < self.holdout_fraction < 1:
            problems.append(f"--holdout_fraction: got {self.holdout_fraction}; expected (0, 1)")
        if not 0 <= self.updates_per_row < self.steps:
            problems.append(
                f"--updates_per_row: got {self.updates_per_row}; expected 0 (off) or below "
                f"--steps={self.steps} (a row is updated at most once per step)"
            )
        if problems:
            raise ValueError("; ".join(problems))

    def command_args(self) -> list[str]:
        """The flags that reproduce these options (for summary.md)."""
        args = [
            f"--data_path={self.data_path}",
            f"--workdir={self.workdir}",
            f"--steps={self.steps}",
            f"--seeds={self.seeds}",
            f"--jobs={self.jobs}",
            f"--holdout_fraction={self.holdout_fraction}",
            f"--eval_tokens={self.eval_tokens}",
            f"--evals={self.evals}",
        ]
        if self.updates_per_row:
            args.append(f"--updates_per_row={self.updates_per_row:g}")
        return args + [f"--set={o}" for o in self.overrides]


def shipped_config(name: str) -> ml_collections.ConfigDict:
    """A config shipped in `engram_jax/configs/` (e.g. "tiny"), which experiments start from and
    change only where they differ."""
    return config_lib.load_config_file(configs.config_path(name))


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.hidden_size=64' -> (['model', 'hidden_size'], 64)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set: got {text!r}; expected KEY=VALUE, e.g. model.hidden_size=64")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.split("."), value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies `--set` overrides in place; an unknown key raises ConfigError naming it."""
    for text in overrides:
        path, value = parse_override(text)
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        config_lib.apply_values(config, nested, "--set")
