"""The tiny config with MatFormer nested FFNs: every FFN (dense, routed and shared experts) trains
at 1/8, 1/4, 1/2 and all of its hidden width, one granularity sampled per step (docs/design.md
"MatFormer"); the MatFormer paper's 0.5x, 1x, 2x and 4x of d for an FFN of width 4d.

python -m engram_jax.train --config=configs/tiny_matformer.py --workdir=/tmp/engram_tiny_mat
python -m engram_jax.generate --workdir=/tmp/engram_tiny_mat --prompt="the" --ffn_granularity=1

Parameters of each slice: python -m engram_jax.accounting --config=tiny_matformer
"""

from pathlib import Path

from engram_jax.config import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("tiny.py"))
    config.model.matformer.granularities = (0.125, 0.25, 0.5, 1.0)
    return config
