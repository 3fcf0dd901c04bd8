"""The release converter (engram_jax/convert.py) on synthetic shards written with the `safetensors`
package in the released layout: values and shapes carried over exactly, the table never held whole
(peak RSS of the conversion, in a subprocess), and clear refusals."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from etils import epath
from safetensors.numpy import save_file

from engram_jax import config as config_lib
from engram_jax import convert
from engram_jax.model import engram_table_sizes
from engram_jax.tables import fp8, memory_item, row_files

CONFIG_FILE = """
from engram_jax.configs.tiny import get_config as tiny


def get_config():
    config = tiny()
    config.model.engram.layer_ids = {layer_ids}
    config.model.engram.heads_per_ngram = {heads}
    config.model.engram.embed_per_ngram = {embed}  # rows of embed / heads values
    config.model.engram.table_rows_per_head = ({rows}, {rows})
    config.model.engram.table_row_multiple = {multiple}
    return config
"""


def write_config(directory, layer_ids=(1, 3), heads=4, embed=128, rows=211, multiple=4) -> str:
    path = os.path.join(directory, "release_config.py")
    text = CONFIG_FILE.format(
        layer_ids=layer_ids, heads=heads, embed=embed, rows=rows, multiple=multiple
    )
    with open(path, "w") as f:
        f.write(text)
    return path


def release_tensors(model, layer: int, rng) -> dict[str, np.ndarray]:
    """One layer's tensors in the released names, dtypes and shapes."""
    e = model.engram
    rows, width = sum(engram_table_sizes(model)[layer]), e.row_width
    g, d = model.hc.n_streams, model.hidden_size
    values = rng.normal(size=(rows, width)).astype(np.float32) * 50
    name = f"layers.{layer}.engram."
    return {
        name + "embed.weight": values.clip(-448, 448).astype(ml_dtypes.float8_e4m3fn),
        name + "embed.scale": (2.0 ** rng.integers(-20, 4, (rows, width // 32)))
        .astype(np.float32)
        .astype(ml_dtypes.float8_e8m0fnu),
        name + "wkv.weight": rng.normal(size=((g + 1) * d, e.num_heads * width)).astype(
            ml_dtypes.bfloat16
        ),
        name + "q_weight": rng.normal(size=(g, d)).astype(np.float32),
        name + "k_weight": rng.normal(size=(g, d)).astype(ml_dtypes.bfloat16),
    }


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Two shards (one Engram layer each, plus an unrelated tensor) and the matching config."""
    root = tmp_path_factory.mktemp("release")
    config_path = write_config(str(root))
    model = config_lib.validate(config_lib.load_config_file(config_path)).model
    rng = np.random.default_rng(0)
    shards = root / "shards"
    shards.mkdir()
    tensors = {}
    for i, layer in enumerate(model.engram.layer_ids):
        part = release_tensors(model, layer, rng)
        part[f"layers.{layer}.attn.wq.weight"] = np.ones((4, 4), ml_dtypes.bfloat16)
        save_file(part, str(shards / f"model-0000{i + 1}-of-00002.safetensors"))
        tensors.update(part)
    return {"root": root, "config": config_path, "model": model, "tensors": tensors}


@pytest.fixture(scope="module")
def converted(release):
    out = str(release["root"] / "out")
    summary = convert.convert(str(release["root"] / "shards"), release["model"], out, 64)
    return out, summary


def test_tables_and_params_equal_the_release(release, converted):
    out, summary = converted
    model, tensors = release["model"], release["tensors"]
    for layer in model.engram.layer_ids:
        weight = tensors[f"layers.{layer}.engram.embed.weight"]
        scale = tensors[f"layers.{layer}.engram.embed.scale"]
        released = weight.shape[0]
        padded = -(-released // 4) * 4
        assert summary["layers"][layer]["rows"] == padded
        path = ("layer_" + str(layer), "engram", "table")
        stored = row_files.load_host_table(
            row_files.open_checkpoint_table(os.path.join(out, "memory"), path)
        )
        assert stored.shape == (padded, 33) and stored.dtype == np.uint8
        # Reference: the released bytes side by side; padding rows decode to zeros.
        expected = np.concatenate([weight.view(np.uint8), scale.view(np.uint8)], axis=1)
        np.testing.assert_array_equal(stored[:released], expected)
        decoded = fp8.decode(stored)
        reference = weight.astype(np.float64) * np.repeat(scale.astype(np.float64), 32, axis=1)
        np.testing.assert_array_equal(decoded[:released], reference)
        assert np.all(decoded[released:] == 0)
        reader = row_files.RowFile(summary["layers"][layer]["row_file"])
        reader.verify_all()
        assert reader.encoding == "fp8" and reader.row_width == 32
        np.testing.assert_array_equal(reader.read(np.arange(padded)), stored)
        reader.close()
        params = np.load(os.path.join(out, "engram_params", f"layer_{layer}.npz"))
        g, d = model.hc.n_streams, model.hidden_size
        wkv = tensors[f"layers.{layer}.engram.wkv.weight"].astype(np.float32)
        assert params["wkv"].shape == (model.engram.num_heads * 32, g + 1, d)
        # Stream s's key is rows s*D..(s+1)*D-1 of the released weight, the value the last D.
        for s in range(g + 1):
            np.testing.assert_array_equal(params["wkv"][:, s, :], wkv[s * d : (s + 1) * d].T)
        np.testing.assert_array_equal(
            params["k_weight"], tensors[f"layers.{layer}.engram.k_weight"].astype(np.float32)
        )
        np.testing.assert_array_equal(
            params["q_weight"], tensors[f"layers.{layer}.engram.q_weight"]
        )


def test_training_restore_of_fp8_tables_is_refused(release, converted):
    """Packed FP8 tables serve inference; restoring them as a trainable float table says so."""
    out, summary = converted
    rows = summary["layers"][1]["rows"]
    target = {"tables": {"layer_1": {"engram": {"table": np.zeros((rows, 32), np.float32)}}}}
    with pytest.raises(ValueError, match="packed FP8 table rows, which serve inference"):
        memory_item.restore_memory(epath.Path(out) / "memory", target, partial=True)


def _shards_with(release, tmp_path, change) -> str:
    """A copy of the release's tensors, edited by `change(tensors)`, in one shard."""
    tensors = dict(release["tensors"])
    change(tensors)
    directory = tmp_path / "bad"
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    return str(directory)


def test_wrong_shape_is_refused(release, tmp_path):
    def drop_a_row(tensors):
        name = "layers.3.engram.embed.weight"
        tensors[name] = tensors[name][:-1]

    shards = _shards_with(release, tmp_path, drop_a_row)
    with pytest.raises(convert.ConvertError, match=r"layers.3.engram.embed.weight has shape"):
        convert.convert(shards, release["model"], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")  # checked before anything is written


def test_missing_tensor_is_refused(release, tmp_path):
    shards = _shards_with(release, tmp_path, lambda t: t.pop("layers.3.engram.q_weight"))
    with pytest.raises(
        convert.ConvertError, match="layers.3.engram.q_weight .* none of the shards"
    ):
        convert.convert(shards, release["model"], str(tmp_path / "out"))


def test_truncated_shard_is_refused_by_the_command(release, tmp_path):
    shards = _shards_with(release, tmp_path, lambda t: None)
    shard = os.path.join(shards, "model.safetensors")
    os.truncate(shard, os.path.getsize(shard) - 100)
    run = subprocess.run(
        [sys.executable, "-m", "engram_jax.convert", f"--shards={shards}",
         f"--config={release['config']}", f"--out={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 1
    assert "model.safetensors: tensor" in run.stderr and "the shard is truncated" in run.stderr


_RSS_SCRIPT = """
import sys
from engram_jax import config as config_lib, convert

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

shards, config_path, out = sys.argv[1:]
model = config_lib.validate(config_lib.load_config_file(config_path)).model
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak RSS to the current RSS (the imports' peak is gone)
base = status("VmRSS")
convert.convert(shards, model, out, block_rows=1024)
print(status("VmHWM") - base)
"""


def test_conversion_holds_blocks_not_tables(tmp_path):
    """A 40 MiB table of 256-wide rows converts with a peak RSS growth of a quarter of it (a few
    blocks and the small dense parameters)."""
    config_path = write_config(
        str(tmp_path), layer_ids=(1,), heads=1, embed=256, rows=80021, multiple=1
    )
    model = config_lib.validate(config_lib.load_config_file(config_path)).model
    tensors = release_tensors(model, 1, np.random.default_rng(1))
    table_bytes = tensors["layers.1.engram.embed.weight"].nbytes * 33 // 32
    assert table_bytes > 40 * 2**20
    (tmp_path / "shards").mkdir()
    save_file(tensors, str(tmp_path / "shards" / "model.safetensors"))
    del tensors
    run = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "shards"), config_path,
         str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    growth = int(run.stdout.split()[-1])
    assert growth < table_bytes / 4, (growth, table_bytes)
    reader = row_files.RowFile(str(tmp_path / "out" / "table_rows" / "layer_1.fp8.rows"))
    reader.verify_all()
    reader.close()
