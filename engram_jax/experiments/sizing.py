"""Config derivations at matched parameter counts, by the accounting (no arrays are built).

Conventions (docs/design.md §1.9): P_sparse = P_tot - P_act (embeddings excluded) is the routed
experts a token does not use plus the Engram tables; rho is the routed-expert share of it.

- `moe_baseline(base)`: the base config without Engram (rho = 1).
- `with_allocation(base, rho)`: fewer routed experts (the unused ones are the sparse budget), the
  freed parameters in Engram table rows, at the MoE baseline's total AND activated parameters.
  Engram's projections, norms and convolution are activated parameters, and dropping experts
  shrinks the router; the difference is taken from (or given to) the width of the dense FFN
  layers (`mlp_hidden_size`), so activated parameters stay equal to within 3 x D x dense layers.
  Total parameters then match to within a few table rows (the table sizes are primes).
- `dense_twin(base)`: every layer a dense FFN whose width gives the MoE baseline's activated
  parameters (a dense model cannot also match its total).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import ml_collections

from engram_jax import config as config_lib
from engram_jax.accounting import Accounting, account


def accounting(config: ml_collections.ConfigDict) -> Accounting:
    """The accounting of a config (validated first)."""
    cfg = config_lib.validate(config)
    return account(cfg.model, cfg.train.seq_len)


def moe_baseline(base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The base config with Engram switched off."""
    c = copy.deepcopy(base)
    c.model.engram.layer_ids = ()
    return c


def dense_twin(base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A dense model with the MoE baseline's activated parameters (all layers dense FFNs)."""
    moe = moe_baseline(base)
    target = accounting(moe).activated_params
    c = copy.deepcopy(moe)
    c.model.moe.num_experts = 0
    d, layers = c.model.hidden_size, c.model.num_layers
    c.model.mlp_hidden_size = 1  # measure everything but the FFN, then solve its width
    rest = accounting(c).activated_params - layers * 3 * d
    width = round((target - rest) / (3 * d * layers))
    if width < 1:
        raise ValueError(
            f"dense_twin: the MoE baseline activates {target:,} parameters, fewer than the dense "
            f"model's non-FFN parameters {rest:,}"
        )
    c.model.mlp_hidden_size = width
    return c


def routed_experts_for(num_experts: int, top_k: int, rho: float) -> int:
    """Experts that keep `rho` of the unused routed experts (at least top_k + 1 when rho > 0)."""
    unused = num_experts - top_k
    keep = round(rho * unused)
    if rho < 1:
        keep = min(keep, unused - 1)  # rho < 1 must free at least one expert for the tables
    return top_k + max(keep, 1 if rho > 0 else 0)


def with_allocation(
    base: ml_collections.ConfigDict,
    rho: float,
    rows_per_head: Sequence[int] | None = None,
) -> ml_collections.ConfigDict:
    """The base model with `rho` of its sparse budget in routed experts and the rest in Engram
    tables, at the MoE baseline's total and activated parameters.

    `base.model.engram` gives the Engram layout (layer_ids, orders, heads, row width); its
    `table_rows_per_head` is replaced by the solved size. With `rows_per_head` (one count per
    order, e.g. from `budget.rows_for_updates`) the tables keep those proportions and about
    that size: the row width (`embed_per_ngram`) is solved to hold the sparse budget, then the
    rows are scaled (by less than one width step) to match the total. rho = 1 returns the MoE
    baseline.

    Raises:
      ValueError: rho outside (0, 1], a base without MoE or without Engram layers, or a budget
        too small for the Engram layout.
    """
    _check_allocation(base, rho, rows_per_head)
    moe = moe_baseline(base)
    if rho == 1:
        return moe
    target = accounting(moe)
    c = copy.deepcopy(base)
    e = c.model.moe
    e.num_experts = routed_experts_for(e.num_experts, e.top_k, rho)
    orders = c.model.engram.max_ngram - 1
    shape = tuple(rows_per_head) if rows_per_head is not None else (1,) * orders
    c.model.engram.table_rows_per_head = (2,) * orders  # provisional; tables are not activated
    _give_back_activated(c, target, rho)
    if rows_per_head is not None:
        _solve_row_width(c, target, shape)
        _give_back_activated(c, target, rho)
    _fill_tables(c, target, shape)
    return c


def _check_allocation(
    base: ml_collections.ConfigDict, rho: float, rows_per_head: Sequence[int] | None
) -> None:
    if not 0 < rho <= 1:
        raise ValueError(f"rho: got {rho}; expected a value in (0, 1]")
    e = base.model.moe
    if e.num_experts <= e.top_k:
        raise ValueError(
            f"with_allocation: base.model.moe.num_experts={e.num_experts}; expected more routed "
            f"experts than top_k={e.top_k} (the unused ones are the sparse budget)"
        )
    if not tuple(base.model.engram.layer_ids):
        raise ValueError(
            "with_allocation: base.model.engram.layer_ids is empty; expected the "
            "Engram layout to allocate into"
        )
    orders = base.model.engram.max_ngram - 1
    if rows_per_head is not None and (len(rows_per_head) != orders or min(rows_per_head) < 2):
        raise ValueError(
            f"with_allocation: rows_per_head={tuple(rows_per_head)}; expected {orders} counts "
            ">= 2 (one per order)"
        )


def _give_back_activated(c: ml_collections.ConfigDict, target: Accounting, rho: float) -> None:
    """Narrows the dense FFN layers by Engram's activated parameters (less the dropped experts'
    router columns), so activated parameters match `target` to within 3 x D x dense layers."""
    dense_layers = min(c.model.num_dense_layers, c.model.num_layers)
    if not dense_layers:
        return
    extra = accounting(c).activated_params - target.activated_params
    width = c.model.mlp_hidden_size - round(extra / (3 * c.model.hidden_size * dense_layers))
    if width < 1:
        raise ValueError(
            f"with_allocation(rho={rho}): Engram's activated parameters exceed what the dense "
            f"FFN layers can give back (width would be {width}); use a smaller Engram layout"
        )
    c.model.mlp_hidden_size = width


def _table_budget(c: ml_collections.ConfigDict, target: Accounting) -> int:
    """Table parameters that bring `c` to the target's total."""
    acc = accounting(c)
    return target.total_params - (acc.total_params - acc.engram_table_params)


def _solve_row_width(
    c: ml_collections.ConfigDict, target: Accounting, rows_per_head: Sequence[int]
) -> None:
    """Sets the row width per head (`embed_per_ngram / heads_per_ngram`) whose tables of
    `rows_per_head` rows hold the sparse budget best (at least 1)."""
    e_cfg = c.model.engram
    heads = e_cfg.heads_per_ngram
    rows = len(tuple(e_cfg.layer_ids)) * heads * sum(rows_per_head)  # rows of all heads
    width = max(1, round(_table_budget(c, target) / rows))
    e_cfg.embed_per_ngram = width * heads


def _fill_tables(c: ml_collections.ConfigDict, target: Accounting, shape: Sequence[int]) -> None:
    """Sets `table_rows_per_head` to `unit x shape / shape[0]` rows with the integer `unit` that
    brings total parameters to the target's (to within a few rows: the sizes are primes)."""
    e_cfg = c.model.engram
    want_tables = _table_budget(c, target)
    ratios = [r / shape[0] for r in shape]
    heads = len(tuple(e_cfg.layer_ids)) * e_cfg.heads_per_ngram
    width = e_cfg.embed_per_ngram // e_cfg.heads_per_ngram
    per_unit = heads * width * sum(ratios)  # table parameters per unit of the base row count

    def rows_for(unit: int) -> tuple[int, ...]:
        return tuple(max(2, round(unit * ratio)) for ratio in ratios)

    unit = max(2, round(want_tables / per_unit))
    for _ in range(4):  # primes sit a little above the base: correct the base by the excess
        e_cfg.table_rows_per_head = rows_for(unit)
        got = accounting(c).engram_table_params
        step = round((want_tables - got) / per_unit)
        if step == 0:
            break
        unit = max(2, unit + step)
    e_cfg.table_rows_per_head = rows_for(unit)
