"""MoE-27B of the Engram paper (docs/design.md §1.10): the 27B DeepSeek-V3-style MoE + mHC backbone.

python -m engram_jax.train --config=configs/moe_27b.py --workdir=/tmp/moe_27b \
    --config.data_path=/data/corpus --config.tokenizer_path=/data/deepseek_v3/tokenizer.json \
    --config.mesh.fsdp=64

Accounting: python -m engram_jax.accounting --config=configs/moe_27b.py

Published (§1.10): 30 layers, hidden 2560, MLA with 32 heads, mHC n = 4, vocabulary 129,280 (the
DeepSeek-V3 tokenizer: pass its tokenizer.json), 2 shared + 72 routed experts, top-6, first layer
dense, sequence 4096, batch 1280, 50,000 steps (262B tokens), base LR 4e-4, weight decay 0.1;
26.7B total parameters without the token embedding, 3.8B activated.

Derived here (NOT published; docs/design.md §9.4), chosen so the accounting reproduces the totals:
- expert width F = 1536: removing 17 routed experts in 29 MoE layers must free the 5.8B that
  Engram-27B adds (17 * 29 * 3 * 2560 * F = 5.8B gives F ~ 1539, §1.10).
- MLA dimensions of DeepSeek-V2-Lite (the published MLA model nearest this width): no query
  compression (q_lora_rank 0), kv_lora_rank 512, qk_nope 128, qk_rope 64, v_head 128; 31.9M
  parameters per layer. This is what brings the activated count to 3.8B: with a 768-rank query
  compression it would be 3.56B.
- the dense first layer's FFN width 12288 = (2 shared + 6 routed) * 1536, DeepSeek-V3's rule
  (its dense width 18432 = (1 + 8) * 2048), so every layer activates the same FFN width.
Result (`engram_jax.accounting`): 26.71B total without the token embedding (LM head included, the
reading of the paper's column that fits all four models), 3.81B activated without token embedding
and LM head, 27.04B / 4.14B with them (mHC paper Table 5 quotes 27.0B / 4.14B for its 27B).

Not reproduced: the paper trains the backbone with Muon and a step-decay schedule; this trainer
uses AdamW and the closest schedule here, warmup-stable-decay. Warm-up 2000 steps and the MoE
balancing constants follow DeepSeek-V3 (unpublished for this model). Set `model.pad_id` to the
tokenizer's pad/eos id.
"""

from engram_jax.config import base_config


def get_config():
    config = base_config()
    config.num_train_steps = 50_000
    config.batch_size = 1280
    config.seq_len = 4096
    config.learning_rate = 4e-4
    config.warmup_steps = 2000
    config.schedule = "wsd"
    config.weight_decay = 0.1
    config.eval_every = 1000
    config.checkpoint_every = 1000
    config.log_every = 10

    m = config.model
    m.vocab_size = 129_280
    m.num_layers = 30
    m.hidden_size = 2560
    m.mlp_hidden_size = 12_288
    m.num_dense_layers = 1
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.scan_layers = True
    m.remat = True

    a = m.attention
    a.kind = "mla"
    a.num_heads = 32
    a.q_lora_rank = 0
    a.kv_lora_rank = 512
    a.qk_nope_head_dim = 128
    a.qk_rope_head_dim = 64
    a.v_head_dim = 128

    e = m.moe
    e.num_experts = 72
    e.num_shared_experts = 2
    e.top_k = 6
    e.expert_hidden_size = 1536

    h = m.hc
    h.kind = "mhc"
    h.n_streams = 4
    h.sinkhorn_iters = 20
    return config
