"""The V4.1 forms inside the language model: a tiny config with `engram.form="v41"` and
`hc.kind="mhc_v41"` decodes with the cache exactly as the full forward computes, the split at the
first Engram layer (as `generate` runs a decode step) equals the whole stack, and the Engram layer
keeps no decode state.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from engram_jax import generate as generate_lib
from engram_jax.model import Transformer, engram_table_sizes
from tests.test_model import VOCAB, B, T, _config, _init_decoder

V41 = {"engram.form": "v41", "hc.kind": "mhc_v41", "hc.sinkhorn_eps": 1e-6}


@pytest.fixture(scope="module")
def decoder():
    # Two layers: layer 0 dense, layer 1 Engram + MoE; attention caches in both.
    cfg = _config(num_layers=2, **V41)
    return cfg, *_init_decoder(cfg)


def test_v41_engram_has_v41_parameters_and_no_decode_state(decoder):
    cfg, _, _, _, _, variables = decoder
    engram = variables["params"]["layer_1"]["engram"]
    assert set(engram) == {"table", "wkv", "q_weight", "k_weight"}
    m = len(engram_table_sizes(cfg)[1])
    assert engram["wkv"].shape == (m * cfg.engram.row_width, cfg.hc.n_streams + 1, 32)
    assert set(variables["cache"]["layer_1"]) == {"attention"}  # no convolution state


def test_v41_cached_decoding_matches_full_forward(decoder):
    _, model, tokens, hash_ids, full_logits, variables = decoder
    params = {k: v for k, v in variables.items() if k != "cache"}

    @jax.jit
    def step(cache, tokens_BT, positions_BT, ids):
        (logits, _), updates = model.apply(
            {**params, "cache": cache}, tokens_BT, positions_BT, None, ids, mutable=["cache"]
        )
        return logits, updates["cache"]

    cache, outputs = variables["cache"], []
    chunks = [(0, 5)] + [(i, i + 1) for i in range(5, T)]  # a prefill, then token by token
    for start, stop in chunks:
        positions = np.broadcast_to(np.arange(start, stop, dtype=np.int32), (B, stop - start))
        logits, cache = step(cache, tokens[:, start:stop], positions, hash_ids[:, :, start:stop])
        outputs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outputs, axis=1), full_logits, atol=1e-4, rtol=0)


def test_v41_split_at_the_engram_layer_equals_the_whole_stack(decoder):
    cfg, _, tokens, hash_ids, _, variables = decoder
    model = Transformer(cfg)
    params = {k: v for k, v in variables.items() if k != "cache"}
    whole, _ = model.apply(params, tokens, None, None, hash_ids)
    # The prefix hands the streams AND the next site's read weights to the suffix.
    hidden, _ = model.apply(params, tokens, layer_range=(0, 1))
    assert isinstance(hidden, tuple) and hidden[1].shape == (B, T, cfg.hc.n_streams)
    split, _ = model.apply(
        params, tokens, None, None, hash_ids, hidden_BTGD=hidden, layer_range=(1, 2)
    )
    np.testing.assert_allclose(np.asarray(split), np.asarray(whole), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="exactly when hc.kind='mhc_v41'"):
        model.apply(params, tokens, None, None, hash_ids, hidden_BTGD=hidden[0], layer_range=(1, 2))


def test_v41_generate_decode_step_matches_full_forward(decoder):
    """generate's DecodeStep (device tables): its traced empty cache and its jitted step give the
    full forward's last-position logits for a prompt and then token by token."""
    cfg, _, tokens, hash_ids, full_logits, variables = decoder
    params = {k: v for k, v in variables.items() if k != "cache"}
    step = generate_lib.DecodeStep(cfg, VOCAB)
    cache = step.empty_cache(T)  # one sequence: batch row 0 of the full forward
    assert "engram" not in cache["layer_1"]
    for start, stop in [(0, 6)] + [(i, i + 1) for i in range(6, T)]:
        positions = np.arange(start, stop, dtype=np.int32)[None, :]
        logits, cache = step(
            params, cache, tokens[:1, start:stop], positions, hash_ids[:1, :, start:stop]
        )
        np.testing.assert_allclose(np.asarray(logits), full_logits[:1, stop - 1], atol=1e-4)
