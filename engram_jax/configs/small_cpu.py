"""A CPU benchmark model, larger than tiny: 6 layers, width 256, Engram + mHC (n = 4) + MoE.

python -m engram_jax.train --config=configs/small_cpu.py --workdir=/tmp/engram_small_cpu

Accounting: python -m engram_jax.accounting --config=configs/small_cpu.py

About 21M parameters (7.3M of them Engram tables), 6.7M activated (5.7M without the embeddings);
trains on the bundled corpus.
Engram at 0-based layers (1, 4) (the paper places its two modules at about 1/15 and 1/2 of the
depth, §1.8); MoE from layer 1 on with 8 routed experts (top-2) and 1 shared.
"""

from engram_jax.config import base_config


def get_config():
    config = base_config()
    config.num_train_steps = 1000
    config.batch_size = 16
    config.seq_len = 256
    config.learning_rate = 2e-3
    config.warmup_steps = 100
    config.eval_every = 250
    config.eval_batches = 4
    config.checkpoint_every = 500
    config.log_every = 10

    m = config.model
    m.vocab_size = 4096
    m.num_layers = 6
    m.hidden_size = 256
    m.mlp_hidden_size = 768
    m.num_dense_layers = 1
    m.scan_layers = True
    m.attention.kind = "gqa"
    m.attention.num_heads = 4
    m.attention.num_kv_heads = 2
    m.attention.head_dim = 64
    m.moe.num_experts = 8
    m.moe.num_shared_experts = 1
    m.moe.top_k = 2
    m.moe.expert_hidden_size = 256
    m.engram.layer_ids = (1, 4)
    m.engram.max_ngram = 3
    m.engram.heads_per_ngram = 8
    m.engram.embed_per_ngram = 128
    m.engram.table_rows_per_head = (14_009, 14_009)
    m.hc.kind = "mhc"
    m.hc.n_streams = 4
    return config
