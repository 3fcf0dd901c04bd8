"""Config schema: defaults validate; every problem is reported by field, value and expectation."""

import pytest

from engram_jax import config as config_lib


def test_base_config_validates():
    cfg = config_lib.validate(config_lib.base_config())
    assert cfg.model.hc.kind == "mhc"
    assert cfg.model.engram.row_width == 512 // 8
    assert cfg.model.engram.dilation == cfg.model.engram.max_ngram


def test_all_problems_reported_with_field_value_and_expectation():
    c = config_lib.base_config()
    c.model.num_layers = 4
    c.model.engram.layer_ids = (1, 40)
    c.model.attention.num_heads = 6
    c.model.attention.num_kv_heads = 4
    c.model.moe.num_experts = 4
    c.model.moe.top_k = 5
    c.model.hc.kind = "fancy"
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(c)
    message = str(err.value)
    assert (
        "config.model.engram.layer_ids: got (1, 40); expected indices in [0, num_layers=4)"
        in message
    )
    assert (
        "config.model.attention.num_kv_heads: got 4; expected a divisor of num_heads=6" in message
    )
    assert "config.model.moe.top_k: got 5; expected <= num_experts=4" in message
    assert "config.model.hc.kind: got 'fancy'" in message


def test_engram_orders_must_match_bases():
    c = config_lib.base_config()
    c.model.engram.layer_ids = (1,)
    c.model.engram.max_ngram = 4
    with pytest.raises(config_lib.ConfigError, match="table_rows_per_head.*3 entries"):
        config_lib.validate(c)


def test_mhc_lite_stream_limit_and_residual_streams():
    c = config_lib.base_config()
    c.model.hc.kind = "mhc_lite"
    c.model.hc.n_streams = 7
    with pytest.raises(config_lib.ConfigError, match="n_streams: got 7; expected <= 6"):
        config_lib.validate(c)
    c.model.hc.kind = "residual"
    c.model.hc.n_streams = 4
    with pytest.raises(config_lib.ConfigError, match="1 when hc.kind='residual'"):
        config_lib.validate(c)


def test_locked_config_rejects_unknown_keys():
    c = config_lib.base_config()
    c.lock()
    with pytest.raises(AttributeError):
        c.model.num_layerz = 3


_MISSPELT = """
from engram_jax.config import base_config


def get_config():
    c = base_config()
    c.model.hidden_sise = 64
    return c
"""


# ml_collections' config_flags still loads files with the deprecated importlib load_module().
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_config_file_setting_an_unknown_key_fails(tmp_path):
    """Config files fail like command-line overrides: the key set of base_config() is frozen."""
    path = tmp_path / "misspelt.py"
    path.write_text(_MISSPELT)
    with pytest.raises(
        config_lib.ConfigError,
        match=r"misspelt.py': sets key 'hidden_sise', which base_config\(\) does not declare; "
        r"did you mean 'hidden_size'\?",
    ):
        config_lib.load_config_file(path)

    # The training program's --config flag loads files with ml_collections' config_flags.
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
    with pytest.raises(AttributeError, match='Key "hidden_sise" does not exist'):
        flag_values(["prog", f"--config={path}"])


def test_adam_betas_must_lie_in_unit_interval():
    c = config_lib.base_config()
    c.adam_b1 = 1.0
    c.adam_b2 = -0.1
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(c)
    assert "config.adam_b1: got 1.0; expected in [0, 1)" in str(err.value)
    assert "config.adam_b2: got -0.1; expected in [0, 1)" in str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "profile_steps",
            (5, 3),
            r"profile_steps: got \(5, 3\); expected \(\) \(off\) or \(start, stop\)",
        ),
        ("profile_steps", (2,), r"profile_steps: got \(2,\)"),
        ("profile_steps", (2000, 2001), r"start <= num_train_steps=1000"),
        ("data_workers", -1, r"data_workers: got -1; expected an integer >= 0"),
        ("shuffle_window", 0, r"shuffle_window: got 0; expected an integer > 0"),
    ],
)
def test_data_and_profile_keys_are_validated(key, value, message):
    config = config_lib.base_config()
    config[key] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config)
    config[key] = config_lib.base_config()[key]
    assert config_lib.validate(config).train.profile_steps == ()


def test_saved_config_round_trips_and_fills_keys_it_predates():
    """`from_saved(to_dict(c))` is `c` (tuples and infinite floats included); a saved config
    without later keys gets their defaults, or the value that reproduces how it was trained."""
    config = config_lib.base_config()
    config.model.engram.layer_ids = (1, 3)
    config.clip_norm = float("inf")
    saved = config_lib.to_dict(config)
    assert saved["clip_norm"] == "inf"
    restored = config_lib.from_saved(saved)
    assert restored == config
    config_lib.validate(restored)

    del saved["table_update"], saved["shuffle_window"], saved["model"]["moe"]["block_size"]
    restored = config_lib.from_saved(saved)
    assert restored.table_update == "dense"  # tables trained by whole-table Adam back then
    assert restored.table_update != config_lib.base_config().table_update
    assert restored.shuffle_window == config_lib.base_config().shuffle_window
    assert restored.model.moe.block_size == config_lib.base_config().model.moe.block_size

    saved["model"]["engram"]["table_sise"] = 3
    with pytest.raises(
        config_lib.ConfigError, match=r"checkpoint config\.model\.engram\.table_sise"
    ):
        config_lib.from_saved(saved)


def test_every_declared_key_reaches_a_dataclass_field_and_back():
    """The per-section declarers and the frozen dataclasses name the same keys: a key declared
    without a field (or a field without a key) would be dropped or fail at validate()."""
    import dataclasses
    import typing

    def declared(section) -> set[str]:
        return {k for k, v in section.items() if not isinstance(v, type(section))}

    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    c = config_lib.base_config()
    # Every nested section of the model (attention, moe, engram, hc, matformer, overencoding, ...).
    hints = typing.get_type_hints(config_lib.ModelConfig)
    nested = {name: cls for name, cls in hints.items() if dataclasses.is_dataclass(cls)}
    assert len(nested) == 8
    assert declared(c) == fields(config_lib.TrainConfig)
    assert declared(c.model) == fields(config_lib.ModelConfig) - set(nested)
    assert declared(c.mesh) == fields(config_lib.MeshConfig)
    for name, cls in nested.items():
        assert declared(c.model[name]) == fields(cls), name
    # The loading and saving helpers are the same objects under both module names.
    from engram_jax import config_dicts

    assert config_lib.load_config_file is config_dicts.load_config_file
    assert config_lib.ConfigError is config_dicts.ConfigError
