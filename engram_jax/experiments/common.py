"""What every experiment shares: flags, the held-out corpus, the run loop and `results.json`.

An experiment is a list of `RunSpec`s (a name, a seed and a full training config) and a report.
`run_experiment` trains each run in `<workdir>/runs/<name>/` (in this process with `--jobs=1`,
else in J subprocesses of `python -m engram_jax.train`), skips runs that finished earlier,
resumes interrupted ones from their checkpoints (the trainer does that by itself), prints one
progress line per run, and returns one record per run for `results.json`.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from engram_jax import config as config_lib
from engram_jax import data as data_lib
from engram_jax.accounting import account
from engram_jax.experiments import floors
from engram_jax.metrics import read_metrics

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.md"
RUN_RESULT_FILE = "result.json"  # Written when a run finished; its presence skips the run.
RUN_CONFIG_FILE = "config.json"
JSON_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "json_config.py")


# ------------------------------------------------------------------------------------------ flags


def define_flags(*, default_steps: int, default_seeds: int) -> None:
    """The flags every experiment takes (each module adds its own)."""
    from absl import flags

    flags.DEFINE_string("data_path", None, "Text corpus (any format engram_jax.data reads).")
    flags.DEFINE_string("workdir", None, "Output directory: runs/, results.json, PNGs, summary.md.")
    flags.DEFINE_integer("steps", default_steps, "Training steps per run (the base budget).")
    flags.DEFINE_integer("seeds", default_seeds, "Seeds per configuration (0, 1, ...).")
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
        if problems:
            raise ValueError("; ".join(problems))


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


# ----------------------------------------------------------------------------------------- corpus


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The experiment's copy of a corpus: the train documents and the held-out tail.

    `path` is a JSONL file of the train documents and `eval_path` one of the held-out text (the
    trainer's `data_path` and `eval_data_path`); `tokenizer_path` is one BPE trained on the train
    documents and shared by every run (losses of all runs are in the same tokens).
    """

    path: str
    eval_path: str
    tokenizer_path: str
    num_train: int
    num_eval: int
    train_chars: int
    eval_chars: int
    eval_tokens_available: int  # Held-out tokens (eos included), the most an evaluation can read.


def split_text(documents: Sequence[str], holdout_fraction: float) -> tuple[list[str], list[str]]:
    """Holds out the last `holdout_fraction` of the characters of the documents, in order.

    The document where the cut falls is split at the first line start at or after the cut (or at
    the cut itself if no line break follows), so one long document (a whole book) works too.

    Raises:
      ValueError: either side would be empty.
    """
    total = sum(len(d) for d in documents)
    cut = total - int(round(holdout_fraction * total))
    seen = 0
    for index, document in enumerate(documents):
        if seen + len(document) > cut:
            offset = cut - seen
            if offset > 0 and document[offset - 1] != "\n":  # not at a line start: move to one
                newline = document.find("\n", offset)
                offset = newline + 1 if newline >= 0 else offset
            head, tail = document[:offset], document[offset:]
            train = list(documents[:index]) + ([head] if head.strip() else [])
            held_out = ([tail] if tail.strip() else []) + list(documents[index + 1 :])
            break
        seen += len(document)
    else:
        train, held_out = list(documents), []
    if not train or not held_out:
        raise ValueError(
            f"--holdout_fraction={holdout_fraction}: leaves {len(train)} train and "
            f"{len(held_out)} held-out documents out of {len(documents)} ({total} characters); "
            "expected both sides non-empty"
        )
    return train, held_out


def prepare_corpus(
    data_path: str, holdout_fraction: float, workdir: str, vocab_size: int
) -> tuple[Corpus, list[str], list[str]]:
    """Writes `<workdir>/data/corpus.jsonl` and `tokenizer.json` once; later calls reuse them.

    Returns the corpus and its (train, held-out) documents.

    Raises:
      ValueError: the workdir already holds a corpus made from other data or settings.
    """
    documents = data_lib.load_documents(data_path)
    digest = hashlib.sha256()
    for document in documents:
        digest.update(hashlib.sha256(document.encode("utf-8")).digest())
    source = {
        "data_path": os.path.abspath(data_path),
        "documents_sha256": digest.hexdigest(),
        "holdout_fraction": holdout_fraction,
        "vocab_size": vocab_size,
    }
    directory = os.path.join(workdir, "data")
    os.makedirs(directory, exist_ok=True)
    source_path = os.path.join(directory, "source.json")
    corpus_path = os.path.join(directory, "corpus.jsonl")
    eval_path = os.path.join(directory, "eval.jsonl")
    tokenizer_path = os.path.join(directory, "tokenizer.json")
    if os.path.exists(source_path):
        with open(source_path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved != source:
            differing = sorted(k for k in source if saved.get(k) != source[k])
            was = {k: saved.get(k) for k in differing}
            now = {k: source[k] for k in differing}
            raise ValueError(
                f"{workdir}: made from other data or settings (saved {was}, now {now}); use a "
                "new --workdir"
            )
    train, held_out = split_text(documents, holdout_fraction)
    paths = (corpus_path, eval_path, tokenizer_path)
    if not all(os.path.exists(path) for path in paths):
        for path, documents_of_split in ((corpus_path, train), (eval_path, held_out)):
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                for document in documents_of_split:
                    f.write(json.dumps({"text": document}) + "\n")
            os.replace(path + ".tmp", path)
        tokenizer = data_lib.load_or_train_tokenizer(
            "", train, vocab_size, cache_dir=os.path.join(directory, "tokenizer_cache")
        )
        tokenizer.save(tokenizer_path + ".tmp")
        os.replace(tokenizer_path + ".tmp", tokenizer_path)
        with open(source_path, "w", encoding="utf-8") as f:
            json.dump(source, f, indent=2)
    tokenizer = data_lib.load_tokenizer(tokenizer_path)
    encode = data_lib.make_encoder(tokenizer)
    eval_tokens = sum(len(encode(d)) + 1 for d in held_out)
    corpus = Corpus(
        path=corpus_path,
        eval_path=eval_path,
        tokenizer_path=tokenizer_path,
        num_train=len(train),
        num_eval=len(held_out),
        train_chars=sum(len(d) for d in train),
        eval_chars=sum(len(d) for d in held_out),
        eval_tokens_available=eval_tokens,
    )
    return corpus, train, held_out


def evaluated_text(held_out: Sequence[str], tokenizer_path: str, num_tokens: int) -> str:
    """The held-out text an evaluation of `num_tokens` target tokens scores, in order.

    The eval stream packs the held-out documents in order (eos after each); its targets are the
    tokens after the first of each document, so this decodes exactly those tokens (eos has no
    bytes): the bits-per-byte denominator and the compression floors see the same bytes.
    """
    tokenizer = data_lib.load_tokenizer(tokenizer_path)
    encode = data_lib.make_encoder(tokenizer)
    pieces, left = [], num_tokens
    for document in held_out:
        ids = encode(document)
        targets = ids[1:]  # inputs x_0..x_{n-1}, targets x_1..x_n (x_n is the eos)
        take = min(left, len(targets) + 1)
        pieces.append(tokenizer.decode(targets[:take].tolist()) if take else "")
        left -= take
        if left <= 0:
            break
    return "".join(pieces)


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


# ------------------------------------------------------------------------------------------- runs


@dataclasses.dataclass
class RunSpec:
    """One training run: `name` is unique within the experiment (a directory name)."""

    name: str
    seed: int
    config: ml_collections.ConfigDict
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)


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


def last_by_step(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, one value per step (a resumed run's later row wins)."""
    by_step = {int(r["step"]): float(r[key]) for r in rows if key in r}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def run_record(
    workdir: str, spec: RunSpec, wall_seconds: float | None, diverged: bool = False
) -> dict[str, Any]:
    """The run's results.json entry from its config and `metrics.jsonl`.

    A diverged run (training stopped on a non-finite loss or gradient) has `diverged: true`,
    `diverged_at_step` and null final metrics.
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
    return {
        "name": spec.name,
        "seed": spec.seed,
        **spec.labels,
        "total_params": acc.total_params,
        "activated_params": acc.activated_params,
        "total_params_excl_embeddings": acc.total_params_excl_embeddings,
        "activated_params_excl_embeddings": acc.activated_params_excl_embeddings,
        "engram_table_params": acc.engram_table_params,
        "allocation_ratio": acc.allocation_ratio,
        "flops_per_token": acc.flops_per_token,
        "steps": cfg.train.num_train_steps,
        "tokens": cfg.train.num_train_steps * cfg.train.batch_size * cfg.train.seq_len,
        "final_eval_loss": losses[-1],
        "eval_bits_per_byte": bpb[-1],
        "wall_seconds": wall_seconds,
        "diverged": diverged,
        "diverged_at_step": (train_steps[-1] + 1 if train_steps else 1) if diverged else None,
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


# ---------------------------------------------------------------------------------------- results


def write_summary(workdir: str, lines: Sequence[str]) -> str:
    """Writes `summary.md` from its lines (replaced whole, like `results.json`)."""
    path = os.path.join(workdir, SUMMARY_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)
    return path


def write_results(workdir: str, experiment: str, runs: list[dict[str, Any]], **extra: Any) -> str:
    path = os.path.join(workdir, RESULTS_FILE)
    payload = {"experiment": experiment, **extra, "runs": runs}
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, allow_nan=False, default=_json_default)
    os.replace(path + ".tmp", path)
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the values that are not None
    (diverged runs); NaN when none is left."""
    values = [v for v in values if v is not None]
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def group(runs: Sequence[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    """Runs grouped by `run[key]`, in first-appearance order."""
    out: dict[Any, list[dict[str, Any]]] = {}
    for run in runs:
        out.setdefault(run[key], []).append(run)
    return out


def floors_for(held_out: Sequence[str], corpus: Corpus, eval_tokens: int) -> dict[str, Any]:
    """xz -9e and bzip2 -9 bits per byte of the evaluated bytes and of the whole held-out split."""
    scored = evaluated_text(held_out, corpus.tokenizer_path, eval_tokens)
    whole = "".join(held_out)
    return {
        "evaluated": {"bytes": len(scored.encode("utf-8")), **floors.bits_per_byte(scored)},
        "held_out": {"bytes": len(whole.encode("utf-8")), **floors.bits_per_byte(whole)},
    }


def summary_header(
    title: str,
    experiment: str,
    options: Options,
    corpus: Corpus,
    eval_tokens: int,
    compression: dict[str, Any],
) -> list[str]:
    """The lines every summary.md starts with: command, corpus, evaluation and floors."""
    args = [
        f"--data_path={options.data_path}",
        f"--workdir={options.workdir}",
        f"--steps={options.steps}",
        f"--seeds={options.seeds}",
        f"--jobs={options.jobs}",
        f"--holdout_fraction={options.holdout_fraction}",
        f"--eval_tokens={options.eval_tokens}",
        f"--evals={options.evals}",
    ] + [f"--set={o}" for o in options.overrides]
    ev, ho = compression["evaluated"], compression["held_out"]
    return [
        f"# {title}",
        "",
        "```bash",
        f"python -m engram_jax.experiments.{experiment} " + " \\\n    ".join(args),
        "```",
        "",
        f"Corpus: `{options.data_path}`: {corpus.train_chars:,} characters train, "
        f"{corpus.eval_chars:,} held out (the last {options.holdout_fraction:.0%} of the text, "
        f"{corpus.eval_tokens_available:,} tokens). Each evaluation scores the first "
        f"{eval_tokens:,} held-out tokens ({ev['bytes']:,} bytes).",
        "",
        "Compression floors on the same bytes (a language model worth the name beats them): "
        f"`xz -9e` {ev['xz_9e']:.3f}, `bzip2 -9` {ev['bzip2_9']:.3f} bits/byte "
        f"(whole held-out split: {ho['xz_9e']:.3f} and {ho['bzip2_9']:.3f}).",
        "",
    ]


def accounting_table(runs: Sequence[dict[str, Any]], label: str) -> list[str]:
    """One markdown row per distinct configuration (the first seed's record)."""
    lines = [
        f"| {label} | total params | activated | total excl. emb. | activated excl. emb. | "
        "Engram tables | rho |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, members in group(runs, label).items():
        r = members[0]
        rho = "-" if r["allocation_ratio"] is None else f"{r['allocation_ratio']:.3f}"
        lines.append(
            f"| {key} | {r['total_params']:,} | {r['activated_params']:,} | "
            f"{r['total_params_excl_embeddings']:,} | {r['activated_params_excl_embeddings']:,} | "
            f"{r['engram_table_params']:,} | {rho} |"
        )
    return lines


def print_configs(specs: Sequence[RunSpec], describe: Callable[[RunSpec], str]) -> None:
    """Prints each distinct configuration's accounting once (seed 0) before training."""
    for spec in specs:
        if spec.seed != specs[0].seed:
            continue
        cfg = config_lib.validate(spec.config)
        acc = account(cfg.model, cfg.train.seq_len)
        rho = "-" if acc.allocation_ratio is None else f"{acc.allocation_ratio:.3f}"
        print(
            f"{describe(spec)}: total {acc.total_params:,} | activated {acc.activated_params:,} | "
            f"excl. embeddings {acc.total_params_excl_embeddings:,} / "
            f"{acc.activated_params_excl_embeddings:,} | Engram tables "
            f"{acc.engram_table_params:,} | rho {rho}",
            flush=True,
        )


def setup(options: Options, base: ml_collections.ConfigDict) -> tuple[Corpus, list[str], list[str]]:
    """Prepares the workdir's corpus and tokenizer; returns the corpus and its train and
    held-out documents."""
    os.makedirs(options.workdir, exist_ok=True)
    corpus, train, held_out = prepare_corpus(
        options.data_path, options.holdout_fraction, options.workdir, base.model.vocab_size
    )
    print(
        f"corpus {options.data_path}: {corpus.num_train} train / {corpus.num_eval} held-out "
        f"documents, {corpus.eval_tokens_available:,} held-out tokens",
        flush=True,
    )
    return corpus, train, held_out


def evaluated_tokens(config: ml_collections.ConfigDict) -> int:
    """Tokens one evaluation of this config scores."""
    return config.eval_batches * config.batch_size * config.seq_len
