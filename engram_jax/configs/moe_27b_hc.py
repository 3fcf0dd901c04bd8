"""MoE-27B with unconstrained dynamic hyper-connections (hc.kind hc, n = 4): the HC arm of the
mHC paper's 27B comparison (docs/design.md §2.8, §3), which showed a loss surge near step 12k.

python -m engram_jax.train --config=configs/moe_27b_hc.py --workdir=/tmp/moe_27b_hc \
    --config.data_path=/data/corpus --config.tokenizer_path=/data/deepseek_v3/tokenizer.json \
    --config.mesh.fsdp=64

Accounting: python -m engram_jax.accounting --config=configs/moe_27b_hc.py

Everything else as configs/moe_27b.py (its derived sizes are documented there).
"""

from pathlib import Path

from engram_jax.config import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("moe_27b.py"))
    config.model.hc.kind = "hc"
    config.model.hc.n_streams = 4
    return config
