"""Trains an experiment's runs: each in `<workdir>/runs/<name>/` (in this process with `--jobs=1`,
else in J subprocesses of `python -m engram_jax.train`), skipping runs that finished earlier and
resuming interrupted ones from their checkpoints (the trainer does that by itself), with one
progress line per run and one record per run for `results.json`.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from engram_jax import config as config_lib
from engram_jax.accounting import account
from engram_jax.experiments import budget
from engram_jax.experiments.heldout import Corpus, setup
from engram_jax.experiments.options import Options, apply_overrides
from engram_jax.metrics import last_by_step, read_metrics

RUN_RESULT_FILE = "result.json"  # Written when a run finished; its presence skips the run.
RUN_CONFIG_FILE = "config.json"
JSON_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "json_config.py")


def training_config(
    base: ml_collections.ConfigDict,
    options: Options,
    corpus: Corpus,
    *,
    steps: int | None = None,
    seed: int = 0,
) -> ml_collections.ConfigDict:
    """The base config with the data, budget, evaluation schedule and seed of one run."""
    c = copy.deepcopy(base)
    steps = steps or options.steps
    c.num_train_steps = steps
    c.seed = seed
    c.data_path = corpus.path
    c.tokenizer_path = corpus.tokenizer_path
    c.eval_data_path = corpus.eval_path
    tokens_per_batch = c.batch_size * c.seq_len
    c.eval_batches = max(
        1,
        min(
            math.ceil(options.eval_tokens / tokens_per_batch),
            corpus.eval_tokens_available // tokens_per_batch,
        ),
    )
    c.eval_every = max(1, steps // options.evals)
    c.checkpoint_every = max(1, steps // 4)
    c.log_every = max(1, min(c.log_every, steps // 50 or 1))
    c.warmup_steps = min(c.warmup_steps, max(0, steps // 10))
    return c


@dataclasses.dataclass
class RunSpec:
    """One training run: `name` is unique within the experiment (a directory name).

    `pair` is the pairing key: runs of one comparison with the same key share the seed (so the
    data order and the initial values of every parameter the models share); it defaults to the
    seed, and experiments with several budgets add the budget.
    """

    name: str
    seed: int
    config: ml_collections.ConfigDict
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)
    pair: str = ""

    def __post_init__(self) -> None:
        self.pair = self.pair or f"s{self.seed}"


def run_dir(workdir: str, spec: RunSpec) -> str:
    return os.path.join(workdir, "runs", spec.name)


def run_command(workdir: str, spec: RunSpec) -> list[str]:
    """The `python -m engram_jax.train` command that trains (or resumes) this run."""
    directory = run_dir(workdir, spec)
    return [
        sys.executable,
        "-m",
        "engram_jax.train",
        f"--config={JSON_CONFIG}:{os.path.join(directory, RUN_CONFIG_FILE)}",
        f"--workdir={directory}",
    ]


def _write_config(directory: str, spec: RunSpec) -> None:
    """Writes the run's config, refusing to reuse a directory trained with another one."""
    values = config_lib.to_dict(spec.config)
    path = os.path.join(directory, RUN_CONFIG_FILE)
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved != json.loads(json.dumps(values)):
            raise ValueError(
                f"{directory}: holds run {spec.name!r} trained with another config (flags "
                "changed since); use a new --workdir or delete that run directory"
            )
        return
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(values, f, indent=2)
    os.replace(path + ".tmp", path)


def run_record(
    workdir: str, spec: RunSpec, wall_seconds: float | None, diverged: bool = False
) -> dict[str, Any]:
    """The run's results.json entry from its config and `metrics.jsonl`.

    A diverged run (training stopped on a non-finite loss or gradient) has `diverged: true`,
    `diverged_at_step` and null final metrics. The budget keys (`tokens_seen`,
    `updates_per_row_mean`, ...) come from replaying the run's training stream
    (`budget.table_usage`) over the steps it trained.
    """
    cfg = config_lib.validate(spec.config)
    acc = account(cfg.model, cfg.train.seq_len)
    rows = read_metrics(run_dir(workdir, spec))
    steps, losses = last_by_step(rows, "eval_loss")
    _, bpb = last_by_step(rows, "eval_bits_per_byte")
    train_steps, _ = last_by_step(rows, "train_loss")
    if diverged:
        steps, losses, bpb = [None], [None], [None]
    elif not steps or steps[-1] != cfg.train.num_train_steps:
        raise RuntimeError(
            f"run {spec.name}: metrics.jsonl has no evaluation at the final step "
            f"{cfg.train.num_train_steps} (last: {steps[-1] if steps else None})"
        )
    diverged_at = (train_steps[-1] + 1 if train_steps else 1) if diverged else None
    usage = budget.table_usage(spec.config, steps=diverged_at - 1 if diverged else None)
    return {
        "name": spec.name,
        "seed": spec.seed,
        "pair": spec.pair,
        **spec.labels,
        "total_params": acc.total_params,
        "activated_params": acc.activated_params,
        "total_params_excl_embeddings": acc.total_params_excl_embeddings,
        "activated_params_excl_embeddings": acc.activated_params_excl_embeddings,
        "engram_table_params": acc.engram_table_params,
        "table_param_share": acc.engram_table_params / acc.total_params,
        "allocation_ratio": acc.allocation_ratio,
        "flops_per_token": acc.flops_per_token,
        "steps": cfg.train.num_train_steps,
        "tokens": cfg.train.num_train_steps * cfg.train.batch_size * cfg.train.seq_len,
        **usage.as_record(),
        "final_eval_loss": losses[-1],
        "eval_bits_per_byte": bpb[-1],
        "wall_seconds": wall_seconds,
        "diverged": diverged,
        "diverged_at_step": diverged_at,
        "run_dir": os.path.relpath(run_dir(workdir, spec), workdir),
    }


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _progress(index: int, total: int, name: str, text: str) -> None:
    print(f"[{index}/{total}] {name}: {text}", flush=True)


def _finish(workdir: str, spec: RunSpec, seconds: float, diverged: bool = False) -> dict[str, Any]:
    record = run_record(workdir, spec, seconds, diverged)
    path = os.path.join(run_dir(workdir, spec), RUN_RESULT_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    return record


def _done_line(record: dict[str, Any], seconds: float) -> str:
    if record["diverged"]:
        return (
            f"DIVERGED (non-finite loss or gradient) at step {record['diverged_at_step']} after "
            f"{_duration(seconds)}; recorded as diverged"
        )
    return (
        f"done in {_duration(seconds)} | eval loss {record['final_eval_loss']:.4f} | "
        f"{record['eval_bits_per_byte']:.4f} bits/byte"
    )


def run_experiment(
    workdir: str, specs: Sequence[RunSpec], jobs: int, allow_divergence: bool = False
) -> list[dict[str, Any]]:
    """Trains every run not finished yet; returns the records in `specs` order.

    With `allow_divergence`, a run the trainer stops on a non-finite loss or gradient is a
    result (recorded as diverged), not a failure.

    Raises:
      RuntimeError: some runs failed (each named with the tail of its log); the others finish.
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique; got {names}")
    total = len(specs)
    records: dict[str, dict[str, Any]] = {}
    pending: list[tuple[int, RunSpec]] = []
    for index, spec in enumerate(specs, start=1):
        directory = run_dir(workdir, spec)
        _write_config(directory, spec)
        result = os.path.join(directory, RUN_RESULT_FILE)
        if os.path.exists(result):
            with open(result, encoding="utf-8") as f:
                records[spec.name] = json.load(f)
            _progress(index, total, spec.name, "finished earlier (skipped)")
        else:
            pending.append((index, spec))
    if jobs <= 1:
        for index, spec in pending:
            records[spec.name] = _train_in_process(workdir, spec, index, total, allow_divergence)
    else:
        failures = _train_in_subprocesses(workdir, pending, jobs, total, records, allow_divergence)
        if failures:
            raise RuntimeError("runs failed:\n" + "\n".join(failures))
    return [records[s.name] for s in specs]


def _train_in_process(
    workdir: str, spec: RunSpec, index: int, total: int, allow_divergence: bool
) -> dict[str, Any]:
    from engram_jax import train as train_lib

    directory = run_dir(workdir, spec)
    resumed = os.path.isdir(os.path.join(directory, "checkpoints"))
    _progress(index, total, spec.name, "resuming" if resumed else "training")
    start = time.perf_counter()
    diverged = False
    try:
        train_lib.train_and_evaluate(spec.config, directory)
    except FloatingPointError:
        if not allow_divergence:
            raise
        diverged = True
    seconds = time.perf_counter() - start
    record = _finish(workdir, spec, seconds, diverged)
    _progress(index, total, spec.name, _done_line(record, seconds))
    return record


def _log_tail(path: str, lines: int = 20) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _train_in_subprocesses(
    workdir: str,
    pending: Sequence[tuple[int, RunSpec]],
    jobs: int,
    total: int,
    records: dict[str, dict[str, Any]],
    allow_divergence: bool,
) -> list[str]:
    queue = list(pending)
    running: list[tuple[int, RunSpec, subprocess.Popen, float, Any]] = []
    failures: list[str] = []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    try:
        while queue or running:
            while queue and len(running) < jobs:
                index, spec = queue.pop(0)
                directory = run_dir(workdir, spec)
                resumed = os.path.isdir(os.path.join(directory, "checkpoints"))
                _progress(index, total, spec.name, "resuming" if resumed else "training")
                log = open(os.path.join(directory, "train.log"), "a", encoding="utf-8")  # noqa: SIM115
                process = subprocess.Popen(
                    run_command(workdir, spec), stdout=log, stderr=subprocess.STDOUT, env=env
                )
                running.append((index, spec, process, time.perf_counter(), log))
            time.sleep(0.2)
            still = []
            for item in running:
                index, spec, process, start, log = item
                if process.poll() is None:
                    still.append(item)
                    continue
                log.close()
                seconds = time.perf_counter() - start
                log_path = os.path.join(run_dir(workdir, spec), "train.log")
                diverged = (
                    process.returncode != 0
                    and allow_divergence
                    and "FloatingPointError" in _log_tail(log_path, 60)
                )
                if process.returncode != 0 and not diverged:
                    message = f"exit status {process.returncode}; see {log_path}"
                    _progress(index, total, spec.name, "FAILED: " + message)
                    failures.append(f"{spec.name}: {message}\n{_log_tail(log_path)}")
                    continue
                records[spec.name] = _finish(workdir, spec, seconds, diverged)
                _progress(index, total, spec.name, _done_line(records[spec.name], seconds))
            running = still
    finally:
        for _, _, process, _, log in running:  # interrupted: stop the children we started
            process.terminate()
            process.wait()
            log.close()
    return failures


def start(
    base: ml_collections.ConfigDict,
) -> tuple[Options, ml_collections.ConfigDict, Corpus, list[str], list[str]]:
    """What every experiment's `main` does first: the flags' options, the base config with the
    `--set` overrides applied (in place), and the workdir's corpus with its train and held-out
    documents."""
    options = Options.from_flags()
    apply_overrides(base, options.overrides)
    corpus, train, held_out = setup(options, base)
    return options, base, corpus, train, held_out


@dataclasses.dataclass
class Outcome:
    """A finished experiment: what its report reads."""

    options: Options
    corpus: Corpus
    held_out: list[str]
    specs: list[RunSpec]
    runs: list[dict[str, Any]]


def run_all(
    options: Options,
    corpus: Corpus,
    held_out: list[str],
    specs: list[RunSpec],
    describe: Callable[[RunSpec], str],
    allow_divergence: bool = False,
) -> Outcome:
    """Prints each configuration's accounting, then trains every run (`run_experiment`)."""
    print_configs(specs, describe)
    runs = run_experiment(options.workdir, specs, options.jobs, allow_divergence)
    return Outcome(options, corpus, held_out, specs, runs)


def print_configs(specs: Sequence[RunSpec], describe: Callable[[RunSpec], str]) -> None:
    """Prints each distinct configuration's accounting once (the first seed) before training;
    runs that `describe` names "" are left out (e.g. the same model at another budget)."""
    for spec in specs:
        label = describe(spec)
        if spec.seed != specs[0].seed or not label:
            continue
        cfg = config_lib.validate(spec.config)
        acc = account(cfg.model, cfg.train.seq_len)
        rho = "-" if acc.allocation_ratio is None else f"{acc.allocation_ratio:.3f}"
        print(
            f"{label}: total {acc.total_params:,} | activated {acc.activated_params:,} | "
            f"excl. embeddings {acc.total_params_excl_embeddings:,} / "
            f"{acc.activated_params_excl_embeddings:,} | Engram tables "
            f"{acc.engram_table_params:,} | rho {rho}",
            flush=True,
        )
