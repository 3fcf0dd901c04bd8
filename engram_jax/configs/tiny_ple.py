"""configs/tiny.py with Gemma 3n's per-layer embeddings in place of Engram: a token table of
4 layers x 32 values per token feeding every block (docs/design.md §7.1).

python -m engram_jax.train --config=configs/tiny_ple.py --workdir=/tmp/tiny_ple
"""

from pathlib import Path

from engram_jax.config import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("tiny.py"))
    m = config.model
    m.engram.layer_ids = ()
    m.ple.enabled = True
    m.ple.width = 32
    return config
