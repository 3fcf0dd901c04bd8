"""The configuration schema: `base_config()` declares every key once; `validate()` checks a config
and turns it into frozen dataclasses that the library uses.

Config files in `configs/` start from `base_config()` and only set values. Library code receives
the dataclasses (`ModelConfig`, `EngramConfig`, `HyperConfig`, `AttentionConfig`, `MoeConfig`,
`TrainConfig`), never the ConfigDict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import ml_collections

from engram_jax import config_limits, config_variants

# Loading files and the saved JSON form need no schema; they live beside it and stay importable
# from here, where callers have always found them.
from engram_jax.config_dicts import (  # noqa: F401
    ConfigError,
    apply_values,
    load_config_file,
    to_dict,
)
from engram_jax.config_limits import check_choice, check_positive

# The residual-stream, MatFormer and memory-variant sections live in their own module; their
# dataclasses and constants stay importable from here.
from engram_jax.config_variants import (  # noqa: F401
    HC_COEFF_INIT_STD,
    MHC_LITE_MAX_STREAMS,
    HcKind,
    HyperConfig,
    MatformerConfig,
    OverEncodingConfig,
    PleConfig,
    UltraMemConfig,
)

AttentionKind = Literal["gqa", "mla"]
DType = Literal["float32", "bfloat16"]

_ENGRAM_FORMS = ("demo", "v41")
_ATTENTION_KINDS = ("gqa", "mla")
_DTYPES = ("float32", "bfloat16")
_SCHEDULES = ("cosine", "wsd", "constant")
_MOE_DISPATCH = ("dropless", "capacity", "ragged")
_AXIS_TYPES = ("auto", "explicit")


def base_config() -> ml_collections.ConfigDict:
    """Every configuration key, with its default and meaning. Config files set values, add none."""
    c = ml_collections.ConfigDict()
    # Seeds parameter init, data order and dropout-free sampling; one seed for the whole run.
    c.seed = 0
    _declare_training(c)
    _declare_data(c)
    _declare_table_training(c)
    m = c.model = _declare_model()
    m.attention = _declare_attention()
    m.moe = _declare_moe()
    m.engram = _declare_engram()
    m.hc = config_variants.declare_hc()
    m.matformer = config_variants.declare_matformer()
    config_variants.declare_memory_variants(m)
    c.mesh = _declare_mesh()
    # Config files and overrides set values, never add keys: a misspelt key fails where it is set.
    c.lock()
    return c


# ---------------------------------------------------------------- training program


def _declare_training(c: ml_collections.ConfigDict) -> None:
    """The optimizer, its schedule and the loop's cadence."""
    c.num_train_steps = 1000  # Optimizer steps.
    c.batch_size = 8  # Global batch in sequences (all processes together).
    c.seq_len = 256  # Tokens per packed sequence.
    c.learning_rate = 3e-3  # Peak learning rate of the dense parameters.
    c.warmup_steps = 50  # Linear warm-up steps.
    c.schedule = "cosine"  # "cosine", "wsd" (warmup-stable-decay) or "constant" after warm-up.
    c.final_lr_fraction = 0.1  # Final LR as a fraction of the peak (cosine and wsd).
    c.decay_fraction = 0.2  # wsd only: fraction of the steps spent decaying.
    # AdamW decay of dense matrices (docs/design.md 1.11); 1-D params never decay.
    c.weight_decay = 0.1
    c.adam_b1 = 0.9
    c.adam_b2 = 0.95
    c.adam_eps = 1e-8
    c.clip_norm = 1.0  # Global gradient-norm clip of the dense parameters (0 disables).
    c.eval_every = 100  # Steps between evaluations (0 disables periodic eval).
    c.eval_batches = 8  # Batches per evaluation.
    # Steps between checkpoints (0 disables; the final step is always saved).
    c.checkpoint_every = 200
    c.max_to_keep = 3  # Checkpoints kept on disk.
    c.log_every = 10  # Steps between metric lines.
    # (start, stop): write a jax.profiler trace of steps start..stop-1 to
    # <workdir>/tensorboard/plugins/profile/ (TensorBoard's profile tab); () disables.
    c.profile_steps = ()
    c.generate_max_tokens = 64  # Tokens sampled by `engram_jax.generate` unless overridden.


def _declare_data(c: ml_collections.ConfigDict) -> None:
    """The corpus, the tokenizer and the host input pipeline."""
    c.data_path = ""  # Text/JSONL/Parquet file, glob or directory; "" is the bundled corpus.
    # tokenizer.json; "" trains a byte-level BPE on the corpus (cached in the workdir).
    c.tokenizer_path = ""
    # Text of the token appended to every document and that ends generation; "" recognises the
    # usual names (<eos>, </s>, <|endoftext|>, <|end_of_text|>, DeepSeek's <｜end▁of▁sentence｜>,
    # ...) and warns at start when the tokenizer has none of them.
    c.eos_token = ""
    # Fraction of documents held out for validation (chosen per document by a hash of its file
    # name and position, so no process needs the corpus size).
    c.eval_fraction = 0.05
    # A separate validation corpus (file, glob or directory, like data_path): all of data_path then
    # trains and this evaluates; "" holds out eval_fraction of data_path.
    c.eval_data_path = ""
    # Host input pipeline. Each process streams its own shard of the corpus files.
    c.data_workers = 0  # grain worker processes per host (0: in the trainer process).
    c.data_prefetch = 2  # Batches prepared ahead (by a thread, or per worker process).
    c.shuffle_window = 1024  # Documents shuffled together (on top of a per-epoch file order).
    # Bytes of training text the BPE tokenizer is trained on (a sample spread over up to 64
    # files; 0 reads the whole training split).
    c.tokenizer_train_bytes = 100_000_000


def _declare_table_training(c: ml_collections.ConfigDict) -> None:
    """How the Engram tables are updated and where they live while training."""
    # Engram tables: "sparse" updates only the step's unique rows (row-wise optimizers); "dense"
    # keeps the whole-table optax Adam (its gradient and moments are table-sized; for comparison).
    c.table_update = "sparse"
    # Sparse table optimizer: "adam" (lazy Adam, the paper's choice at table_lr_multiplier x the
    # LR, no weight decay), "adagrad" (row-wise: one accumulator per row) or "sgd".
    c.table_optimizer = "adam"
    # Where the tables and their optimizer state live while training: "device" (accelerator
    # memory, row-sharded on a mesh) or "host" (numpy in host RAM, rows prefetched per step;
    # single process, sparse updates; Engram, OverEncoding and PLE tables, not UltraMem's).
    c.table_placement = "device"
    # Memory one training step may use, in GiB per device, for the estimate that refuses a
    # hopeless config before compiling (engram_jax/memory_estimate.py): 0 takes the device's
    # memory (host RAM on CPU); a negative value disables the check.
    c.memory_limit_gib = 0.0


# ---------------------------------------------------------------- model


def _declare_model() -> ml_collections.ConfigDict:
    """The backbone's shape and numerics; its sub-sections are declared below."""
    m = ml_collections.ConfigDict()
    m.vocab_size = 4096  # Token vocabulary (also the size a trained BPE tokenizer aims for).
    # Raw pad token id; Engram hashes with its compressed id (docs/design.md §1.2). -1 takes the
    # tokenizer's pad token (<pad>, [PAD], <|pad|>, DeepSeek's <｜▁pad▁｜>, ...), else its eos
    # token, else id 0, with a warning at start naming this key.
    m.pad_id = -1
    m.num_layers = 4
    m.hidden_size = 128  # D: width of one residual stream.
    m.mlp_hidden_size = 512  # F of the dense SwiGLU layers.
    # The first layers use a dense FFN; the rest use MoE when moe.num_experts > 0.
    m.num_dense_layers = 1
    m.norm_eps = 1e-6  # RMSNorm epsilon of the backbone.
    m.tie_embeddings = False  # Share the token embedding with the LM head.
    m.dtype = "float32"  # Compute dtype: "float32" or "bfloat16".
    m.param_dtype = "float32"  # Storage dtype of dense parameters.
    m.scan_layers = False  # nn.scan over the repeated blocks (faster compiles at depth).
    m.remat = False  # Rematerialise each block in the backward pass.
    return m


def _declare_attention() -> ml_collections.ConfigDict:
    a = ml_collections.ConfigDict()
    a.kind = "gqa"  # "gqa" (grouped-query) or "mla" (DeepSeek-V2/V3 multi-head latent attention).
    a.num_heads = 4
    a.num_kv_heads = 2  # gqa only.
    a.head_dim = 32  # gqa only.
    a.rope_theta = 10000.0
    a.use_qk_norm = False  # gqa only: RMSNorm over head_dim on queries and keys.
    a.q_lora_rank = 0  # mla: query compression rank (0 = no query compression).
    a.kv_lora_rank = 64  # mla: latent key-value rank (what the decode cache holds).
    a.qk_nope_head_dim = 32  # mla: per-head query/key dims without RoPE.
    a.qk_rope_head_dim = 16  # mla: decoupled RoPE dims (key part shared by all heads).
    a.v_head_dim = 32  # mla: per-head value dims.
    return a


def _declare_moe() -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict()
    e.num_experts = 0  # Routed experts; 0 keeps every layer dense.
    e.num_shared_experts = 1
    e.top_k = 2
    e.expert_hidden_size = 128  # F of one expert's SwiGLU.
    e.routed_scaling_factor = 1.0
    e.seq_balance_weight = 1e-4  # Sequence-wise balance loss weight (0 disables).
    # Aux-loss-free balancing: bias step per training step (DeepSeek-V3's gamma).
    e.bias_update_rate = 1e-3
    # Routed-expert dispatch (compute only; parameters are the same for all three):
    #   "dropless": sort slots by expert into padded blocks, one SwiGLU per block. Causal: a token's
    #       output never depends on other tokens, as DeepSeek-V3 (which drops nothing).
    #   "capacity": [E, C, D] buffers; drops overflow slots. NOT causal: a later token (or another
    #       row) decides which earlier slot overflows, unless capacity_factor >= E / top_k.
    #   "ragged": dropless via lax.ragged_dot (grouped kernels on TPU/GPU; very slow on CPU).
    e.dispatch = "dropless"
    e.capacity_factor = 1.25  # capacity dispatch only.
    e.block_size = 128  # dropless dispatch only: rows per expert block (fewer for small calls).
    return e


def _declare_engram() -> ml_collections.ConfigDict:
    g = ml_collections.ConfigDict()
    # Blocks that carry an Engram module (0-based, as the reference demo); () disables.
    g.layer_ids = ()
    g.max_ngram = 3  # N: orders 2..N are hashed.
    g.heads_per_ngram = 8  # K hash heads per order.
    # Row width of one order summed over its heads; D_head = embed_per_ngram / K.
    g.embed_per_ngram = 512
    g.table_rows_per_head = (646400, 646400)  # Prime-search base per order (docs/design.md 1.3).
    g.hash_seed = 0
    g.conv_kernel_size = 4
    g.conv_dilation = 0  # 0 means max_ngram (docs/design.md 1.6).
    g.conv_zero_init = True  # The paper's zero-initialised convolution; False keeps a random init.
    g.qk_norm_eps = 1.1920929e-07  # Demo's key/query RMSNorm eps (docs/design.md 9.6: unverified).
    g.conv_norm_eps = 1e-5  # Demo's convolution RMSNorm eps (docs/design.md 9.6: unverified).
    g.gate_clamp = 1e-6  # Signed square root clamp of the gate score.
    g.table_init_std = 1.0  # N(0, std) rows, PyTorch nn.Embedding default as in the demo.
    g.table_dtype = "float32"
    # Table rows at inference (`generate`, every placement): "stored" serves the checkpoint's
    # rows as saved; "fp8" packs them into FP8 rows (E4M3 + one power-of-two scale per 32 values,
    # tables/fp8.py), dequantized after the gather. Training always keeps table_dtype rows.
    g.inference_table_dtype = "stored"
    # Each table's rows are padded up to a multiple of this (never addressed) so that they split
    # evenly over the mesh's fsdp x tensor devices. Keep it fixed across meshes: checkpoints then
    # restore on any mesh whose row shards divide it.
    g.table_row_multiple = 1
    # Tables train with Adam at 5x the base LR (docs/design.md 1.11, 9.2).
    g.table_lr_multiplier = 5.0
    g.table_weight_decay = 0.0
    # Layer form: "demo" (per-stream biased keys, biased value, short conv; the paper's demo) or
    # "v41" (DeepSeek-V4.1: one fused `wkv` projection, q_weight/k_weight gate, no conv; the
    # conv_* keys are then unused and qk_norm_eps is its RMSNorm eps). See docs/design.md §14.
    g.form = "demo"
    # V' the tokenizer must compress to (checked when the hash spec is built); 0 skips the check.
    # DeepSeek-V4.1: 99,092.
    g.compressed_vocab_size = 0
    # "v41" only: a bias on `wkv`. The release's `wkv` has none (no `.bias` tensor in its headers).
    g.wkv_bias = False
    return g


# ---------------------------------------------------------------- devices


def _declare_mesh() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.data = -1  # Data-parallel axis size; -1 takes the devices the other axes leave.
    d.fsdp = 1  # Parameter sharding axis.
    d.tensor = 1  # Tensor-parallel axis (heads, MLP width, table rows).
    d.axis_types = "auto"  # "auto" or "explicit" sharding-in-types axes.
    d.coordinator_address = ""  # Multi-process: host:port of process 0 ("" = from the environment).
    d.initialization_timeout = 600  # Seconds jax.distributed waits for every process.
    return d


# ---------------------------------------------------------------------------- dataclasses


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    kind: AttentionKind
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    use_qk_norm: bool
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    num_shared_experts: int
    top_k: int
    expert_hidden_size: int
    routed_scaling_factor: float
    seq_balance_weight: float
    bias_update_rate: float
    dispatch: str
    capacity_factor: float
    block_size: int


@dataclasses.dataclass(frozen=True)
class EngramConfig:
    layer_ids: tuple[int, ...]
    max_ngram: int
    heads_per_ngram: int
    embed_per_ngram: int
    table_rows_per_head: tuple[int, ...]
    hash_seed: int
    conv_kernel_size: int
    conv_dilation: int
    conv_zero_init: bool
    qk_norm_eps: float
    conv_norm_eps: float
    gate_clamp: float
    table_init_std: float
    table_dtype: DType
    inference_table_dtype: str
    table_row_multiple: int
    table_lr_multiplier: float
    table_weight_decay: float
    form: str
    wkv_bias: bool
    compressed_vocab_size: int

    @property
    def enabled(self) -> bool:
        return bool(self.layer_ids)

    @property
    def row_width(self) -> int:
        """D_head: width of one hash head's row."""
        return self.embed_per_ngram // self.heads_per_ngram

    @property
    def num_heads(self) -> int:
        """M: hash heads per layer over all orders."""
        return (self.max_ngram - 1) * self.heads_per_ngram

    @property
    def dilation(self) -> int:
        return self.conv_dilation or self.max_ngram


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    pad_id: int
    num_layers: int
    hidden_size: int
    mlp_hidden_size: int
    num_dense_layers: int
    norm_eps: float
    tie_embeddings: bool
    dtype: DType
    param_dtype: DType
    scan_layers: bool
    remat: bool
    attention: AttentionConfig
    moe: MoeConfig
    engram: EngramConfig
    hc: HyperConfig
    matformer: MatformerConfig
    overencoding: OverEncodingConfig
    ple: PleConfig
    ultramem: UltraMemConfig

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe.num_experts > 0 and layer >= self.num_dense_layers


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int
    fsdp: int
    tensor: int
    axis_types: str
    coordinator_address: str
    initialization_timeout: int


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int
    num_train_steps: int
    batch_size: int
    seq_len: int
    learning_rate: float
    warmup_steps: int
    schedule: str
    final_lr_fraction: float
    decay_fraction: float
    weight_decay: float
    adam_b1: float
    adam_b2: float
    adam_eps: float
    clip_norm: float
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    max_to_keep: int
    log_every: int
    data_path: str
    tokenizer_path: str
    eos_token: str
    eval_fraction: float
    eval_data_path: str
    data_workers: int
    data_prefetch: int
    shuffle_window: int
    tokenizer_train_bytes: int
    profile_steps: tuple[int, ...]
    generate_max_tokens: int
    table_update: str
    table_optimizer: str
    table_placement: str
    memory_limit_gib: float


@dataclasses.dataclass(frozen=True)
class Config:
    """The validated, immutable form of a whole config."""

    train: TrainConfig
    model: ModelConfig
    mesh: MeshConfig


# ---------------------------------------------------------------------------- validation


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def check(self, ok: bool, field: str, value: Any, expected: str) -> None:
        if not ok:
            self.items.append(f"config.{field}: got {value!r}; expected {expected}")


def _fields(cls: type, source: ml_collections.ConfigDict, **overrides: Any) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for name in names:
        if name in overrides:
            values[name] = overrides[name]
        else:
            value = source[name]
            values[name] = tuple(value) if isinstance(value, list) else value
    return values


def _validate_model(p: _Problems, m: ml_collections.ConfigDict) -> None:
    for key in ("vocab_size", "num_layers", "hidden_size", "mlp_hidden_size"):
        check_positive(p, f"model.{key}", m[key])
    check_positive(p, "model.num_dense_layers", m.num_dense_layers, allow_zero=True)
    p.check(
        isinstance(m.pad_id, int) and -1 <= m.pad_id < m.vocab_size,
        "model.pad_id",
        m.pad_id,
        f"a token id in [0, vocab_size={m.vocab_size}), or -1 for the tokenizer's pad token",
    )
    p.check(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "> 0")
    check_choice(p, "model.dtype", m.dtype, _DTYPES)
    check_choice(p, "model.param_dtype", m.param_dtype, _DTYPES)
    _validate_attention(p, m.attention)
    _validate_moe(p, m)
    _validate_engram(p, m)
    config_variants.validate_hc(p, m.hc)
    config_variants.validate_matformer(p, m)
    config_variants.validate_memory_variants(p, m)


def _validate_attention(p: _Problems, a: ml_collections.ConfigDict) -> None:
    check_choice(p, "model.attention.kind", a.kind, _ATTENTION_KINDS)
    check_positive(p, "model.attention.num_heads", a.num_heads)
    if a.kind == "gqa":
        check_positive(p, "model.attention.num_kv_heads", a.num_kv_heads)
        check_positive(p, "model.attention.head_dim", a.head_dim)
        if isinstance(a.num_kv_heads, int) and a.num_kv_heads > 0:
            p.check(
                a.num_heads % a.num_kv_heads == 0,
                "model.attention.num_kv_heads",
                a.num_kv_heads,
                f"a divisor of num_heads={a.num_heads}",
            )
    else:
        check_positive(p, "model.attention.q_lora_rank", a.q_lora_rank, allow_zero=True)
        for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            check_positive(p, f"model.attention.{key}", a[key])
    rope_dim = a.head_dim if a.kind == "gqa" else a.qk_rope_head_dim
    p.check(
        isinstance(rope_dim, int) and rope_dim % 2 == 0,
        "model.attention." + ("head_dim" if a.kind == "gqa" else "qk_rope_head_dim"),
        rope_dim,
        "an even number (RoPE rotates pairs)",
    )


def _validate_moe(p: _Problems, m: ml_collections.ConfigDict) -> None:
    e = m.moe
    check_positive(p, "model.moe.num_experts", e.num_experts, allow_zero=True)
    if e.num_experts > 0:
        check_positive(p, "model.moe.top_k", e.top_k)
        p.check(
            e.top_k <= e.num_experts,
            "model.moe.top_k",
            e.top_k,
            f"<= num_experts={e.num_experts}",
        )
        check_positive(p, "model.moe.num_shared_experts", e.num_shared_experts, allow_zero=True)
        check_positive(p, "model.moe.expert_hidden_size", e.expert_hidden_size)
        check_choice(p, "model.moe.dispatch", e.dispatch, _MOE_DISPATCH)
        p.check(e.capacity_factor > 0, "model.moe.capacity_factor", e.capacity_factor, "> 0")
        check_positive(p, "model.moe.block_size", e.block_size)
        p.check(
            m.num_dense_layers < m.num_layers,
            "model.num_dense_layers",
            m.num_dense_layers,
            f"< num_layers={m.num_layers} when moe.num_experts > 0 (otherwise no layer is MoE)",
        )


def _validate_engram(p: _Problems, m: ml_collections.ConfigDict) -> None:
    g = m.engram
    layer_ids = tuple(g.layer_ids)
    p.check(
        all(isinstance(i, int) and 0 <= i < m.num_layers for i in layer_ids),
        "model.engram.layer_ids",
        layer_ids,
        f"indices in [0, num_layers={m.num_layers})",
    )
    p.check(
        len(set(layer_ids)) == len(layer_ids),
        "model.engram.layer_ids",
        layer_ids,
        "no repeated layer",
    )
    if layer_ids:
        p.check(
            isinstance(g.max_ngram, int) and g.max_ngram >= 2,
            "model.engram.max_ngram",
            g.max_ngram,
            "an integer >= 2 (orders 2..N are hashed)",
        )
        check_positive(p, "model.engram.heads_per_ngram", g.heads_per_ngram)
        check_positive(p, "model.engram.embed_per_ngram", g.embed_per_ngram)
        if g.heads_per_ngram > 0:
            p.check(
                g.embed_per_ngram % g.heads_per_ngram == 0,
                "model.engram.embed_per_ngram",
                g.embed_per_ngram,
                f"a multiple of heads_per_ngram={g.heads_per_ngram}",
            )
        _validate_engram_rows(p, g)
        check_positive(p, "model.engram.conv_kernel_size", g.conv_kernel_size)
        check_positive(p, "model.engram.conv_dilation", g.conv_dilation, allow_zero=True)
        check_choice(p, "model.engram.table_dtype", g.table_dtype, _DTYPES)
        check_choice(
            p, "model.engram.inference_table_dtype", g.inference_table_dtype, ("stored", "fp8")
        )
        if g.inference_table_dtype == "fp8" and g.heads_per_ngram > 0:
            width = g.embed_per_ngram // g.heads_per_ngram
            p.check(
                width % 32 == 0,
                "model.engram.inference_table_dtype",
                "fp8",
                f"a row width (embed_per_ngram / heads_per_ngram = {width}) that is a multiple "
                "of 32 (one FP8 scale per 32 values)",
            )
        check_choice(p, "model.engram.form", g.form, _ENGRAM_FORMS)
        check_positive(
            p, "model.engram.compressed_vocab_size", g.compressed_vocab_size, allow_zero=True
        )
        check_positive(p, "model.engram.table_row_multiple", g.table_row_multiple)
        for key in ("qk_norm_eps", "conv_norm_eps", "gate_clamp", "table_init_std"):
            p.check(g[key] > 0, f"model.engram.{key}", g[key], "> 0")
        p.check(
            g.table_lr_multiplier > 0,
            "model.engram.table_lr_multiplier",
            g.table_lr_multiplier,
            "> 0",
        )


def _validate_engram_rows(p: Any, g: ml_collections.ConfigDict) -> None:
    """The hashed tables' sizes: one base per order, each a valid prime-search base, and one
    layer's flat table indexable with int32."""
    rows = tuple(g.table_rows_per_head)
    if isinstance(g.max_ngram, int) and g.max_ngram >= 2:
        p.check(
            len(rows) == g.max_ngram - 1,
            "model.engram.table_rows_per_head",
            rows,
            f"{g.max_ngram - 1} entries (one per order 2..max_ngram={g.max_ngram})",
        )
    p.check(
        all(isinstance(r, int) and 2 <= r < 2**31 for r in rows),
        "model.engram.table_rows_per_head",
        rows,
        "integers in [2, 2**31)",
    )
    if all(isinstance(r, int) for r in rows) and isinstance(g.heads_per_ngram, int):
        # Each layer's heads share one flat int32-indexed table (primes ~ just above bases).
        approx_rows = g.heads_per_ngram * sum(rows) + g.table_row_multiple
        p.check(
            approx_rows < 2**31,
            "model.engram.table_rows_per_head",
            rows,
            f"heads_per_ngram={g.heads_per_ngram} x sum(rows) < 2**31 (one layer's flat "
            "table is indexed with int32)",
        )


def _validate_train(p: _Problems, c: ml_collections.ConfigDict) -> None:
    for key in ("num_train_steps", "batch_size", "seq_len", "max_to_keep", "log_every"):
        check_positive(p, key, c[key])
    for key in ("warmup_steps", "eval_every", "checkpoint_every", "eval_batches"):
        check_positive(p, key, c[key], allow_zero=True)
    p.check(c.learning_rate > 0, "learning_rate", c.learning_rate, "> 0")
    p.check(
        c.warmup_steps <= c.num_train_steps,
        "warmup_steps",
        c.warmup_steps,
        f"<= num_train_steps={c.num_train_steps}",
    )
    check_choice(p, "schedule", c.schedule, _SCHEDULES)
    check_choice(p, "table_update", c.table_update, ("sparse", "dense"))
    check_choice(p, "table_optimizer", c.table_optimizer, ("adam", "adagrad", "sgd"))
    check_choice(p, "table_placement", c.table_placement, ("device", "host"))
    if c.table_placement == "host":
        p.check(
            c.table_update == "sparse",
            "table_update",
            c.table_update,
            "'sparse' when table_placement='host' (the host applies row updates)",
        )
    if c.table_placement == "host":
        p.check(
            not c.model.ultramem.layer_ids,
            "table_placement",
            c.table_placement,
            f"'device' with model.ultramem.layer_ids={tuple(c.model.ultramem.layer_ids)}: "
            "UltraMem's value rows are chosen by a top-k over the hidden state inside the "
            "forward pass, so the host cannot know them before the step to prefetch them "
            "(Engram, OverEncoding and PLE tables can live on the host)",
        )
    if c.table_update == "sparse" and c.table_optimizer == "adagrad":
        p.check(
            c.model.engram.table_weight_decay == 0,
            "model.engram.table_weight_decay",
            c.model.engram.table_weight_decay,
            "0 with table_optimizer='adagrad' (row-wise Adagrad has no weight decay)",
        )
    p.check(0 <= c.final_lr_fraction <= 1, "final_lr_fraction", c.final_lr_fraction, "in [0, 1]")
    p.check(0 < c.decay_fraction <= 1, "decay_fraction", c.decay_fraction, "in (0, 1]")
    p.check(c.weight_decay >= 0, "weight_decay", c.weight_decay, ">= 0")
    p.check(c.clip_norm >= 0, "clip_norm", c.clip_norm, ">= 0 (0 disables)")
    for key in ("adam_b1", "adam_b2"):
        # b = 1 never forgets the first gradient; b < 0 flips the sign of old moments.
        p.check(0 <= c[key] < 1, key, c[key], "in [0, 1)")
    p.check(c.adam_eps > 0, "adam_eps", c.adam_eps, "> 0")
    p.check(isinstance(c.eos_token, str), "eos_token", c.eos_token, 'a token\'s text or ""')
    p.check(0 < c.eval_fraction < 1, "eval_fraction", c.eval_fraction, "in (0, 1)")
    p.check(isinstance(c.eval_data_path, str), "eval_data_path", c.eval_data_path, 'a path or ""')
    for key in ("data_workers", "data_prefetch", "tokenizer_train_bytes"):
        check_positive(p, key, c[key], allow_zero=True)
    check_positive(p, "shuffle_window", c.shuffle_window)
    _check_profile_steps(p, c.profile_steps, c.num_train_steps)


def _check_profile_steps(p: _Problems, steps: Any, num_train_steps: Any) -> None:
    steps = tuple(steps) if isinstance(steps, (list, tuple)) else steps
    if steps == ():
        return
    ok = (
        isinstance(steps, tuple)
        and len(steps) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
        and 1 <= steps[0] < steps[1]
    )
    p.check(
        ok,
        "profile_steps",
        steps,
        "() (off) or (start, stop) with integers 1 <= start < stop: traces steps start..stop-1",
    )
    if ok and isinstance(num_train_steps, int):
        p.check(
            steps[0] <= num_train_steps,
            "profile_steps",
            steps,
            f"start <= num_train_steps={num_train_steps} (otherwise nothing is traced)",
        )


def _validate_mesh(p: _Problems, d: ml_collections.ConfigDict) -> None:
    sizes = {"data": d.data, "fsdp": d.fsdp, "tensor": d.tensor}
    for name, size in sizes.items():
        p.check(
            isinstance(size, int) and (size > 0 or size == -1),
            f"mesh.{name}",
            size,
            "a positive integer or -1 (the devices left over)",
        )
    p.check(
        sum(1 for s in sizes.values() if s == -1) <= 1,
        "mesh",
        sizes,
        "at most one axis set to -1",
    )
    check_choice(p, "mesh.axis_types", d.axis_types, _AXIS_TYPES)


def validate(config: ml_collections.ConfigDict) -> Config:
    """Checks every value and returns the frozen form.

    Raises:
      ConfigError: listing every problem, each naming the field, the value and the expectation.
    """
    p = _Problems()
    config_limits.check_finite(p, config)
    config_limits.check_sizes(p, config)
    try:
        _validate_train(p, config)
        _validate_model(p, config.model)
        _validate_mesh(p, config.mesh)
    except (AttributeError, KeyError, TypeError) as err:
        raise ConfigError(
            f"config is missing a key or has a value of the wrong type: {err}"
        ) from err
    if p.items:
        raise ConfigError("invalid config:\n  " + "\n  ".join(p.items))

    m = config.model
    model = ModelConfig(
        **_fields(
            ModelConfig,
            m,
            attention=AttentionConfig(**_fields(AttentionConfig, m.attention)),
            moe=MoeConfig(**_fields(MoeConfig, m.moe)),
            engram=EngramConfig(**_fields(EngramConfig, m.engram)),
            hc=HyperConfig(**_fields(HyperConfig, m.hc)),
            matformer=MatformerConfig(**_fields(MatformerConfig, m.matformer)),
            overencoding=OverEncodingConfig(**_fields(OverEncodingConfig, m.overencoding)),
            ple=PleConfig(**_fields(PleConfig, m.ple)),
            ultramem=UltraMemConfig(**_fields(UltraMemConfig, m.ultramem)),
        )
    )
    return Config(
        train=TrainConfig(**_fields(TrainConfig, config)),
        model=model,
        mesh=MeshConfig(**_fields(MeshConfig, config.mesh)),
    )


# Keys added after checkpoints were first written, with the value that reproduces how such a
# checkpoint was trained when it differs from today's default. Before `table_update` existed the
# tables were trained by whole-table optax Adam, whose optimizer state the checkpoint holds.
LEGACY_VALUES = {"table_update": "dense"}


def from_saved(values: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The config a checkpoint was written with, from its saved `to_dict` form: `base_config()`
    with the saved values; keys the checkpoint predates take `LEGACY_VALUES` or their default.

    Raises:
      ConfigError: the checkpoint has a key this version does not declare (a newer version
        wrote it).
    """
    config = base_config()
    missing = {k: v for k, v in LEGACY_VALUES.items() if k not in values}
    try:
        apply_values(config, {**values, **missing}, "checkpoint config")
    except ConfigError as e:
        raise ConfigError(f"{e}; was the checkpoint written by a newer engram_jax?") from e
    return config
