"""The tiny config with AltUp instead of mHC: K = 4 blocks of width 128 on the residual, each layer
computing on block 0 with Gemma 3n's router-computed coefficients (docs/design.md "AltUp").

python -m engram_jax.train --config=configs/tiny_altup.py --workdir=/tmp/engram_tiny_altup

The AltUp paper's static scalars alternating over the blocks are two overrides away:
`--config.model.hc.altup_coefficients=static --config.model.hc.altup_active_block=-1`.
"""

from pathlib import Path

from engram_jax.config import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("tiny.py"))
    config.model.hc.kind = "altup"
    config.model.hc.n_streams = 4  # K, Gemma 3n's altup_num_inputs.
    return config
