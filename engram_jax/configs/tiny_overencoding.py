"""configs/tiny.py with OverEncoding in place of Engram: n-gram input embeddings (orders 2 and 3,
two sub-tables each) added to the token embedding (docs/design.md §5).

python -m engram_jax.train --config=configs/tiny_overencoding.py --workdir=/tmp/tiny_oe

Four sub-tables of about 20k rows x 32 (2.56M parameters), the size of tiny's Engram tables.
"""

from pathlib import Path

from engram_jax.config import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("tiny.py"))
    m = config.model
    m.engram.layer_ids = ()
    m.overencoding.enabled = True
    m.overencoding.max_ngram = 3
    m.overencoding.tables_per_ngram = 2
    m.overencoding.base_rows = 20000
    return config
