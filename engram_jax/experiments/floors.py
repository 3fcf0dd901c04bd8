"""Compression floors: `xz -9e` and `bzip2 -9` bits per byte of a text.

A language model's bits per byte on held-out text should beat general-purpose compressors on the
same bytes. The stdlib's `lzma` (liblzma, preset 9 | PRESET_EXTREME, .xz container with CRC64) and
`bz2` (libbz2, level 9) write the same streams as the `xz -9e` and `bzip2 -9` commands.

    python -m engram_jax.experiments.floors --data_path=PATH [--holdout_fraction=0.05]
"""

from __future__ import annotations

import bz2
import lzma


def bits_per_byte(text: str | bytes) -> dict[str, float]:
    """{"xz_9e": ..., "bzip2_9": ...}: compressed bits per input byte (the containers included)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    if not data:
        raise ValueError("bits_per_byte: got empty text; expected at least one byte")
    xz = lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    bz = bz2.compress(data, compresslevel=9)
    return {"xz_9e": 8 * len(xz) / len(data), "bzip2_9": 8 * len(bz) / len(data)}


def main(argv: list[str]) -> None:
    from absl import flags

    from engram_jax import data as data_lib
    from engram_jax.experiments.heldout import split_text

    del argv
    f = flags.FLAGS
    _, held_out = split_text(data_lib.load_documents(f.data_path), f.holdout_fraction)
    text = "".join(held_out)
    floors = bits_per_byte(text)
    print(
        f"{f.data_path}: held-out last {f.holdout_fraction:.0%} = {len(text.encode()):,} bytes | "
        f"xz -9e {floors['xz_9e']:.4f} bits/byte | bzip2 -9 {floors['bzip2_9']:.4f} bits/byte"
    )


if __name__ == "__main__":
    from absl import flags

    from engram_jax import cli

    flags.DEFINE_string("data_path", None, "Corpus (any format engram_jax.data reads).")
    flags.DEFINE_float("holdout_fraction", 0.05, "Last fraction of the text held out.")
    flags.mark_flag_as_required("data_path")
    cli.run(main)
