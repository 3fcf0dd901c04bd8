"""Slicing a smaller model out of a trained MatFormer model (docs/design.md §7.3): the kernels of
every FFN cut to the first m_i hidden units, and the config of the plain model they form.

Apart from `matformer` because it reads the model's layer runs, and the model imports `matformer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from engram_jax.config import MatformerConfig, ModelConfig
from engram_jax.model import layer_runs

# --------------------------------------------------------------------------------------------------
# Slicing a smaller model out of the trained one.
# --------------------------------------------------------------------------------------------------

# (parameter name, axis of the hidden units) of the FFN kernels: [D, F] / [F, D] dense and shared,
# [E, D, F] / [E, F, D] routed experts.
_DENSE_AXES = {"w_gate": -1, "w_up": -1, "w_down": 0}
_EXPERT_AXES = {"w_gate": -1, "w_up": -1, "w_down": 1}


def _slice_ffn(tree: dict, width: int, shared_width: int, scanned: bool) -> dict:
    """One FFN's parameters (`mlp` or `moe`, maybe stacked over a scanned run) at a width."""
    out = dict(tree)
    lead = 1 if scanned else 0
    is_moe = "router_kernel" in tree
    for name, axis in (_EXPERT_AXES if is_moe else _DENSE_AXES).items():
        if axis >= 0:
            axis += lead
        out[name] = jax.lax.slice_in_dim(tree[name], 0, width, axis=axis)
    if is_moe and "shared" in tree:
        out["shared"] = _slice_ffn(tree["shared"], shared_width, shared_width, scanned)
    return out


def slice_params(params: dict, config: ModelConfig, granularity: int | Sequence[int]) -> dict:
    """The parameters a model at `granularity` (one index, or one per layer) actually uses: every
    FFN kernel cut to its first m_i hidden units; everything else as it is.

    Raises:
      ValueError: MatFormer is off, an index is out of range, or a scanned run would mix widths.
    """
    m = config.matformer
    if not m.enabled:
        raise ValueError("slice_params: config.matformer.granularities is (); nothing to slice")
    picks = (granularity,) * config.num_layers if isinstance(granularity, int) else granularity
    picks = tuple(picks)
    if len(picks) != config.num_layers or not all(0 <= i < len(m.granularities) for i in picks):
        raise ValueError(
            f"slice_params: granularity={granularity!r}; expected one index or num_layers="
            f"{config.num_layers} indices in [0, {len(m.granularities)})"
        )
    out = dict(params)
    for run in layer_runs(config):
        run_picks = set(picks[run.start : run.stop])
        if len(run_picks) > 1:
            raise ValueError(
                f"slice_params: layers {run.start}..{run.stop - 1} are one scanned run; expected "
                f"one granularity for all of them, got {sorted(run_picks)}"
            )
        index = run_picks.pop()
        scanned = run.stop - run.start > 1
        block = dict(out[run.name])
        if run.use_moe:
            width = m.widths(config.moe.expert_hidden_size)[index]
            shared = config.moe.num_shared_experts * width
            block["moe"] = _slice_ffn(block["moe"], width, shared, scanned)
        else:
            block["mlp"] = _slice_ffn(
                block["mlp"], m.widths(config.mlp_hidden_size)[index], 0, scanned
            )
        out[run.name] = block
    return out


def slice_config(config: ModelConfig, granularity: int) -> ModelConfig:
    """A plain model (MatFormer off) with every FFN at granularity `granularity`: the config of
    `slice_params(params, config, granularity)`."""
    m = config.matformer
    if not m.enabled or not 0 <= granularity < len(m.granularities):
        raise ValueError(
            f"slice_config: granularity={granularity!r}; expected an index in "
            f"[0, {len(m.granularities)}) of an enabled MatFormer config"
        )
    return dataclasses.replace(
        config,
        mlp_hidden_size=m.widths(config.mlp_hidden_size)[granularity],
        moe=dataclasses.replace(
            config.moe, expert_hidden_size=m.widths(config.moe.expert_hidden_size)[granularity]
        ),
        matformer=MatformerConfig(granularities=(), sampling=m.sampling, inference_granularity=()),
    )
