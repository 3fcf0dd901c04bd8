"""Dense-4B of the Engram paper (docs/design.md §1.10): the MoE-27B backbone with a dense FFN in
every layer.

python -m engram_jax.train --config=configs/dense_4b.py --workdir=/tmp/dense_4b \
    --config.data_path=/data/corpus --config.tokenizer_path=/data/deepseek_v3/tokenizer.json

Accounting: python -m engram_jax.accounting --config=configs/dense_4b.py

Derived (not published): the FFN width 12288 is MoE-27B's activated FFN width, (2 shared + 6
routed) x 1536, so all four paper models activate the same 3.8B; see configs/moe_27b.py for the
MLA dimensions. Result (`engram_jax.accounting`): 4.13B total without the token embedding (paper
4.1B), 3.80B activated without embeddings.
"""

from pathlib import Path

from engram_jax.config import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("moe_27b.py"))
    m = config.model
    m.moe.num_experts = 0
    m.num_dense_layers = m.num_layers
    m.mlp_hidden_size = 12_288
    return config
