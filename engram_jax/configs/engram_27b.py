"""Engram-27B of the Engram paper (docs/design.md §1.10): MoE-27B with 17 routed experts traded for
two Engram layers at equal total and activated parameters.

python -m engram_jax.train --config=configs/engram_27b.py --workdir=/tmp/engram_27b \
    --config.data_path=/data/corpus --config.tokenizer_path=/data/deepseek_v3/tokenizer.json \
    --config.mesh.fsdp=64

Accounting: python -m engram_jax.accounting --config=configs/engram_27b.py

Backbone, training recipe and derived sizes: see configs/moe_27b.py (expert width 1536, MLA
dimensions and the dense first layer are derived, not published). Changes, as published (§1.10):
2 shared + 55 routed experts, top-6; Engram with orders [2, 3], 8 heads per order, d_mem 1280,
2,262,400 rows per head (the prime search starts there, §1.3); tables trained with Adam at 5x the
LR and no weight decay (§1.11, the `engram.table_*` defaults).

Derived: d_mem = 1280 over 2 orders x 8 heads gives a row width of 80, i.e. embed_per_ngram 640
(§9.5).

Layer placement (a decision; §1.8, §9.3): the paper writes layers [2, 15], the official demo
`layer_ids = [1, 15]` over a 0-based range; no source reconciles them. `layer_ids` here are the
demo's 0-based ids, (1, 15), because the hash seeds (`seed + 10007 * layer`) are the demo's, so
these ids give the demo's exact hashes. The paper's literal reading is one override away:
`--config.model.engram.layer_ids='(2, 15)'` (parameter counts do not change).

Result (`engram_jax.accounting`): 26.72B total without the token embedding (paper 26.7B), 3.84B
activated without embeddings (paper 3.8B), Engram 5.83B of which 5.79B tables (paper 5.7B: the
tables alone are 2 layers x 16 heads x ~2.26M rows x 80 = 5.79B; the paper's figure looks
truncated), allocation ratio rho = 0.743 (the paper's optimum is 0.75-0.80, §1.9).
"""

from pathlib import Path

from engram_jax.config import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("moe_27b.py"))
    m = config.model
    m.moe.num_experts = 55
    g = m.engram
    g.layer_ids = (1, 15)
    g.max_ngram = 3
    g.heads_per_ngram = 8
    g.embed_per_ngram = 640
    g.table_rows_per_head = (2_262_400, 2_262_400)
    # Rows padded to a multiple of 1024 (< 1024 unused rows per layer) so the tables split evenly
    # over any fsdp x tensor row sharding up to 1024 devices, and checkpoints move between meshes.
    g.table_row_multiple = 1024
    return config
