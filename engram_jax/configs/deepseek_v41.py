"""DeepSeek-V4.1's Engram and mHC settings on a stand-in backbone (docs/design.md "DeepSeek-V4.1
forms"): for the accounting of the released Engram tables, loading the released Engram tensors
(the converter), and V4.1-style experiments with this project's trainer.

Accounting (arithmetic only, nothing is allocated):

  python -m engram_jax.accounting --config=configs/deepseek_v41.py --json

(or `--config=deepseek_v41` from anywhere)
reports engram_table_params 196,613,849,600.

As published (config and safetensors headers of the release): 40 layers of width 5120; Engram at
layers 1 and 14 (0-based), orders 2-4 (max n-gram 4), 8 heads per order, so 24 prime-sized
sub-tables per layer; 16,000,000 as the start of every prime search (`engram_vocab_size`); rows of
256 values, so the concatenated memory is 24 x 256 = 6,144 values; compressed vocabulary 99,092;
Engram pad id 2. This project's prime search gives exactly the released row counts, 384,006,168 and
384,016,682 (x 256 = 196,613,849,600 table parameters). Layer form "v41" (no convolution, fused
`wkv` to 4 keys + 1 value, `q_weight`/`k_weight` gate), RMSNorm eps 1e-6. mHC "mhc_v41" with
hc_mult 4, 20 Sinkhorn iterations and hc_eps 1e-6.

The hash seed is 0 (multipliers from `default_rng(10007 * layer)`, as transcriptions of the release
show). Unverified (docs/design.md §14): the row order inside the 6,144 values; the token vocabulary
129,280 (DeepSeek-V3/V4's).

Out of scope, NOT modelled here: V4.1's attention variants (sliding-window / compressed / sparse
attention with shared compressors and indexers), its MoE with FP4 routed experts, the vision
tower, multi-token prediction / DSpark draft layers. The backbone below (grouped-query attention,
dense SwiGLU) is a stand-in of the published width and depth so that the config validates and the
accounting runs; its attention and FFN counts are not V4.1's.
"""

from engram_jax.config import base_config


def get_config():
    config = base_config()
    config.seq_len = 4096
    m = config.model
    m.vocab_size = 129_280
    m.pad_id = 2  # Raw pad id; its compressed id is the Engram pad id 2.
    m.num_layers = 40
    m.hidden_size = 5120
    m.norm_eps = 1e-6
    # Stand-in backbone (see the docstring).
    m.mlp_hidden_size = 13_824
    m.num_dense_layers = 40
    m.moe.num_experts = 0
    m.attention.kind = "gqa"
    m.attention.num_heads = 40
    m.attention.num_kv_heads = 8
    m.attention.head_dim = 128

    g = m.engram
    g.form = "v41"
    g.layer_ids = (1, 14)
    g.max_ngram = 4
    g.heads_per_ngram = 8
    g.embed_per_ngram = 8 * 256  # Row width 256.
    g.table_rows_per_head = (16_000_000, 16_000_000, 16_000_000)
    g.compressed_vocab_size = 99_092
    g.qk_norm_eps = 1e-6  # The checkpoint's RMSNorm eps.
    g.gate_clamp = 1e-6
    g.wkv_bias = False
    g.table_row_multiple = 1  # The released row counts exactly.

    h = m.hc
    h.kind = "mhc_v41"
    h.n_streams = 4
    h.sinkhorn_iters = 20
    h.sinkhorn_eps = 1e-6
    return config
