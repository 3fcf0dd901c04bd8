"""The layer plan of a `ModelConfig`, read from the config alone: which layers form one run of
identical blocks (scanned together), the Engram and OverEncoding table sizes, and each run's
MatFormer inference granularity. `engram_jax.model` builds its blocks from it and re-exports it.
"""

from __future__ import annotations

import dataclasses

from engram_jax.config import ModelConfig
from engram_jax.hash_primes import table_primes
from engram_jax.matformer import layer_granularities
from engram_jax.overencoding_ids import overencoding_moduli


def engram_table_sizes(config: ModelConfig) -> dict[int, tuple[int, ...]]:
    """Rows per hash head (the primes) of every Engram layer; empty when Engram is off."""
    e = config.engram
    if not e.enabled:
        return {}
    primes = table_primes(e.table_rows_per_head, e.heads_per_ngram, e.layer_ids)
    return {layer: tuple(p) for layer, p in primes.items()}


def overencoding_table_sizes(config: ModelConfig) -> tuple[int, ...]:
    """Rows (moduli) of every OverEncoding sub-table, order-major; empty when it is off."""
    o = config.overencoding
    if not o.active:
        return ()
    return overencoding_moduli(
        o.base_rows, o.max_ngram, o.tables_per_ngram, o.modulus_step, o.modulus_offset
    )


def first_engram_layer(config: ModelConfig) -> int | None:
    """The lowest Engram layer id (where a decode step first needs table rows); None without
    Engram."""
    layer_ids = config.engram.layer_ids if config.engram.enabled else ()
    return min(layer_ids) if layer_ids else None


@dataclasses.dataclass(frozen=True)
class Run:
    """Consecutive layers with the same structure; scanned together when `scan_layers`."""

    start: int
    stop: int
    use_moe: bool
    has_engram: bool
    has_ultramem: bool = False

    @property
    def name(self) -> str:
        if self.stop - self.start == 1:
            return f"layer_{self.start}"
        return f"layers_{self.start}_to_{self.stop - 1}"


def layer_runs(config: ModelConfig) -> list[Run]:
    """Groups layers into runs of identical blocks; an Engram layer is always a run of its own.

    With `scan_layers=False` every run has one layer, and so with `hc.kind="hc"`: HC's static init
    reads stream `site mod n` at each site (docs/design.md 3.3), so its blocks differ by layer and
    a scan (one init for the whole run) would give every layer the same read stream.
    """
    scan = config.scan_layers and config.hc.kind != "hc"
    # AltUp alternating its active block (layer mod K) also differs by layer.
    scan = scan and not (config.hc.kind == "altup" and config.hc.altup_active_block == -1)
    runs: list[Run] = []
    engram_layers = set(config.engram.layer_ids)
    for layer in range(config.num_layers):
        use_moe = config.is_moe_layer(layer)
        has_engram = layer in engram_layers
        has_ultramem = layer in config.ultramem.layer_ids
        alone = has_engram or has_ultramem  # memory layers are runs of their own
        previous = runs[-1] if runs else None
        if (
            scan
            and previous is not None
            and not alone
            and not (previous.has_engram or previous.has_ultramem)
            and previous.use_moe == use_moe
        ):
            runs[-1] = dataclasses.replace(previous, stop=layer + 1)
        else:
            runs.append(Run(layer, layer + 1, use_moe, has_engram, has_ultramem))
    return runs


def run_granularity(config: ModelConfig, run: Run) -> int | None:
    """The configured inference granularity of a run's layers (one for a whole scanned run)."""
    picks = set(layer_granularities(config)[run.start : run.stop])
    if len(picks) > 1:
        raise ValueError(
            f"Transformer: matformer.inference_granularity gives layers {run.start}.."
            f"{run.stop - 1} (one scanned run) granularities {sorted(picks)}; expected one per "
            "scanned run (or scan_layers=False for a per-layer mix)"
        )
    return picks.pop()
