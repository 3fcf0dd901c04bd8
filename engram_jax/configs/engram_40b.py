"""Engram-40B of the Engram paper (docs/design.md §1.10): Engram-27B with 3.2x larger tables.

python -m engram_jax.train --config=configs/engram_40b.py --workdir=/tmp/engram_40b \
    --config.data_path=/data/corpus --config.tokenizer_path=/data/deepseek_v3/tokenizer.json \
    --config.mesh.fsdp=64

Accounting: python -m engram_jax.accounting --config=configs/engram_40b.py

Everything as configs/engram_27b.py (derived sizes and the layer-id decision are documented
there and in configs/moe_27b.py) except 7,239,680 rows per head (published, §1.10).

Result (`engram_jax.accounting`): 39.47B total without the token embedding (paper 39.5B), 3.84B
activated without embeddings (paper 3.8B), Engram 18.57B (paper 18.5B), rho = 0.475.
"""

from pathlib import Path

from engram_jax.config import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("engram_27b.py"))
    config.model.engram.table_rows_per_head = (7_239_680, 7_239_680)
    return config
