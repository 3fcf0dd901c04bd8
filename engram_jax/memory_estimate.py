"""Refuse before spending: an up-front estimate of one training step's memory.

`estimate_train_step(cfg)` adds up, by arithmetic only (no arrays, nothing compiled), what one
device holds during a training step: the dense parameters with their gradients and AdamW
moments, the Engram tables with their optimizer state, and the activations the backward pass
keeps at the configured batch and sequence length (the residual streams of every layer, the
attention probabilities, the Sinkhorn iterations of mHC, the float32 logits). It counts only
what is surely resident, so it is a floor: a config above the memory available cannot run; one
below may still fail on temporaries the estimate leaves out.

`check_train_step(cfg)` compares it with the memory available (the device's `bytes_limit` on an
accelerator, host RAM on CPU, or `memory_limit_gib` when set) and raises `ConfigError` naming
the largest terms and the config keys that drive them. The trainer calls it before compiling;
`python -m engram_jax.preflight` calls it too. `memory_limit_gib < 0` disables it.
"""

from __future__ import annotations

import dataclasses
import math
import os

from engram_jax import config as config_lib

GIB = 1024**3
_BYTES = {"float32": 4, "bfloat16": 2}
# Residual-stream tensors [B, T, G, D] the backward pass keeps per hyper-connection site
# (input, normalised input, mixed streams, output): a floor, XLA keeps at least these.
_STREAM_COPIES = 4


@dataclasses.dataclass(frozen=True)
class Term:
    """One part of the estimate: bytes on one device, what it is, the keys that scale it."""

    what: str
    bytes: int
    keys: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    terms: tuple[Term, ...]
    device_bytes: int  # What one accelerator (or, on CPU, the host) holds.
    host_bytes: int  # Host-placed tables and their optimizer state (table_placement='host').

    def largest(self, count: int = 3) -> list[Term]:
        return sorted(self.terms, key=lambda t: -t.bytes)[:count]


def _shards(cfg: config_lib.Config, device_count: int) -> tuple[int, int]:
    """(batch shards, parameter shards) of the configured mesh on `device_count` devices."""
    m = cfg.mesh
    fixed = max(1, m.fsdp) * max(1, m.tensor) * (m.data if m.data > 0 else 1)
    data = m.data if m.data > 0 else max(1, device_count // fixed)
    return max(1, data * max(1, m.fsdp)), max(1, m.fsdp) * max(1, m.tensor)


def estimate_train_step(cfg: config_lib.Config, device_count: int = 1) -> MemoryEstimate:
    """The floor of one training step's memory per device (see the module docstring)."""
    from engram_jax.accounting import account

    t, model = cfg.train, cfg.model
    batch_shards, param_shards = _shards(cfg, device_count)
    batch = math.ceil(t.batch_size / batch_shards)  # sequences on one device
    tokens = batch * t.seq_len
    act = _BYTES[model.dtype]
    param = _BYTES[model.param_dtype]
    acc = account(model, t.seq_len)
    layers, d, g = model.num_layers, model.hidden_size, model.hc.n_streams
    terms = []

    # Parameters + gradients + AdamW's two moments (kept in the parameters' dtype).
    embedding = acc.embedding_params * param * 4 // param_shards
    terms.append(
        Term("token embedding and LM head (+ grads, Adam)", embedding, ("model.vocab_size",))
    )
    other = (acc.total_params - acc.embedding_params - acc.engram_table_params) * param * 4
    terms.append(
        Term(
            "other dense parameters (+ grads, Adam)",
            other // param_shards,
            ("model.num_layers", "model.hidden_size", "model.mlp_hidden_size", "model.moe"),
        )
    )
    tables = _table_bytes(cfg, acc.engram_table_params) // param_shards
    on_host = t.table_placement == "host" and model.engram.enabled
    table_keys = ("model.engram.table_rows_per_head", "model.engram.embed_per_ngram")
    if not on_host:
        terms.append(Term("Engram tables and their optimizer state", tables, table_keys))

    # Activations kept for the backward pass, on one device.
    terms.append(
        Term(
            "float32 logits, log-probabilities and their gradient",
            3 * tokens * model.vocab_size * 4,
            ("batch_size", "seq_len", "model.vocab_size"),
        )
    )
    streams = 2 * layers * _STREAM_COPIES * tokens * g * d * act
    if model.remat:  # only each block's input survives the forward pass
        streams = layers * tokens * g * d * act
    terms.append(
        Term(
            "residual streams of every layer",
            streams,
            ("batch_size", "seq_len", "model.hc.n_streams", "model.hidden_size"),
        )
    )
    heads = model.attention.num_heads
    scores = batch * heads * t.seq_len * t.seq_len * 4 * (1 if model.remat else layers)
    terms.append(
        Term(
            "attention probabilities [B, heads, T, T]",
            scores,
            ("seq_len", "batch_size", "model.attention.num_heads"),
        )
    )
    if model.hc.kind in ("mhc", "hc") and g > 1:
        iterations = model.hc.sinkhorn_iters if model.hc.kind == "mhc" else 1
        # fori_loop's backward keeps every iteration's [B, T, G, G] matrix, two sites per layer.
        sinkhorn = 2 * tokens * iterations * g * g * 4 * (1 if model.remat else layers)
        terms.append(
            Term(
                "mHC mixing matrices over the Sinkhorn iterations",
                sinkhorn,
                ("model.hc.sinkhorn_iters", "model.hc.n_streams", "batch_size", "seq_len"),
            )
        )
    device = sum(term.bytes for term in terms)
    return MemoryEstimate(tuple(terms), device, tables if on_host else 0)


def _table_bytes(cfg: config_lib.Config, table_params: int) -> int:
    """Engram tables, their gradient rows and optimizer state."""
    t, e = cfg.train, cfg.model.engram
    values = table_params * _BYTES[e.table_dtype]
    if t.table_update == "dense":  # table-sized gradient and two Adam moments
        return values + 3 * table_params * 4
    per_value = {"adam": 2, "adagrad": 0, "sgd": 0}[t.table_optimizer]
    return values + per_value * table_params * 4


def available_bytes() -> tuple[int | None, str]:
    """(bytes one device may use, where the number comes from); None when unknown."""
    import jax

    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        limit = stats.get("bytes_limit")
        if limit:
            return int(limit), f"{device.device_kind} memory_stats bytes_limit"
        return None, f"{device.device_kind} (no memory_stats)"
    return host_available_bytes(), "host RAM available (MemAvailable)"


def host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def check_train_step(cfg: config_lib.Config, device_count: int | None = None) -> MemoryEstimate:
    """Raises ConfigError when the estimate exceeds the memory available (see module docstring).

    Returns the estimate when it fits, or when the check is disabled (`memory_limit_gib < 0`).
    """
    import jax

    limit_gib = cfg.train.memory_limit_gib
    if device_count is None:
        device_count = jax.device_count()
    estimate = estimate_train_step(cfg, device_count)
    if limit_gib < 0:
        return estimate
    if limit_gib > 0:
        available, source = int(limit_gib * GIB), f"memory_limit_gib={limit_gib}"
    else:
        available, source = available_bytes()
    on_cpu = jax.local_devices()[0].platform == "cpu"
    needed = estimate.device_bytes
    if on_cpu:  # every CPU device and the host tables share host RAM
        needed = needed * max(1, jax.local_device_count()) + estimate.host_bytes
    if available is not None and needed > available:
        parts = ", ".join(
            f"{term.what} {_gib(term.bytes)} ({', '.join(term.keys)})"
            for term in estimate.largest()
        )
        raise config_lib.ConfigError(
            f"config needs at least {_gib(needed)} for one training step but {_gib(available)} "
            f"are available ({source}); largest parts: {parts}. Lower the keys named, or set "
            "memory_limit_gib (-1 disables this check)"
        )
    if estimate.host_bytes and not on_cpu:
        host = host_available_bytes()
        if limit_gib == 0 and host is not None and estimate.host_bytes > host:
            raise config_lib.ConfigError(
                f"table_placement='host': the Engram tables and their optimizer state need "
                f"{_gib(estimate.host_bytes)} of host RAM but {_gib(host)} are available; "
                "lower model.engram.table_rows_per_head or set memory_limit_gib (-1 disables "
                "this check)"
            )
    return estimate
