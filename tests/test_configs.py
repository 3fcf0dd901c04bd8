"""Every file in configs/: loads, sets only declared keys, validates, and builds its parameter
shapes abstractly (`jax.eval_shape`, nothing allocated), with the count `accounting` predicts."""

import importlib.util
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from engram_jax.accounting import account
from engram_jax.config import base_config, validate
from engram_jax.model import Transformer

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
PAPER_CONFIGS = (
    "moe_27b",
    "moe_27b_residual",
    "moe_27b_hc",
    "engram_27b",
    "engram_40b",
    "dense_4b",
)


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def abstract_params(model_config):
    """The "params" collection of `Transformer.init` as ShapeDtypeStructs (B=1, T=8)."""
    b, t = 1, 8
    tokens = jnp.zeros((b, t), jnp.int32)
    e = model_config.engram
    hash_ids = jnp.zeros((b, len(e.layer_ids), t, e.num_heads), jnp.int32) if e.enabled else None
    model = Transformer(model_config)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, hash_ids=hash_ids))
    return variables["params"]


def flat_keys(config, prefix=""):
    keys = set()
    for key, value in config.items():
        if hasattr(value, "items"):
            keys |= flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_all_expected_configs_exist():
    for name in (*PAPER_CONFIGS, "tiny", "small_cpu"):
        assert name in CONFIG_NAMES, f"configs/{name}.py is missing"


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_builds_abstractly(name):
    module = load_config(name)
    doc = module.__doc__ or ""
    assert re.search(rf"python -m engram_jax\.\w+ --config=configs/{name}\.py", doc), (
        f"configs/{name}.py: the docstring must hold the exact launch command"
    )
    config = module.get_config()
    # STYLE §3: config files set values of base_config(); they never add keys.
    assert flat_keys(config) == flat_keys(base_config()), f"configs/{name}.py adds or drops keys"
    model_config = validate(config).model
    params = abstract_params(model_config)
    count = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))
    assert count == account(model_config, config.seq_len).total_params


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_training_setup(name):
    """docs/design.md §1.10-1.11: the shared backbone and recipe of the four paper models."""
    cfg = validate(load_config(name).get_config())
    assert (cfg.train.seq_len, cfg.train.batch_size) == (4096, 1280)
    assert (cfg.train.num_train_steps, cfg.train.learning_rate) == (50_000, 4e-4)
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.vocab_size) == (30, 2560, 129_280)
    assert (m.attention.kind, m.attention.num_heads) == ("mla", 32)
    assert (m.dtype, m.scan_layers) == ("bfloat16", True)
    if name not in ("moe_27b_residual", "moe_27b_hc"):
        assert (m.hc.kind, m.hc.n_streams) == ("mhc", 4)
    if m.moe.num_experts:
        assert (m.moe.num_shared_experts, m.moe.top_k, m.num_dense_layers) == (2, 6, 1)
    if m.engram.enabled:
        assert m.moe.num_experts == 55
        assert (m.engram.num_heads * m.engram.row_width) == 1280  # d_mem
        assert m.engram.row_width == 80
