"""configs/tiny.py with UltraMem memory layers in place of Engram, at the same layers (1, 3):
a 64 x 64 key grid, 16 value rows per token, 4 virtual blocks per physical row
(docs/design.md §6).

python -m engram_jax.train --config=configs/tiny_ultramem.py --workdir=/tmp/tiny_ultramem
"""

from pathlib import Path

from engram_jax.config import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("tiny.py"))
    m = config.model
    m.engram.layer_ids = ()
    m.ultramem.layer_ids = (1, 3)
    return config
