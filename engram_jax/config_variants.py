"""Config sections of the variants built around the backbone: the residual-stream forms
(hyper-connections, mHC, AltUp: `model.hc`), MatFormer's nested FFNs (`model.matformer`) and the
memory methods Engram is compared with (`model.overencoding`, `model.ple`, `model.ultramem`).

Each section has its declarer (called by `config.base_config()`), its frozen dataclass and its
validator (called by `config.validate()` with the problem list). `engram_jax.config` re-exports
the public names; this module does not import it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import ml_collections

from engram_jax.config_limits import check_choice, check_positive

HcKind = Literal["residual", "hc", "mhc", "mhc_lite", "mhc_v41", "altup"]

_HC_KINDS = ("residual", "hc", "mhc", "mhc_lite", "mhc_v41", "altup")
_ALTUP_COEFFICIENTS = ("static", "dynamic")
_MATFORMER_SAMPLING = ("sample", "all")
_SINKHORN_ORDERS = ("row_last", "col_last")
MHC_LITE_MAX_STREAMS = 6
# Default std of the hyper-connection coefficient projections, shared by `model.hc.coeff_init_std`
# and `mhc.HyperConnection.coeff_kernel_init` so that the module and the trainer agree.
HC_COEFF_INIT_STD = 0.02


# ---------------------------------------------------------------- declarers


def declare_hc() -> ml_collections.ConfigDict:
    h = ml_collections.ConfigDict()
    # "residual", "hc", "mhc", "mhc_lite" "mhc_v41" (DeepSeek-V4.1's single-pass mHC: softmax-
    # started column-last Sinkhorn, pre = sigmoid + sinkhorn_eps, comb^T applied, and each site's
    # read weights produced by the site before it; docs/design.md §14) or "altup"
    # (AltUp, docs/design.md "AltUp": K = n_streams blocks of width D, each layer computes on one of
    # them; predict / compute / correct).
    h.kind = "mhc"
    h.n_streams = 4
    h.sinkhorn_iters = 20
    # Denominator floor: the paper states none (0, its preset; the log-domain iteration needs
    # none); DeepSeek's later code uses 1e-6.
    h.sinkhorn_eps = 0.0
    h.sinkhorn_order = "row_last"  # Paper: column then row normalisation, so rows are exact.
    h.alpha_init = 0.01  # Initial alpha scales (docs/design.md 2.2, 9.1).
    h.res_offdiag_bias = -8.0  # b_res off-diagonal init: H_res starts near identity (2.5, 9.1).
    h.lite_offperm_bias = -8.0  # mHC-lite: logit bias of the non-identity permutations (4, 9.13).
    # Std of the coefficient projections phi (and of HC's dynamic weights); 0 = zeros. The paper
    # starts from phi = 0 (docs/design.md §2.5, unverified §9.1), but then streams copied from one
    # embedding stay identical forever unless another part (Engram's per-stream keys) breaks the
    # symmetry; a small random phi moves H at init by < 1e-2. HyperConnection's own default is
    # the same value (HC_COEFF_INIT_STD).
    h.coeff_init_std = HC_COEFF_INIT_STD
    # AltUp only. "dynamic": Gemma 3n's router-computed prediction / correction coefficients
    # (router tanh(W . RMSNorm(x_active) / D), C_pred: K -> K*K, C_corr: K -> K); "static": the
    # AltUp paper's K x K prediction and K correction scalars per layer.
    h.altup_coefficients = "dynamic"
    # AltUp only: the block each layer computes on; -1 alternates (layer mod K, the paper's
    # schedule), 0 is Gemma 3n's fixed block (unverified constants, docs/design.md §9.12).
    h.altup_active_block = 0
    # AltUp dynamic only: |C_pred|, |C_corr| weights are clipped to this in the forward pass
    # (Gemma 3n's 120, unverified); 0 disables.
    h.altup_coef_clip = 120.0
    return h


def declare_matformer() -> ml_collections.ConfigDict:
    f = ml_collections.ConfigDict()
    # MatFormer nested FFNs (docs/design.md "MatFormer"): the hidden widths of every FFN (the dense
    # SwiGLU, routed and shared experts) as ascending fractions of the full width, the last 1.0;
    # granularity i uses the first round(r_i * F) hidden units. () disables.
    f.granularities = ()
    # Training: "sample" one granularity uniformly per step (default; what the MatFormer paper is
    # read to do, unverified §9.11) or "all": the mean of the losses of every granularity.
    f.sampling = "sample"
    # Outside training (eval, generate): the granularity index of every layer; () is the full
    # width, one index applies to all layers, num_layers indices are a Mix'n'Match per layer.
    f.inference_granularity = ()
    return f


def declare_memory_variants(m: ml_collections.ConfigDict) -> None:
    """The memory methods Engram is compared with (docs/design.md §5-7); all off by default."""
    # OverEncoding: hashed-free n-gram input embeddings added to the token embedding.
    o = m.overencoding = ml_collections.ConfigDict()
    o.enabled = False
    o.max_ngram = 3  # N: orders 2..N get sub-tables; N = 1 is the plain token embedding.
    o.tables_per_ngram = 2  # k sub-tables per order, each with its own modulus and projection.
    # Sub-table idx (order-major over all orders) has base_rows + modulus_step * idx +
    # modulus_offset rows: the serving implementation's m + 2 idx + 1 (unverified, §9.10).
    o.base_rows = 16384
    o.modulus_step = 2
    o.modulus_offset = 1
    # Row width of one sub-table; 0 takes hidden_size // (k (N - 1)) as the paper's d / (k (N-1)).
    o.row_width = 0
    # "mean" divides E1 + the k (N - 1) projected rows by their count (the serving
    # implementation, unverified); "sum" adds them.
    o.combine = "mean"

    # Per-layer embeddings (Gemma 3n): a token table giving every layer a small vector.
    p = m.ple = ml_collections.ConfigDict()
    p.enabled = False
    p.width = 32  # Per-layer vector width (Gemma 3n: 256, unverified §9.12).
    p.table_rows = 0  # Rows of the PLE table; ids at or beyond it read row 0. 0 = vocab_size.

    # UltraMem: memory layers addressed by the hidden state (Tucker query-key retrieval).
    u = m.ultramem = ml_collections.ConfigDict()
    u.layer_ids = ()  # Blocks that carry a memory layer (0-based); () disables.
    u.grid_size = 64  # n: keys per grid axis; n * n virtual slots.
    u.key_dim = 32  # Width of one row/column query and key.
    u.tucker_rank = 2  # r: queries per axis and size of each Tucker core.
    u.num_cores = 2  # h: cores (multi-core scoring); each weights one chunk of a value row.
    u.top_k = 16  # Value rows read per token.
    u.candidates = 16  # Rows and columns kept by the rank-1 preselection (>= sqrt(top_k)).
    u.value_expansion = 4  # E virtual blocks per physical row (implicit value expansion).
    u.value_width = 64  # Physical value row width (a multiple of num_cores).


# ---------------------------------------------------------------- dataclasses


@dataclasses.dataclass(frozen=True)
class HyperConfig:
    kind: HcKind
    n_streams: int
    sinkhorn_iters: int
    sinkhorn_eps: float
    sinkhorn_order: str
    alpha_init: float
    res_offdiag_bias: float
    lite_offperm_bias: float
    coeff_init_std: float
    altup_coefficients: str
    altup_active_block: int
    altup_coef_clip: float


@dataclasses.dataclass(frozen=True)
class MatformerConfig:
    granularities: tuple[float, ...]
    sampling: str
    inference_granularity: tuple[int, ...]

    @property
    def enabled(self) -> bool:
        return bool(self.granularities)

    def widths(self, full: int) -> tuple[int, ...]:
        """The nested hidden widths m_i of an FFN whose full width is `full` (all >= 1)."""
        return tuple(max(1, round(r * full)) for r in self.granularities)


@dataclasses.dataclass(frozen=True)
class OverEncodingConfig:
    enabled: bool
    max_ngram: int
    tables_per_ngram: int
    base_rows: int
    modulus_step: int
    modulus_offset: int
    row_width: int
    combine: str

    @property
    def num_tables(self) -> int:
        """K: sub-tables over all orders."""
        return (self.max_ngram - 1) * self.tables_per_ngram

    @property
    def active(self) -> bool:
        """Enabled with at least one n-gram order (N = 1 is the plain token embedding)."""
        return self.enabled and self.num_tables > 0

    def width(self, hidden_size: int) -> int:
        return self.row_width or hidden_size // max(1, self.num_tables)


@dataclasses.dataclass(frozen=True)
class PleConfig:
    enabled: bool
    width: int
    table_rows: int

    def rows(self, vocab_size: int) -> int:
        return self.table_rows or vocab_size


@dataclasses.dataclass(frozen=True)
class UltraMemConfig:
    layer_ids: tuple[int, ...]
    grid_size: int
    key_dim: int
    tucker_rank: int
    num_cores: int
    top_k: int
    candidates: int
    value_expansion: int
    value_width: int

    @property
    def enabled(self) -> bool:
        return bool(self.layer_ids)

    @property
    def value_rows(self) -> int:
        """P: physical value rows, n^2 / E."""
        return self.grid_size * self.grid_size // self.value_expansion


# ---------------------------------------------------------------- validators


def validate_hc(p: Any, h: ml_collections.ConfigDict) -> None:
    check_choice(p, "model.hc.kind", h.kind, _HC_KINDS)
    check_positive(p, "model.hc.n_streams", h.n_streams)
    if h.kind == "residual":
        p.check(h.n_streams == 1, "model.hc.n_streams", h.n_streams, "1 when hc.kind='residual'")
    if h.kind == "mhc_lite":
        p.check(
            isinstance(h.n_streams, int) and h.n_streams <= MHC_LITE_MAX_STREAMS,
            "model.hc.n_streams",
            h.n_streams,
            f"<= {MHC_LITE_MAX_STREAMS} for mhc_lite (it keeps n! permutation logits)",
        )
    check_positive(p, "model.hc.sinkhorn_iters", h.sinkhorn_iters)
    check_choice(p, "model.hc.sinkhorn_order", h.sinkhorn_order, _SINKHORN_ORDERS)
    p.check(h.sinkhorn_eps >= 0, "model.hc.sinkhorn_eps", h.sinkhorn_eps, ">= 0")
    p.check(h.coeff_init_std >= 0, "model.hc.coeff_init_std", h.coeff_init_std, ">= 0")
    if h.kind == "altup":
        check_choice(p, "model.hc.altup_coefficients", h.altup_coefficients, _ALTUP_COEFFICIENTS)
        p.check(
            isinstance(h.altup_active_block, int) and -1 <= h.altup_active_block < h.n_streams,
            "model.hc.altup_active_block",
            h.altup_active_block,
            f"-1 (alternate: layer mod K) or a block in [0, n_streams={h.n_streams})",
        )
        p.check(h.altup_coef_clip >= 0, "model.hc.altup_coef_clip", h.altup_coef_clip, ">= 0")


def validate_matformer(p: Any, m: ml_collections.ConfigDict) -> None:
    f = m.matformer
    ratios = tuple(f.granularities)
    if not ratios:
        p.check(
            not tuple(f.inference_granularity),
            "model.matformer.inference_granularity",
            tuple(f.inference_granularity),
            "() when matformer.granularities is () (MatFormer off)",
        )
        return
    p.check(
        all(isinstance(r, (int, float)) and 0 < r <= 1 for r in ratios)
        and all(a < b for a, b in zip(ratios, ratios[1:], strict=False))
        and ratios[-1] == 1,
        "model.matformer.granularities",
        ratios,
        "strictly ascending fractions in (0, 1], the last 1.0 (the full width)",
    )
    check_choice(p, "model.matformer.sampling", f.sampling, _MATFORMER_SAMPLING)
    picks = tuple(f.inference_granularity)
    p.check(
        len(picks) in (0, 1, m.num_layers)
        and all(isinstance(i, int) and 0 <= i < len(ratios) for i in picks),
        "model.matformer.inference_granularity",
        picks,
        f"(), one index or num_layers={m.num_layers} indices in [0, {len(ratios)})",
    )
    for key, full in (
        ("mlp_hidden_size", m.mlp_hidden_size),
        ("moe.expert_hidden_size", m.moe.expert_hidden_size),
    ):
        if isinstance(full, int):
            widths = [max(1, round(r * full)) for r in ratios if isinstance(r, (int, float))]
            p.check(
                len(set(widths)) == len(widths),
                f"model.{key}",
                full,
                f"a width whose granularities {ratios} give distinct hidden sizes ({widths})",
            )


def validate_memory_variants(p: Any, m: ml_collections.ConfigDict) -> None:
    """OverEncoding, per-layer embeddings and UltraMem (docs/design.md §5-7)."""
    validate_overencoding(p, m)
    validate_ple(p, m)
    validate_ultramem(p, m)


def validate_overencoding(p: Any, m: ml_collections.ConfigDict) -> None:
    o = m.overencoding
    if o.enabled:
        p.check(
            isinstance(o.max_ngram, int) and o.max_ngram >= 1,
            "model.overencoding.max_ngram",
            o.max_ngram,
            "an integer >= 1 (1 adds no n-gram table)",
        )
        check_positive(p, "model.overencoding.tables_per_ngram", o.tables_per_ngram)
        check_positive(p, "model.overencoding.base_rows", o.base_rows)
        check_positive(p, "model.overencoding.modulus_step", o.modulus_step, allow_zero=True)
        check_positive(p, "model.overencoding.modulus_offset", o.modulus_offset, allow_zero=True)
        check_positive(p, "model.overencoding.row_width", o.row_width, allow_zero=True)
        check_choice(p, "model.overencoding.combine", o.combine, ("mean", "sum"))
        k = (o.max_ngram - 1) * o.tables_per_ngram if isinstance(o.max_ngram, int) else 0
        if k > 0 and isinstance(o.base_rows, int) and isinstance(o.modulus_step, int):
            largest = o.base_rows + o.modulus_step * (k - 1) + o.modulus_offset
            total = k * o.base_rows + o.modulus_step * k * (k - 1) // 2 + k * o.modulus_offset
            p.check(
                total < 2**31,
                "model.overencoding.base_rows",
                o.base_rows,
                f"all {k} sub-tables together below 2**31 rows (int32 row ids; got {total})",
            )
            p.check(
                largest <= 2**31,
                "model.overencoding.base_rows",
                o.base_rows,
                "moduli <= 2**31 (the device ids are exact in uint32 below that)",
            )
            if not o.row_width and isinstance(m.hidden_size, int):
                p.check(
                    m.hidden_size // k > 0,
                    "model.overencoding.row_width",
                    o.row_width,
                    f"> 0, or hidden_size={m.hidden_size} >= k (N - 1) = {k}",
                )


def validate_ple(p: Any, m: ml_collections.ConfigDict) -> None:
    pl = m.ple
    if pl.enabled:
        check_positive(p, "model.ple.width", pl.width)
        check_positive(p, "model.ple.table_rows", pl.table_rows, allow_zero=True)


def validate_ultramem(p: Any, m: ml_collections.ConfigDict) -> None:
    u = m.ultramem
    layer_ids = tuple(u.layer_ids)
    p.check(
        all(isinstance(i, int) and 0 <= i < m.num_layers for i in layer_ids)
        and len(set(layer_ids)) == len(layer_ids),
        "model.ultramem.layer_ids",
        layer_ids,
        f"distinct indices in [0, num_layers={m.num_layers})",
    )
    p.check(
        not set(layer_ids) & set(m.engram.layer_ids),
        "model.ultramem.layer_ids",
        layer_ids,
        f"no layer shared with engram.layer_ids={tuple(m.engram.layer_ids)}",
    )
    if not layer_ids:
        return
    for key in ("grid_size", "key_dim", "tucker_rank", "num_cores", "top_k", "candidates"):
        check_positive(p, f"model.ultramem.{key}", u[key])
    for key in ("value_expansion", "value_width"):
        check_positive(p, f"model.ultramem.{key}", u[key])
    if all(isinstance(u[k], int) and u[k] > 0 for k in ("grid_size", "candidates", "top_k")):
        p.check(
            u.candidates <= u.grid_size,
            "model.ultramem.candidates",
            u.candidates,
            f"<= grid_size={u.grid_size}",
        )
        p.check(
            u.top_k <= u.candidates * u.candidates,
            "model.ultramem.top_k",
            u.top_k,
            f"<= candidates^2 = {u.candidates**2} (slots of the candidate grid)",
        )
    if isinstance(u.value_expansion, int) and u.value_expansion > 0:
        p.check(
            (u.grid_size * u.grid_size) % u.value_expansion == 0,
            "model.ultramem.value_expansion",
            u.value_expansion,
            f"a divisor of grid_size^2 = {u.grid_size**2}",
        )
    if isinstance(u.num_cores, int) and u.num_cores > 0:
        p.check(
            u.value_width % u.num_cores == 0,
            "model.ultramem.value_width",
            u.value_width,
            f"a multiple of num_cores={u.num_cores} (one chunk per core)",
        )
