"""Optax pieces of the trainer: learning-rate schedules, the dense AdamW chain, the Engram-table
optimizer, and the split of a parameter tree into dense and memory (table) trees by parameter path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

logger = logging.getLogger(__name__)

ScheduleKind = Literal["cosine", "wsd", "constant"]

# Memory tables are parameters named `table` inside a module whose name starts with `engram`
# (`.../engram/table`, `.../engram_3/table`) or of the OverEncoding and per-layer-embedding
# modules (`overencoding/table`, `ple/table`), and UltraMem's value tables (`.../ultramem/values`);
# the optimizer split keys on this (docs/design.md §1.11: the tables get their own optimizer).
DEFAULT_MEMORY_PATTERN = r"(^|/)((engram[^/]*|overencoding|ple)/table|ultramem/values)$"

_SEP = "/"


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------


def learning_rate_schedule(
    peak: float,
    warmup_steps: int,
    total_steps: int,
    kind: ScheduleKind = "cosine",
    final_fraction: float = 0.1,
    decay_fraction: float = 0.2,
) -> optax.Schedule:
    """Linear warmup from 0 to `peak`, then one of three shapes.

    - `"cosine"`: cosine decay from `peak` at `warmup_steps` to `final_fraction * peak` at
      `total_steps`.
    - `"wsd"` (warmup-stable-decay): `peak` until the last `decay_fraction` of `total_steps`, then a
      linear decay to `final_fraction * peak` at `total_steps`.
    - `"constant"`: `peak` after warmup.

    The value at step 0 is 0 when `warmup_steps > 0` (a step-0 update of size 0 is harmless and
    keeps warmup exactly linear: `lr(s) = peak * s / warmup_steps`). After `total_steps` the
    schedule holds its final value.

    Args:
      peak: peak learning rate, > 0.
      warmup_steps: linear warmup length, in [0, total_steps].
      total_steps: length of the run, > 0.
      kind: schedule shape after warmup.
      final_fraction: final value as a fraction of `peak` ("cosine" and "wsd"), in [0, 1].
      decay_fraction: fraction of `total_steps` spent decaying ("wsd" only), in (0, 1].

    Returns:
      An optax schedule `step -> learning rate`.

    Raises:
      ValueError: for out-of-range arguments, naming the argument and value.
    """
    if not peak > 0:
        raise ValueError(f"learning_rate_schedule: peak={peak}; expected > 0")
    if not total_steps > 0:
        raise ValueError(f"learning_rate_schedule: total_steps={total_steps}; expected > 0")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"learning_rate_schedule: warmup_steps={warmup_steps}; expected in "
            f"[0, total_steps={total_steps}]"
        )
    if not 0.0 <= final_fraction <= 1.0:
        raise ValueError(
            f"learning_rate_schedule: final_fraction={final_fraction}; expected in [0, 1]"
        )
    end_value = peak * final_fraction
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))

    if kind == "cosine":
        decay_steps = total_steps - warmup_steps
        if decay_steps == 0:
            return _with_warmup(warmup, optax.constant_schedule(peak), warmup_steps)
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=final_fraction)
    elif kind == "wsd":
        after = _stable_then_decay(peak, end_value, warmup_steps, total_steps, decay_fraction)
    elif kind == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(
            f"learning_rate_schedule: kind={kind!r}; expected one of 'cosine', 'wsd', 'constant'"
        )
    return _with_warmup(warmup, after, warmup_steps)


def _stable_then_decay(
    peak: float, end_value: float, warmup_steps: int, total_steps: int, decay_fraction: float
) -> optax.Schedule:
    """WSD after warmup: `peak`, then a linear decay to `end_value` over the last
    `decay_fraction` of `total_steps`."""
    if not 0.0 < decay_fraction <= 1.0:
        raise ValueError(
            f"learning_rate_schedule: decay_fraction={decay_fraction}; expected in (0, 1]"
        )
    decay_steps = round(decay_fraction * total_steps)
    stable_steps = total_steps - warmup_steps - decay_steps
    if stable_steps < 0:
        raise ValueError(
            f"learning_rate_schedule: warmup_steps={warmup_steps} + decay steps "
            f"{decay_steps} (decay_fraction={decay_fraction} x total_steps={total_steps}) "
            f"exceed total_steps={total_steps}"
        )
    return optax.join_schedules(
        [
            optax.constant_schedule(peak),
            optax.linear_schedule(peak, end_value, max(decay_steps, 1)),
        ],
        [stable_steps],
    )


def _with_warmup(
    warmup: optax.Schedule, after: optax.Schedule, warmup_steps: int
) -> optax.Schedule:
    """Warmup for `warmup_steps` steps, then `after` counted from 0; no warmup when 0."""
    if warmup_steps == 0:
        return after
    return optax.join_schedules([warmup, after], [warmup_steps])


# --------------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------------


# Gains, biases and mixing coefficients, by name. Rank cannot tell them from matrices: Engram's
# per-stream gains are [G, D], mHC's b_res is [G, G], and a scanned layer axis makes vectors 2-D.
_NO_DECAY = re.compile(r"(scale|bias|norm)$|^(b|static|alpha|s)_")


def decay_mask(params: Any) -> Any:
    """True for weight matrices (kernels, embeddings, expert weights, projections); False for norm
    gains, biases and the hyper-connections' biases, static mixings and scalar scales.

    Decaying a norm gain towards 0 (rather than its init of 1), or mHC's `b_res` off-diagonal -8
    towards 0 (H_res towards uniform mixing), only fights the model; the usual LM practice
    (GPT-2/3, Llama) is to decay matrices only.
    """

    def decays(path, leaf) -> bool:
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        return jnp.ndim(leaf) >= 2 and not _NO_DECAY.search(name)

    return jax.tree_util.tree_map_with_path(decays, params)


def dense_optimizer(
    schedule: optax.ScalarOrSchedule,
    weight_decay: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW for the dense (non-table) parameters, after global-norm gradient clipping.

    Order: clip the raw gradients' global norm to `clip_norm`, then AdamW. Weight decay is decoupled
    (AdamW: `-lr * wd * p` added to the update) and masked off for leaves with fewer than 2 dims
    (norm gains, biases); see `decay_mask`. The paper's backbone optimizer is Muon (docs/design.md
    §1.11); AdamW is our default because optax ships it and it is the common baseline.

    Args:
      schedule: learning rate, a float or an optax schedule.
      weight_decay: decoupled weight decay for >= 2-D leaves (0.1 in docs/design.md §1.11).
      b1: Adam first-moment decay.
      b2: Adam second-moment decay.
      eps: Adam epsilon.
      clip_norm: global-norm clip threshold over the dense gradients; None disables clipping.

    Returns:
      An optax `GradientTransformation`.
    """
    _check_positive_or_none("dense_optimizer", "clip_norm", clip_norm)
    if weight_decay < 0:
        raise ValueError(f"dense_optimizer: weight_decay={weight_decay}; expected >= 0")
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


def memory_optimizer(
    schedule: optax.ScalarOrSchedule,
    lr_multiplier: float = 5.0,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """Adam for the Engram embedding tables, at `lr_multiplier` times the base schedule.

    Defaults follow docs/design.md §1.11 (tables: Adam at 5x the base LR, no weight decay); §9.2
    lists these values as unverified (secondary transcriptions only), so they are arguments. This is
    dense Adam over the whole table: rows not looked up this step get zero gradient, but their
    moments still decay and their momentum update is still applied. Row-wise sparse updates live in
    `tables/device_step.py` (the default, `table_update="sparse"`).

    `clip_norm`, when set, clips the global norm of the memory gradients alone; the dense clip in
    `dense_optimizer` does not see the tables, because the two trees have separate optimizer states.

    Args:
      schedule: the BASE learning rate (float or schedule); it is multiplied by `lr_multiplier`.
      lr_multiplier: factor on the base learning rate, > 0.
      b1: Adam first-moment decay.
      b2: Adam second-moment decay.
      eps: Adam epsilon.
      weight_decay: decoupled weight decay on the tables (all leaves); 0 disables it.
      clip_norm: global-norm clip over the memory gradients; None (default) disables it.

    Returns:
      An optax `GradientTransformation`.
    """
    if not lr_multiplier > 0:
        raise ValueError(f"memory_optimizer: lr_multiplier={lr_multiplier}; expected > 0")
    if weight_decay < 0:
        raise ValueError(f"memory_optimizer: weight_decay={weight_decay}; expected >= 0")
    _check_positive_or_none("memory_optimizer", "clip_norm", clip_norm)
    if callable(schedule):
        base = schedule

        def scaled(step):
            return lr_multiplier * base(step)

        learning_rate: optax.ScalarOrSchedule = scaled
    else:
        learning_rate = lr_multiplier * schedule
    if weight_decay > 0:
        adam = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    else:
        adam = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    if clip_norm is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(clip_norm), adam)


def _check_positive_or_none(fn: str, name: str, value: float | None) -> None:
    """Raises ValueError unless value is None or > 0."""
    if value is not None and not value > 0:
        raise ValueError(f"{fn}: {name}={value}; expected > 0 or None")


# --------------------------------------------------------------------------------------------------
# Dense / memory split
# --------------------------------------------------------------------------------------------------


def is_memory_path(path: str, pattern: str = DEFAULT_MEMORY_PATTERN) -> bool:
    """Whether a "/"-joined parameter path names an Engram table (regex search of `pattern`)."""
    return re.search(pattern, path) is not None


def _flatten(tree: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Flattens a nested dict to {"a/b/c": leaf}, keeping empty sub-dicts so merges are exact."""
    if not isinstance(tree, Mapping):
        raise TypeError(f"{name}: expected a nested dict of parameters; got {type(tree).__name__}")
    return traverse_util.flatten_dict(_to_dict(tree), keep_empty_nodes=True, sep=_SEP)


def _to_dict(tree: Any) -> Any:
    """Converts nested Mappings (e.g. FrozenDict) to plain dicts."""
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def partition_params(
    params: Mapping[str, Any], pattern: str = DEFAULT_MEMORY_PATTERN
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits a nested parameter dict into (dense, memory) trees by path.

    A leaf whose "/"-joined path matches `pattern` (see `is_memory_path`) goes to `memory`, every
    other leaf to `dense`. Both keep their full nested paths, so `merge_params(dense, memory)`
    rebuilds `params` exactly (empty sub-dicts included); they are separate trees so that they get
    separate optimizer states and separate checkpoint items. `memory` is `{}` when nothing matches.

    Args:
      params: nested dict (or FrozenDict) of arrays, e.g. `variables["params"]`.
      pattern: regex searched in each path.

    Returns:
      `(dense, memory)` as plain nested dicts.

    Raises:
      TypeError: if `params` is not a mapping.
    """
    flat = _flatten(params, "partition_params: params")
    dense = {k: v for k, v in flat.items() if not is_memory_path(k, pattern)}
    memory = {k: v for k, v in flat.items() if is_memory_path(k, pattern)}
    logger.debug("partition_params: %d dense leaves, %d memory leaves", len(dense), len(memory))
    return (
        traverse_util.unflatten_dict(dense, sep=_SEP) if dense else {},
        traverse_util.unflatten_dict(memory, sep=_SEP) if memory else {},
    )


def merge_params(dense: Mapping[str, Any], memory: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `partition_params`: the union of the two trees' leaves.

    Raises:
      ValueError: if a path is present in both trees, naming the paths.
    """
    flat_dense = _flatten(dense, "merge_params: dense")
    flat_memory = _flatten(memory, "merge_params: memory")
    overlap = sorted(set(flat_dense) & set(flat_memory))
    if overlap:
        raise ValueError(
            f"merge_params: paths present in both dense and memory trees: {overlap}; "
            "expected disjoint trees from partition_params"
        )
    merged = {**flat_dense, **flat_memory}
    return traverse_util.unflatten_dict(merged, sep=_SEP) if merged else {}
