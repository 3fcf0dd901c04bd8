"""Host-side data pipeline: documents, tokenizer, packed grain batches and Engram hash ids.

Everything here runs on the host with numpy and grain; the model receives finished integer arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence

import grain
import numpy as np
import tokenizers
from absl import flags
from grain import experimental as grain_experimental
from tokenizers import decoders, models, pre_tokenizers, trainers

from engram_jax import corpus as corpus_lib
from engram_jax import storage
from engram_jax.cli import describe_path
from engram_jax.hashing import (
    CompressedTokenizer,
    NgramHasher,
    check_compressed_vocab_size,
    tokenizer_fingerprint,
)
from engram_jax.overencoding_ids import OverEncodingIds
from engram_jax.tables.unique_rows import unique_rows

# What token ids mean (pad, eos, bos, byte lengths), importable from here as before.
from engram_jax.token_spec import (  # noqa: F401
    EOS_TOKEN,
    PAD_TOKEN,
    DataSpec,
    make_data_spec,
    resolve_pad_id,
    token_byte_lengths,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------- documents
# The readers, file listing and per-process shards live in engram_jax.corpus; these names stay
# importable from here.

SUPPORTED_EXTENSIONS = corpus_lib.SUPPORTED_EXTENSIONS
BUNDLED_CORPUS = corpus_lib.BUNDLED_CORPUS
bundled_corpus_path = corpus_lib.bundled_corpus_path
split_text_documents = corpus_lib.split_text_documents


def load_documents(data_path: str) -> list[str]:
    """Loads the documents of a corpus as strings.

    Formats, chosen by extension:
      * `.txt`, `.txt.gz`: documents are separated by two or more blank lines (one blank line is a
        paragraph break inside a document); a file without such a separator is one document.
      * `.jsonl`, `.jsonl.gz`: one JSON object per line, field `"text"`.
      * `.parquet`: column `"text"` (read with pyarrow); null rows are skipped.
      * `.arrayrecord`, `.array_record`: one UTF-8 document per record (needs `array_record`).

    Whitespace-only documents are dropped.

    Args:
      data_path: "" for the bundled corpus (a slice of the Python 3.11 documentation, see
        `engram_jax/assets/LICENSE_CORPUS.md`); a file; a glob (`*`, `?`, `[`; `**` recurses); or a
        directory (all files with a supported extension below it, others skipped). Files are read
        in sorted path order.

    Returns:
      The documents, in file order then in-file order.

    Raises:
      FileNotFoundError: the path does not exist or the glob matches nothing.
      ValueError: an unsupported extension, a malformed record, or no non-blank document.
    """
    files = corpus_lib.list_files(data_path)
    documents: list[str] = []
    for path in files:
        documents.extend(corpus_lib.piece_documents(corpus_lib.Piece(path)))
    if not documents:
        raise ValueError(
            f"data_path={data_path!r}: found no non-blank document in {len(files)} file(s)"
        )
    logger.info("Loaded %d documents from %d file(s) (%r)", len(documents), len(files), data_path)
    return documents


def split_documents(documents: Sequence[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split: the last `eval_fraction` of the documents is held out.

    Args:
      documents: the corpus, in load order.
      eval_fraction: in (0, 1); at least one document goes to each side.

    Returns:
      (train_documents, eval_documents).

    Raises:
      ValueError: eval_fraction outside (0, 1) or fewer than two documents.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction: got {eval_fraction}; expected a value in (0, 1)")
    if len(documents) < 2:
        raise ValueError(
            f"documents: got {len(documents)}; need at least 2 to hold out a validation split"
        )
    num_eval = min(len(documents) - 1, max(1, math.ceil(eval_fraction * len(documents))))
    cut = len(documents) - num_eval
    return list(documents[:cut]), list(documents[cut:])


# ---------------------------------------------------------------------------------------- tokenizer

_CACHE_VERSION = "engram_jax-bpe-v1"


def train_bpe_tokenizer(documents: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Trains a byte-level BPE tokenizer with `<pad>` = 0 and `<eos>` = 1.

    Byte-level pre-tokenisation (no prefix space, no normaliser) makes encoding lossless, so the
    UTF-8 byte lengths of a document's tokens sum to the document's byte length.

    Args:
      documents: training text, a list or any iterable (e.g. `Corpus.sample`, a bounded stream:
        the trainer counts pairs over what it is given, so pass a sample of a large corpus).
      vocab_size: target size including the 2 special tokens and 256 byte tokens; a small corpus
        may give fewer tokens.

    Returns:
      The trained tokenizer.
    """
    min_size = 2 + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size: got {vocab_size}; a byte-level BPE needs at least {min_size} "
            "(2 special + 256 byte tokens)"
        )
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    length = len(documents) if isinstance(documents, Sequence) else None
    tokenizer.train_from_iterator(documents, trainer=trainer, length=length)
    assert tokenizer.token_to_id(PAD_TOKEN) == 0 and tokenizer.token_to_id(EOS_TOKEN) == 1
    return tokenizer


def tokenizer_cache_key(documents: Sequence[str], vocab_size: int) -> str:
    """Hex key of (corpus content, vocab_size, trainer version) naming a cached tokenizer."""
    digest = hashlib.sha256(f"{_CACHE_VERSION}\n{vocab_size}\n{len(documents)}\n".encode())
    for doc in documents:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:20]


def load_tokenizer(tokenizer_path: str) -> tokenizers.Tokenizer:
    """Reads a Hugging Face `tokenizer.json` (a local path or a URL); errors name the path."""
    local = "://" not in tokenizer_path
    # os.path.isfile for local paths: epath calls a FIFO a file, and reading one blocks.
    if not (os.path.isfile(tokenizer_path) if local else storage.isfile(tokenizer_path)):
        # Says what a local path is instead (a FIFO, a device, a directory, a link loop).
        what = describe_path(tokenizer_path) if local else "no such file"
        raise FileNotFoundError(
            f"tokenizer_path={tokenizer_path!r}: {what}; expected a tokenizer.json file"
        )
    try:
        return tokenizers.Tokenizer.from_str(storage.read_text(tokenizer_path))
    except Exception as e:  # the Rust loader raises plain Exception subclasses
        raise ValueError(
            f"tokenizer_path={tokenizer_path!r}: not a readable Hugging Face tokenizer.json ({e})"
        ) from e


def load_or_train_tokenizer(
    tokenizer_path: str,
    documents: Iterable[str],
    vocab_size: int,
    cache_dir: str,
    *,
    cache_key: str | None = None,
) -> tokenizers.Tokenizer:
    """Loads `tokenizer_path`, or trains (once) a byte-level BPE on `documents`.

    Args:
      tokenizer_path: a `tokenizer.json`; "" trains with `train_bpe_tokenizer`.
      documents: the training corpus (used only when training; iterated at most once).
      vocab_size: target vocabulary size when training.
      cache_dir: trained tokenizers are stored as `<cache_dir>/bpe-<key>/tokenizer.json` and
        reused by later calls with the same key.
      cache_key: names the cached tokenizer (e.g. from a corpus fingerprint); None hashes the
        documents' content (`tokenizer_cache_key`, for a list of documents).

    Returns:
      The tokenizer.

    Raises:
      FileNotFoundError / ValueError: `tokenizer_path` is missing or unreadable (the path is named).
    """
    if tokenizer_path:
        return load_tokenizer(tokenizer_path)
    if cache_key is None:
        documents = list(documents)
        cache_key = tokenizer_cache_key(documents, vocab_size)
    cache_path = os.path.join(cache_dir, f"bpe-{cache_key}", "tokenizer.json")
    if os.path.isfile(cache_path):
        logger.info("Reusing cached tokenizer %s", cache_path)
        return load_tokenizer(cache_path)
    logger.info("Training a byte-level BPE (vocab_size=%d)", vocab_size)
    tokenizer = train_bpe_tokenizer(documents, vocab_size)
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    # Write then rename: processes training the same tokenizer never see a half-written file.
    # A unique temporary name: processes on several hosts can share a PID and a workdir.
    fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(cache_path), suffix=".tmp")
    os.close(fd)
    try:
        tokenizer.save(tmp_path)
        os.replace(tmp_path, cache_path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    logger.info("Saved tokenizer to %s", cache_path)
    return tokenizer


# ---------------------------------------------------------------------------------------- pipeline

DEFAULT_SHUFFLE_WINDOW = 1024  # documents a DocumentStream shuffles together


@dataclasses.dataclass(frozen=True, eq=False)
class EngramHashSpec:
    """Host-side Engram hashing for `make_pipeline` (docs/design.md 1.2-1.3).

    Attributes:
      compressor: raw ids -> compressed ids of the pipeline's tokenizer.
      hasher: built with V' = compressor.compressed_vocab_size and the compressed pad id.
      layer_ids: Engram layers, in the order of the batch's `hash_ids` axis 1.
    """

    compressor: CompressedTokenizer
    hasher: NgramHasher
    layer_ids: tuple[int, ...]


def make_engram_hash_spec(
    tokenizer: tokenizers.Tokenizer,
    spec: DataSpec,
    *,
    vocab_bases: Sequence[int],
    max_ngram: int,
    heads_per_ngram: int,
    layer_ids: Sequence[int],
    seed: int = 0,
    cache_dir: str | None = None,
    compressed_vocab_size: int = 0,
) -> EngramHashSpec:
    """Builds the compressor and hasher of a tokenizer (docs/design.md 1.2: hash with pad' =
    old_to_new[pad_id]).

    Args:
      tokenizer: the pipeline's tokenizer.
      spec: supplies the raw pad id.
      vocab_bases, max_ngram, heads_per_ngram, layer_ids, seed: `NgramHasher` arguments.
      cache_dir: where `CompressedTokenizer` caches its table (None: no cache).
      compressed_vocab_size: the V' the config expects (0: unchecked).

    Returns:
      The EngramHashSpec.
    """
    compressor = CompressedTokenizer.from_tokenizer(tokenizer, cache_dir=cache_dir)
    check_compressed_vocab_size(compressor, compressed_vocab_size)
    hasher = NgramHasher(
        vocab_bases,
        max_ngram,
        heads_per_ngram,
        layer_ids,
        compressor.compressed_vocab_size,
        int(compressor.old_to_new[spec.pad_id]),
        seed=seed,
    )
    return EngramHashSpec(compressor, hasher, tuple(layer_ids))


def _check_engram_spec(
    engram: EngramHashSpec, spec: DataSpec, tokenizer: tokenizers.Tokenizer
) -> None:
    """The compressor must come from this tokenizer; the hasher must use its V' and pad'."""
    num_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    digest = tokenizer_fingerprint(tokenizer)
    if engram.compressor.vocab_size != num_tokens or engram.compressor.tokenizer_sha256 not in (
        "",
        digest,
    ):
        raise ValueError(
            f"engram.compressor: built for a tokenizer of {engram.compressor.vocab_size} tokens "
            f"(sha256 {engram.compressor.tokenizer_sha256[:12] or '?'}); expected the pipeline's "
            f"tokenizer ({num_tokens} tokens, sha256 {digest[:12]})"
        )
    pad_compressed = int(engram.compressor.old_to_new[spec.pad_id])
    if engram.hasher.pad_id != pad_compressed:
        raise ValueError(
            f"engram.hasher.pad_id: got {engram.hasher.pad_id}; expected the compressed pad id "
            f"old_to_new[{spec.pad_id}] = {pad_compressed} (docs/design.md 1.2)"
        )
    if engram.hasher.token_vocab_size != engram.compressor.compressed_vocab_size:
        raise ValueError(
            f"engram.hasher.token_vocab_size: got {engram.hasher.token_vocab_size}; expected the "
            f"compressed vocab size {engram.compressor.compressed_vocab_size}"
        )
    unknown = [layer for layer in engram.layer_ids if layer not in engram.hasher.layer_ids]
    if unknown or not engram.layer_ids:
        raise ValueError(
            f"engram.layer_ids: got {engram.layer_ids}; expected a non-empty subset of the "
            f"hasher's layer_ids {engram.hasher.layer_ids}"
        )


def check_token_ids(ids: np.ndarray, vocab_size: int, where: str = "document") -> None:
    """Raises ValueError naming the first id outside [0, vocab_size)."""
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        token_id = int(ids[np.argmax(bad)])
        raise ValueError(
            f"{where}: token id {token_id} is outside [0, vocab_size={vocab_size}); "
            "the tokenizer and the model vocabulary disagree"
        )


def make_encoder(tokenizer: tokenizers.Tokenizer) -> Callable[[str], np.ndarray]:
    """Text -> int64 token ids exactly as the pipeline encodes documents (and `generate` prompts):
    no special tokens added by the tokenizer's post-processor, and special-token text such as a
    literal "<eos>" inside a document encoded as plain text (on a private copy of the tokenizer)."""
    private = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    private.encode_special_tokens = True

    def encode(text: str) -> np.ndarray:
        return np.asarray(private.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    return encode


class _TokenizeDocument(grain.transforms.Map):
    """str -> {"inputs", "targets"}: the document's tokens (+ eos) shifted by one."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, spec: DataSpec, add_eos: bool):
        self._encode = make_encoder(tokenizer)
        self._spec = spec
        self._add_eos = add_eos

    def map(self, document: str) -> dict[str, np.ndarray]:
        ids_X = self._encode(document)
        check_token_ids(ids_X, self._spec.vocab_size)
        if self._add_eos and ids_X.size:
            ids_X = np.concatenate([ids_X, np.array([self._spec.eos_id], np.int64)])
        ids_X = ids_X.astype(np.int32)
        return {"inputs": ids_X[:-1], "targets": ids_X[1:]}


def _has_tokens(example: dict[str, np.ndarray]) -> bool:
    return example["inputs"].size > 0


class _FinishRow(grain.transforms.Map):
    """Packed row -> model fields; padding gets pad_id, loss_mask 0 and target_bytes 0."""

    def __init__(self, spec: DataSpec):
        self._pad_id = spec.pad_id
        self._token_bytes_V = spec.token_bytes_V

    def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        segment_ids_T = row["inputs_segment_ids"].astype(np.int32)
        assert np.array_equal(segment_ids_T, row["targets_segment_ids"])
        valid_T = segment_ids_T > 0
        targets_T = np.where(valid_T, row["targets"], self._pad_id).astype(np.int32)
        return {
            "inputs": np.where(valid_T, row["inputs"], self._pad_id).astype(np.int32),
            "targets": targets_T,
            "loss_mask": valid_T.astype(np.float32),
            "segment_ids": segment_ids_T,
            "positions": np.where(valid_T, row["inputs_positions"], 0).astype(np.int32),
            "target_bytes": np.where(valid_T, self._token_bytes_V[targets_T], 0).astype(np.int32),
        }


def compute_hash_ids(
    inputs_BT: np.ndarray, segment_ids_BT: np.ndarray, engram: EngramHashSpec
) -> np.ndarray:
    """Engram hash ids of raw token ids, windows cut at segment starts.

    Args:
      inputs_BT: int [B, T] raw token ids (padding holds the raw pad id).
      segment_ids_BT: int [B, T] segment ids (0 = padding).
      engram: compressor, hasher and layer ids.

    Returns:
      int32 [B, L_e, T, M] with L_e = len(layer_ids), M = (max_ngram - 1) * heads_per_ngram.
    """
    compressed_BT = engram.compressor.compress(inputs_BT)
    # One window build for all layers; document starts read as pad' like a row start.
    by_layer = engram.hasher.hash_all(compressed_BT, segment_ids=segment_ids_BT)  # {l: [B, T, M]}
    per_layer = [by_layer[layer_id] for layer_id in engram.layer_ids]  # L_e x [B, T, M]
    return np.stack(per_layer, axis=1).astype(np.int32)  # [B, L_e, T, M]


def unique_table_rows(
    hash_ids_BLTM: np.ndarray, head_vocab_sizes: Sequence[Sequence[int]], shards: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The distinct table rows a batch reads, per batch shard and Engram layer, for sparse updates.

    The batch's rows split into `shards` equal consecutive groups (the data-parallel shards of the
    step); each group's flat row ids (hash + the head's row offset in the layer's table) are
    deduplicated per layer. The padded size `U = (B / shards) * T * M`, the number of ids in a
    group, is the only bound that can never overflow, and it depends on the batch shape alone, so
    the step compiles once; gathering `U` rows costs what the plain per-token lookup costs, never
    the table's size.

    Args:
      hash_ids_BLTM: int [B, L_e, T, M] per-head hash ids (`compute_hash_ids`).
      head_vocab_sizes: per Engram layer (axis 1 order), its heads' table sizes (the primes).
      shards: groups the batch splits into; must divide B.

    Returns:
      `(memory_ids [shards, L_e, U] int32, memory_inverse [B, L_e, T, M] int32)`: each group's
      sorted unique flat row ids, padded with -1, and for every id the index of its row in its own
      group's list, so `memory_ids[g, l][memory_inverse[b, l, t, m]]` is the flat row of that id.
    """
    b, num_layers, t, m = hash_ids_BLTM.shape
    if shards < 1 or b % shards:
        raise ValueError(
            f"memory_shards: got {shards}; expected a positive divisor of the batch size {b}"
        )
    rows_per_group = b // shards
    u = rows_per_group * t * m
    ids_SLU = np.full((shards, num_layers, u), -1, np.int32)
    inverse_BLTM = np.empty((b, num_layers, t, m), np.int32)
    for li, sizes in enumerate(head_vocab_sizes):
        sizes_M = np.asarray(sizes, np.int64)
        offsets_M = np.concatenate([[0], np.cumsum(sizes_M)[:-1]])
        flat_BTM = hash_ids_BLTM[:, li].astype(np.int64) + offsets_M  # [B, T, M]
        for g in range(shards):
            group = slice(g * rows_per_group, (g + 1) * rows_per_group)
            # [b, T, M] -> U padded sorted ids and their [b, T, M] positions among them.
            ids_SLU[g, li], inverse_BLTM[group, li] = unique_rows(flat_BTM[group], size=u)
    return ids_SLU, inverse_BLTM


class _AddOverEncodingIds(grain.transforms.Map):
    """Adds `overencoding_ids` [B, T, K] (docs/design.md §5), windows cut at segment starts."""

    def __init__(self, ids: OverEncodingIds):
        self._ids = ids

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**batch, "overencoding_ids": self._ids(batch["inputs"], batch["segment_ids"])}


class _AddHashIds(grain.transforms.Map):
    """Adds `hash_ids` [B, L_e, T, M] and the deduplicated rows (`unique_table_rows`)."""

    def __init__(self, engram: EngramHashSpec, memory_shards: int = 1):
        self._engram = engram
        self._shards = memory_shards

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hash_ids = compute_hash_ids(batch["inputs"], batch["segment_ids"], self._engram)
        sizes = [self._engram.hasher.head_vocab_sizes(layer) for layer in self._engram.layer_ids]
        ids, inverse = unique_table_rows(hash_ids, sizes, self._shards)
        return {**batch, "hash_ids": hash_ids, "memory_ids": ids, "memory_inverse": inverse}


def _check_documents(
    documents: Sequence[str] | corpus_lib.DocumentStream,
    shard_index: int,
    shard_count: int,
    num_epochs: int | None,
    shuffle: bool,
) -> None:
    """Refuses a shard, epoch count or order that the documents cannot give."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(
            f"shard_index: got {shard_index}; expected an index in [0, shard_count={shard_count})"
        )
    if isinstance(documents, corpus_lib.DocumentStream):
        if shard_count != 1 or num_epochs is not None or not shuffle:
            raise ValueError(
                "documents: a DocumentStream is already one process's shard with its own epochs "
                "and order (Corpus.stream(shard_index=, num_epochs=, shuffle=)); leave "
                "shard_index, shard_count, num_epochs and shuffle at their defaults"
            )
    elif len(documents) < shard_count:
        raise ValueError(
            f"documents: got {len(documents)}; need at least shard_count={shard_count} "
            "so that every process has data"
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs: got {num_epochs}; expected None (forever) or >= 1")


def _tokenized_documents(
    documents: Sequence[str] | corpus_lib.DocumentStream,
    tokenize: grain.transforms.Map,
    *,
    seed: int,
    shard_index: int,
    shard_count: int,
    num_epochs: int | None,
    shuffle: bool,
    worker_count: int,
    shuffle_window: int,
) -> grain.IterDataset:
    """This shard's documents, shuffled and repeated as asked, tokenised (empty ones dropped)."""
    if isinstance(documents, corpus_lib.DocumentStream):
        # Read lazily from this process's pieces; each grain worker reads its own pieces.
        stream = documents.refined(worker_count) if worker_count else documents
        ds = stream
        if stream.shuffle and shuffle_window > 1:
            ds = grain_experimental.WindowShuffleIterDataset(
                ds, window_size=shuffle_window, seed=seed
            )
        return ds.map(tokenize).filter(_has_tokens)
    # Documents are sharded before shuffling: each process shuffles its own shard, every epoch
    # anew (grain reseeds per epoch); shards are the interleaved slices docs[i::shard_count].
    ds = grain.MapDataset.source(list(documents))[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    return ds.map(tokenize).filter(_has_tokens).to_iter_dataset()


def make_dataset(
    documents: Sequence[str] | corpus_lib.DocumentStream,
    tokenizer: tokenizers.Tokenizer,
    spec: DataSpec,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    add_eos: bool = True,
    drop_remainder: bool = True,
    engram: EngramHashSpec | None = None,
    worker_count: int = 0,
    prefetch: int = 0,
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
    memory_shards: int = 1,
    overencoding: OverEncodingIds | None = None,
) -> grain.IterDataset:
    """The grain dataset behind `make_pipeline` (same arguments); iterate it for batches."""
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name}: got {value}; expected a positive integer")
    for name, value, least in (
        ("worker_count", worker_count, 0),
        ("prefetch", prefetch, 0),
        ("shuffle_window", shuffle_window, 1),
    ):
        if value < least:
            raise ValueError(f"{name}: got {value}; expected an integer >= {least}")
    _check_documents(documents, shard_index, shard_count, num_epochs, shuffle)
    if add_eos and spec.eos_id is None:
        raise ValueError("add_eos: the tokenizer has no eos token; pass add_eos=False")
    if engram is not None:
        _check_engram_spec(engram, spec, tokenizer)
    ds = _tokenized_documents(
        documents,
        _TokenizeDocument(tokenizer, spec, add_eos),
        seed=seed,
        shard_index=shard_index,
        shard_count=shard_count,
        num_epochs=num_epochs,
        shuffle=shuffle,
        worker_count=worker_count,
        shuffle_window=shuffle_window,
    )
    # Concat-then-split: documents fill rows back to back; a document crossing a row end
    # continues as a new segment (positions restart at 0) in the next row, with its targets.
    packed = grain_experimental.ConcatThenSplitIterDataset(
        ds, length_struct={"inputs": seq_len, "targets": seq_len}
    )
    batches = packed.map(_FinishRow(spec)).batch(batch_size, drop_remainder=drop_remainder)
    if engram is not None:
        if batch_size % memory_shards:
            raise ValueError(
                f"memory_shards: got {memory_shards}; expected a divisor of batch_size={batch_size}"
            )
        batches = batches.map(_AddHashIds(engram, memory_shards))
    if overencoding is not None:
        batches = batches.map(_AddOverEncodingIds(overencoding))
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():
            raise ValueError(
                f"worker_count={worker_count}: grain worker processes read absl flags; run under "
                "absl.app.run (as engram_jax.train does) or call absl.flags.FLAGS.mark_as_parsed()"
            )
        batches = batches.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=max(prefetch, 1)
            )
        )
    elif prefetch:
        # A background thread prepares the next batches while the device runs the step; the
        # iterator state stays that of the last batch handed out.
        batches = grain_experimental.ThreadPrefetchIterDataset(
            batches, prefetch_buffer_size=prefetch
        )
    return batches


# Over 80 lines for its docstring alone, the one place that documents every batch key.
def make_pipeline(
    documents: Sequence[str],
    tokenizer: tokenizers.Tokenizer,
    spec: DataSpec,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    add_eos: bool = True,
    drop_remainder: bool = True,
    engram: EngramHashSpec | None = None,
    worker_count: int = 0,
    prefetch: int = 0,
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
    memory_shards: int = 1,
    overencoding: OverEncodingIds | None = None,
) -> grain.DatasetIterator:
    """A checkpointable iterator of packed, per-process batches.

    Each document is tokenised (no special tokens added by the tokenizer), `eos` is appended, and
    the sequence x_0..x_n becomes inputs x_0..x_{n-1} and targets x_1..x_n, so every non-padding
    position has a target inside its own document: the eos is the target of the last real token,
    and the last token of a document (the eos) never appears as an input. Documents are packed
    back to back into rows of `seq_len` (grain concat-then-split); one crossing a row boundary is
    cut, its remainder starting a new segment in the next row.

    Batch fields (numpy, leading dims [B, T] with B = batch_size, T = seq_len):
      * inputs int32 [B, T]: token ids; padding holds spec.pad_id.
      * targets int32 [B, T]: next token of the same document; padding holds spec.pad_id.
      * loss_mask float32 [B, T]: 1 where a target exists (every real token), 0 on padding.
      * segment_ids int32 [B, T]: 1, 2, ... per document piece within the row; 0 on padding.
      * positions int32 [B, T]: position within the segment, restarting at 0; 0 on padding.
      * target_bytes int32 [B, T]: UTF-8 byte length of the target token (0 for special tokens
        such as eos, and on padding), for bits per byte.
      * hash_ids int32 [B, L_e, T, M] (only with `engram`): `engram.hasher` applied to the
        compressed `inputs` with `segment_ids`, one slab per Engram layer in `layer_ids` order.
      * memory_ids int32 [S, L_e, U] and memory_inverse int32 [B, L_e, T, M] (only with `engram`):
        the distinct table rows of each of the S = `memory_shards` batch groups
        (`unique_table_rows`), for sparse table updates.
      * overencoding_ids int32 [B, T, K] (only with `overencoding`): OverEncoding's flat n-gram
        rows of `inputs`, windows cut at segment starts (`overencoding_ids.ngram_ids_host`).

    Padding only appears in the last rows of a finite (num_epochs) stream.

    Args:
      documents: a list of documents (e.g. a `split_documents` side), sharded, shuffled and
        repeated here; or a `corpus.DocumentStream` (`Corpus.stream(...)`): one process's lazily
        read shard of a corpus, which brings its own shard, epochs and piece order (leave
        shard_index, shard_count, num_epochs and shuffle at their defaults) and is shuffled
        further within a window of `shuffle_window` documents.
      tokenizer: the tokenizer.
      spec: ids and byte lengths (`make_data_spec`).
      seq_len: tokens per row.
      batch_size: rows per batch on this process.
      seed: shuffling seed (the run's seed).
      shard_index: this process's shard (jax.process_index()).
      shard_count: number of shards (jax.process_count()); shard i reads documents[i::count].
      num_epochs: passes over the shard; None repeats forever (training).
      shuffle: shuffle documents (per epoch) with `seed`; False keeps corpus order (eval).
      add_eos: append spec.eos_id to every document.
      drop_remainder: drop a final incomplete batch of a finite stream.
      engram: adds `hash_ids` when given.
      worker_count: grain worker processes (0 runs in this process). Workers read interleaved
        slices of the document stream, so the batch order depends on worker_count (a resume must
        use the same value); the main script needs an `if __name__ == "__main__"` guard.
      prefetch: batches prepared ahead: by a background thread (worker_count=0), or per worker
        process. 0 prepares each batch when it is asked for.
      shuffle_window: documents of a DocumentStream shuffled together (1: file order).
      memory_shards: groups the batch's rows are split into before deduplicating table rows (the
        step's data-parallel shards on this process); must divide batch_size.
      overencoding: adds `overencoding_ids` when given.

    Returns:
      A grain DatasetIterator; `get_state()` is a JSON-serialisable dict and `set_state(state)`
      resumes at exactly the next batch.

    Raises:
      ValueError: bad sizes or shard arguments; during iteration, token ids outside
        [0, spec.vocab_size).
    """
    return iter(
        make_dataset(
            documents,
            tokenizer,
            spec,
            seq_len=seq_len,
            batch_size=batch_size,
            seed=seed,
            shard_index=shard_index,
            shard_count=shard_count,
            num_epochs=num_epochs,
            shuffle=shuffle,
            add_eos=add_eos,
            drop_remainder=drop_remainder,
            engram=engram,
            worker_count=worker_count,
            prefetch=prefetch,
            shuffle_window=shuffle_window,
            memory_shards=memory_shards,
            overencoding=overencoding,
        )
    )
