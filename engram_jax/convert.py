"""`python -m engram_jax.convert --shards=DIR --config=NAME --out=DIR`: the Engram tensors of a
released DeepSeek-V4.1 safetensors checkpoint, streamed into this project's formats.

Reads, for every Engram layer of the config, the tensors named in `RELEASE_NAMES` (the FP8 table
`embed.weight` with its E8M0 `embed.scale`, the fused projection `wkv`, the gains `q_weight`,
`k_weight`) straight from the shards by their safetensors header offsets, and writes:
- `<out>/memory/`: a `memory` item (tables/memory_item.py layout) holding each table as packed FP8
  rows, `tables.layer_<i>.engram.table` `[R, W + W/32]` uint8 (`tables/fp8.py`), so the rows are
  stored exactly as released;
- `<out>/table_rows/layer_<i>.fp8.rows`: the same rows as a checksummed row file
  (tables/row_files.py) for the disk placement;
- `<out>/engram_params/layer_<i>.npz`: the layer's dense parameters in this project's shapes
  (`wkv [M*W, G + 1, D]`, `q_weight`, `k_weight [G, D]`, float32).
Tables are copied `--block_rows` rows at a time (one block of each tensor in RAM, never a table),
so converting the 189 GiB of released tables needs a few MiB of RAM.

Every tensor's dtype and shape is checked against the config before anything is written: rows R =
the sum of the layer's prime-sized heads (`model.engram_table_sizes`, padded with zero rows up to
`table_row_multiple`), W = the row width, M = orders x heads, G = residual streams, D = the hidden
size. A missing tensor, a wrong shape or dtype, and a shard shorter than its header says are
refused naming the tensor and the shard.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np

from engram_jax import config as config_lib
from engram_jax.configs import resolve
from engram_jax.model import engram_table_sizes
from engram_jax.tables import fp8, memory_item, row_files

# Released tensor names per converted part, `{layer}` the 0-based Engram layer id. One dict, so a
# change of the release's names is one edit here.
RELEASE_NAMES = {
    "table": "layers.{layer}.engram.embed.weight",
    "table_scale": "layers.{layer}.engram.embed.scale",
    "wkv": "layers.{layer}.engram.wkv.weight",
    "wkv_scale": "layers.{layer}.engram.wkv.scale",  # optional: a block-scaled FP8 wkv
    "q_weight": "layers.{layer}.engram.q_weight",
    "k_weight": "layers.{layer}.engram.k_weight",
}
OPTIONAL = ("wkv_scale",)
# safetensors dtype names -> numpy dtypes.
DTYPES = {
    "F8_E4M3": fp8.VALUE_DTYPE,
    "F8_E8M0": fp8.SCALE_DTYPE,
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
}
BLOCK_ROWS = 1 << 16  # 16.5 MiB of 264-byte rows


class ConvertError(ValueError):
    """A released checkpoint that does not match the config or is damaged."""


class Tensor:
    """One tensor of a shard: where its bytes are, read by row ranges without loading it."""

    def __init__(
        self, name: str, shard: str, dtype: str, shape: Sequence[int], begin: int, end: int
    ):
        self.name, self.shard, self.dtype_name = name, shard, dtype
        self.shape = tuple(int(n) for n in shape)
        self.begin, self.end = begin, end
        if dtype not in DTYPES:
            raise ConvertError(
                f"{shard}: tensor {name} has dtype {dtype}; expected one of {list(DTYPES)}"
            )
        self.dtype = DTYPES[dtype]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows `[start, stop)` of the tensor (its first axis), read with one `pread`."""
        count = (stop - start) * self.row_bytes
        with open(self.shard, "rb") as f:
            data = os.pread(f.fileno(), count, self.begin + start * self.row_bytes)
        if len(data) != count:
            raise ConvertError(
                f"{self.shard}: short read of tensor {self.name} rows {start}-{stop} ({len(data)} "
                f"of {count} bytes): the shard is truncated"
            )
        return np.frombuffer(data, self.dtype).reshape(stop - start, *self.shape[1:])

    def read(self) -> np.ndarray:
        return self.read_rows(0, self.shape[0]) if self.shape else np.zeros(())


def read_header(shard: str) -> dict[str, Tensor]:
    """The tensors of one safetensors shard from its header (8-byte little-endian length, JSON,
    then the data; offsets relative to the data). Checks that every tensor's bytes are in the
    file and agree with its dtype and shape."""
    size = os.path.getsize(shard)
    with open(shard, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ConvertError(f"{shard}: {size} bytes, no safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if 8 + length > size:
            raise ConvertError(
                f"{shard}: header of {length} bytes but the file has {size}: the shard is truncated"
            )
        header = json.loads(f.read(length))
    data_start = 8 + length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = (data_start + int(o) for o in info["data_offsets"])
        tensor = Tensor(name, shard, info["dtype"], info["shape"], begin, end)
        expected = int(np.prod(tensor.shape, dtype=np.int64)) * tensor.dtype.itemsize
        if end - begin != expected:
            raise ConvertError(
                f"{shard}: tensor {name} spans {end - begin} bytes; its {info['dtype']} shape "
                f"{list(tensor.shape)} needs {expected}"
            )
        if end > size:
            raise ConvertError(
                f"{shard}: tensor {name} ends at byte {end} but the file has {size}: the shard is "
                "truncated"
            )
        tensors[name] = tensor
    return tensors


def find_shards(shards: str) -> list[str]:
    """The `.safetensors` files of a directory (or one file), sorted."""
    if os.path.isfile(shards):
        return [shards]
    found = sorted(
        os.path.join(shards, n) for n in os.listdir(shards) if n.endswith(".safetensors")
    )
    if not found:
        raise ConvertError(f"{shards}: no .safetensors shards")
    return found


def expected_shapes(model: config_lib.ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Released shapes of one Engram layer's tensors under `model` (module docstring)."""
    e = model.engram
    rows = sum(engram_table_sizes(model)[layer])
    width, heads = e.row_width, e.num_heads
    streams = model.hc.n_streams if model.hc.kind != "residual" else 1
    dim = model.hidden_size
    return {
        "table": (rows, width),
        "table_scale": (rows, width // fp8.BLOCK),
        "wkv": ((streams + 1) * dim, heads * width),
        "q_weight": (streams, dim),
        "k_weight": (streams, dim),
    }


def find_tensors(
    tensors: dict[str, Tensor], model: config_lib.ModelConfig, layer: int
) -> dict[str, Tensor]:
    """This layer's released tensors, every shape and the table's dtypes checked."""
    shapes = expected_shapes(model, layer)
    found = {}
    for part, pattern in RELEASE_NAMES.items():
        name = pattern.format(layer=layer)
        if name not in tensors:
            if part in OPTIONAL:
                continue
            raise ConvertError(
                f"tensor {name} ({part} of Engram layer {layer}) is in none of the shards"
            )
        tensor = tensors[name]
        if part in shapes and tensor.shape != shapes[part]:
            raise ConvertError(
                f"{tensor.shard}: tensor {name} has shape {list(tensor.shape)}; the config expects "
                f"{list(shapes[part])} ({_shape_reason(part)})"
            )
        found[part] = tensor
    for part, dtype in (("table", "F8_E4M3"), ("table_scale", "F8_E8M0")):
        if found[part].dtype_name != dtype:
            raise ConvertError(
                f"{found[part].shard}: tensor {found[part].name} has dtype "
                f"{found[part].dtype_name}; expected {dtype}"
            )
    return found


def _shape_reason(part: str) -> str:
    return {
        "table": "rows: sum of the layer's prime head sizes; width: embed_per_ngram / heads",
        "table_scale": "one scale per 32 values of each row",
        "wkv": "(streams + 1) x hidden_size by heads x row width",
        "q_weight": "streams x hidden_size",
        "k_weight": "streams x hidden_size",
    }[part]


class _PackedRows:
    """The packed FP8 rows `[R_out, W + W/32]` of a released table, read block by block: what
    `memory_item`'s piece writer slices. Each block read is also appended to a row file, so the
    shards are read once for both outputs; rows past the released ones (row padding) are zero."""

    def __init__(self, weight: Tensor, scale: Tensor, num_rows: int, writer: Any):
        self.weight, self.scale, self.writer = weight, scale, writer
        self.shape = (num_rows, weight.shape[1] + scale.shape[1])
        self.dtype = np.dtype(np.uint8)

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        released = self.weight.shape[0]
        block = np.zeros((stop - start, self.shape[1]), np.uint8)
        if start < released:
            end = min(stop, released)
            block[: end - start] = fp8.pack(
                self.weight.read_rows(start, end), self.scale.read_rows(start, end)
            )
        if stop > released:
            pad = fp8.encode(np.zeros((stop - max(start, released), self.weight.shape[1])))
            block[max(start, released) - start :] = pad
        self.writer.append(block)
        return block


def dense_params(found: dict[str, Tensor], model: config_lib.ModelConfig) -> dict[str, np.ndarray]:
    """`wkv [M*W, G + 1, D]`, `q_weight`, `k_weight [G, D]` in float32 (this project's layout: the
    released `[(G + 1) * D, M*W]` weight transposed; a block `wkv.scale` applied first)."""
    wkv = found["wkv"].read().astype(np.float32)  # [(G + 1) * D, M*W]
    if "wkv_scale" in found:
        scale = found["wkv_scale"].read().astype(np.float32)  # [ceil(O / b0), ceil(I / b1)]
        b0 = -(-wkv.shape[0] // scale.shape[0])
        b1 = -(-wkv.shape[1] // scale.shape[1])
        wkv = wkv * np.repeat(np.repeat(scale, b0, 0), b1, 1)[: wkv.shape[0], : wkv.shape[1]]
    streams_plus_one = found["q_weight"].shape[0] + 1
    return {
        "wkv": wkv.T.reshape(wkv.shape[1], streams_plus_one, model.hidden_size),
        "q_weight": found["q_weight"].read().astype(np.float32),
        "k_weight": found["k_weight"].read().astype(np.float32),
    }


def convert(
    shards: str, model: config_lib.ModelConfig, out: str, block_rows: int = BLOCK_ROWS
) -> dict[str, Any]:
    """Converts every Engram layer of `model` (module docstring); returns a summary
    `{"layers": {layer: {"rows": R, "row_files": path}}, "memory": dir}`."""
    from etils import epath

    e = model.engram
    if not e.enabled:
        raise ConvertError("config: model.engram.layer_ids is empty; nothing to convert")
    fp8.check_width(e.row_width, "config")
    tensors: dict[str, Tensor] = {}
    for shard in find_shards(shards):
        tensors.update(read_header(shard))
    # Every layer is checked before anything is written.
    layers = {layer: find_tensors(tensors, model, layer) for layer in e.layer_ids}
    memory_dir = epath.Path(out) / "memory"
    memory_dir.mkdir(parents=True, exist_ok=True)
    index, summary = {}, {"layers": {}, "memory": os.fspath(memory_dir)}
    multiple = max(1, e.table_row_multiple)
    for layer, found in layers.items():
        released = found["table"].shape[0]
        num_rows = -(-released // multiple) * multiple
        source = f"tables.layer_{layer}.engram.table"
        writer = row_files.RowFileWriter(
            os.path.join(out, "table_rows"),
            f"layer_{layer}.fp8",
            (num_rows, fp8.packed_width(e.row_width)),
            np.uint8,
            encoding="fp8",
            row_width=e.row_width,
            fingerprint=_fingerprint(found),
            step=0,
            source=source,
        )
        packed = _PackedRows(found["table"], found["table_scale"], num_rows, writer)
        try:
            memory_item._write_piece(
                memory_dir / source, packed, ((0, num_rows), (0, packed.shape[1])), block_rows
            )
        except BaseException:
            writer.abort()
            raise
        rows_path = writer.commit()
        index[source] = {"shape": list(packed.shape), "dtype": "uint8"}
        params_dir = os.path.join(out, "engram_params")
        os.makedirs(params_dir, exist_ok=True)
        np.savez(os.path.join(params_dir, f"layer_{layer}.npz"), **dense_params(found, model))
        summary["layers"][layer] = {"rows": num_rows, "row_file": rows_path}
    (memory_dir / memory_item.INDEX_FILE).write_text(
        json.dumps(
            {"format": memory_item.FORMAT, "version": memory_item.VERSION, "leaves": index},
            indent=1,
        )
    )
    return summary


def _fingerprint(found: dict[str, Tensor]) -> str:
    """The released table's identity: its shard names, offsets and a sample of its rows."""
    import hashlib

    table = found["table"]
    digest = hashlib.sha256(
        json.dumps([os.path.basename(table.shard), table.begin, list(table.shape)]).encode()
    )
    for row in sorted(set(np.linspace(0, table.shape[0] - 1, 9).astype(int).tolist())):
        digest.update(table.read_rows(row, row + 1).tobytes())
    return digest.hexdigest()[:32]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True, help="directory of .safetensors shards")
    parser.add_argument("--config", required=True, help="config name (deepseek_v41) or path")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--block_rows", type=int, default=BLOCK_ROWS, help="rows per copied block")
    args = parser.parse_args(argv)
    if args.block_rows < fp8.BLOCK:
        parser.error(f"--block_rows: got {args.block_rows}; expected >= {fp8.BLOCK}")
    model = config_lib.validate(config_lib.load_config_file(resolve(args.config))).model
    try:
        summary = convert(args.shards, model, args.out, args.block_rows)
    except ConvertError as e:
        print(f"convert: {e}", file=sys.stderr)
        raise SystemExit(1) from e
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
