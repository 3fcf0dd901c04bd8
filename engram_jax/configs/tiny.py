"""Tiny Engram + mHC + MoE model on the bundled corpus: a few minutes on 2 CPU cores.

python -m engram_jax.train --config=configs/tiny.py --workdir=/tmp/engram_tiny
"""

from engram_jax.config import base_config


def get_config():
    config = base_config()
    config.num_train_steps = 300
    config.batch_size = 16
    config.seq_len = 128
    config.learning_rate = 3e-3
    config.warmup_steps = 30
    config.eval_every = 100
    config.eval_batches = 4
    config.checkpoint_every = 100
    config.log_every = 10

    m = config.model
    m.vocab_size = 4096
    m.num_layers = 4
    m.hidden_size = 128
    m.mlp_hidden_size = 384
    m.num_dense_layers = 1
    m.attention.num_heads = 4
    m.attention.num_kv_heads = 2
    m.attention.head_dim = 32
    m.moe.num_experts = 8
    m.moe.num_shared_experts = 1
    m.moe.top_k = 2
    m.moe.expert_hidden_size = 128
    m.engram.layer_ids = (1, 3)
    m.engram.max_ngram = 3
    m.engram.heads_per_ngram = 4
    m.engram.embed_per_ngram = 64
    m.engram.table_rows_per_head = (10007, 10007)
    m.hc.kind = "mhc"
    m.hc.n_streams = 4
    return config
