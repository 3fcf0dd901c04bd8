"""The trainer's data: the job's one tokenizer (loaded, reused from the workdir or trained), the
token and Engram hashing specs, and each process's share of the train and eval batch streams
(logical data shards, so a resume on another process count continues the same batches).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from engram_jax import config as config_lib
from engram_jax import corpus as corpus_lib
from engram_jax import data as data_lib
from engram_jax import (
    storage,
)
from engram_jax.hashing import tokenizer_fingerprint
from engram_jax.overencoding_ids import OverEncodingIds
from engram_jax.training.processes import check_processes_agree, run_on_process_zero

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass
class DataSetup:
    """The host-side data pieces built from the config."""

    tokenizer: Any
    spec: data_lib.DataSpec
    engram: data_lib.EngramHashSpec | None
    corpus: corpus_lib.Corpus  # files and split; each process streams its own shard
    # Batch groups per process whose table rows are deduplicated apart (the data-parallel shards).
    memory_shards: int = 1

    @property
    def train_documents(self) -> list[str]:
        """The whole training split as a list (reads the corpus: for small corpora)."""
        return list(self.corpus.documents("train"))

    @property
    def eval_documents(self) -> list[str]:
        """The whole held-out split as a list (reads the corpus: for small corpora)."""
        return list(self.corpus.documents("eval"))

    def metadata(self) -> dict[str, Any]:
        """Fingerprints of everything that decides what a token id and a table row mean."""
        meta = {
            "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
            "compressed_tokenizer_fingerprint": "",
            "hasher": "",
        }
        if self.engram is not None:
            meta["compressed_tokenizer_fingerprint"] = self.engram.compressor.fingerprint()
            meta["hasher"] = self.engram.hasher.fingerprint()
        return meta


def token_specs(
    cfg: config_lib.Config, tokenizer: Any, cache_dir: str | None = None
) -> tuple[data_lib.DataSpec, data_lib.EngramHashSpec | None]:
    """The token ids' spec (pad, eos, byte lengths) and, with Engram on, the compressor and hasher
    the config describes (`cache_dir` caches the compressed-token table)."""
    spec = data_lib.make_data_spec(
        tokenizer,
        pad_id=cfg.model.pad_id,
        vocab_size=cfg.model.vocab_size,
        eos_token=cfg.train.eos_token,
    )
    e = cfg.model.engram
    if not e.enabled:
        return spec, None
    engram = data_lib.make_engram_hash_spec(
        tokenizer,
        spec,
        vocab_bases=e.table_rows_per_head,
        max_ngram=e.max_ngram,
        heads_per_ngram=e.heads_per_ngram,
        layer_ids=e.layer_ids,
        seed=e.hash_seed,
        cache_dir=cache_dir,
        compressed_vocab_size=e.compressed_vocab_size,
    )
    return spec, engram


def build_data(
    cfg: config_lib.Config,
    workdir: str,
    *,
    check_tokenizer: Callable[[Any], None] | None = None,
    checkpoint_tokenizer: str | None = None,
) -> DataSetup:
    """Lists the corpus (documents are read later, each process its own shard), the job's one
    tokenizer and the Engram hashing of the configured layers.

    Process 0 loads `tokenizer_path`, or reuses the BPE cached in the workdir for this corpus, or
    trains one; calls `check_tokenizer(tokenizer)` (the trainer's checkpoint-compatibility check,
    run before anything is written); then writes `<workdir>/tokenizer.json` (and the BPE cache).
    The other processes wait for it and load that file. Every process then checks that its
    tokenizer and hashing fingerprints equal process 0's (`ProcessMismatchError` names the one
    that differs).

    `checkpoint_tokenizer`, the tokenizer fingerprint of the checkpoint a run resumes, makes
    process 0 take `<workdir>/tokenizer.json` when it is that tokenizer (and no `tokenizer_path`
    is set): a resume never depends on training the same BPE again (another `tokenizers` version,
    sample or corpus listing could train another one).
    """
    corpus = corpus_lib.Corpus(
        cfg.train.data_path, cfg.train.eval_fraction, cfg.train.eval_data_path
    )
    workdir_tokenizer = storage.join(workdir, TOKENIZER_FILE)

    def process_zero() -> Any:
        tokenizer = cache_path = None
        if (
            checkpoint_tokenizer
            and not cfg.train.tokenizer_path
            and storage.exists(workdir_tokenizer)
        ):
            saved = data_lib.load_tokenizer(workdir_tokenizer)
            if tokenizer_fingerprint(saved) == checkpoint_tokenizer:
                logger.info("resuming with the checkpoint's tokenizer %s", workdir_tokenizer)
                tokenizer = saved
        if tokenizer is None:
            tokenizer, cache_path = load_or_train_tokenizer(cfg, workdir, corpus)
        if check_tokenizer is not None:
            check_tokenizer(tokenizer)
        text = tokenizer.to_str()
        if cache_path is not None:
            storage.write_text(cache_path, text)
            logger.info("saved the trained tokenizer to %s", cache_path)
        _write_workdir_tokenizer(workdir_tokenizer, tokenizer)
        return tokenizer

    tokenizer = run_on_process_zero(process_zero, "preparing the tokenizer")
    if jax.process_index() != 0:
        tokenizer = data_lib.load_tokenizer(workdir_tokenizer)
    # The compressed-token table is cached next to a local workdir; with a URL it is rebuilt.
    cache_dir = None if storage.is_url(workdir) else os.path.join(workdir, "tokenizer")
    spec, engram = token_specs(cfg, tokenizer, cache_dir=cache_dir)
    setup = DataSetup(tokenizer, spec, engram, corpus)
    check_processes_agree(setup.metadata())
    return setup


def _write_workdir_tokenizer(path: str, tokenizer: Any) -> None:
    """Writes `<workdir>/tokenizer.json`, what `engram_jax.generate` loads (the checkpoint's
    fingerprint guards it). Unchanged bytes are not rewritten; a different file already there is
    replaced with a warning naming both tokenizers."""
    text = tokenizer.to_str()
    if storage.exists(path):
        before = storage.read_text(path)
        if before == text:
            return
        try:
            was = tokenizer_fingerprint(data_lib.load_tokenizer(path))
        except Exception as e:  # an unreadable file is replaced all the same
            was = f"unreadable: {type(e).__name__}"
        logger.warning(
            "replacing %s (tokenizer %s) by the tokenizer this run uses (%s); the old file is "
            "not kept",
            path,
            was,
            tokenizer_fingerprint(tokenizer),
        )
    storage.write_text(path, text)


def _warn_if_small(tokenizer: Any, vocab_size: int, train_bytes: int) -> None:
    """A BPE trained on a small sample may stop short of `vocab_size`: the ids above it are
    never used (their embedding rows only cost memory). Says so, with what to change."""
    trained = tokenizer.get_vocab_size()
    if trained < vocab_size:
        logger.warning(
            "the trained BPE has %d tokens, fewer than vocab_size=%d: its sample "
            "(tokenizer_train_bytes=%d) holds too few distinct merges; ids %d..%d are never "
            "used (raise tokenizer_train_bytes or lower vocab_size)",
            trained,
            vocab_size,
            train_bytes,
            trained,
            vocab_size - 1,
        )


def load_or_train_tokenizer(
    cfg: config_lib.Config, workdir: str, corpus: corpus_lib.Corpus
) -> tuple[Any, str | None]:
    """The configured tokenizer, the BPE cached in the workdir for this corpus, or a new BPE
    trained on a bounded sample of it (`tokenizer_train_bytes`); with the cache path to write it
    to when it was trained now (nothing is written here)."""
    t = cfg.train
    if t.tokenizer_path:
        return data_lib.load_tokenizer(t.tokenizer_path), None
    # Named by the corpus fingerprint and the sample size, not by hashing every document.
    key = hashlib.sha256(
        f"{corpus.fingerprint}\n{t.eval_fraction}\n{t.tokenizer_train_bytes}\n"
        f"{cfg.model.vocab_size}".encode()
    ).hexdigest()[:20]
    cache_path = storage.join(workdir, "tokenizer", f"bpe-{key}", TOKENIZER_FILE)
    if storage.exists(cache_path):
        logger.info("reusing the tokenizer trained on this corpus: %s", cache_path)
        tokenizer, cache_path = data_lib.load_tokenizer(cache_path), None
    else:
        logger.info(
            "training a byte-level BPE (vocab_size=%d) on a sample of up to %d bytes",
            cfg.model.vocab_size,
            t.tokenizer_train_bytes,
        )
        sample = corpus.sample(t.tokenizer_train_bytes)
        tokenizer = data_lib.train_bpe_tokenizer(sample, cfg.model.vocab_size)
    _warn_if_small(tokenizer, cfg.model.vocab_size, t.tokenizer_train_bytes)
    return tokenizer, cache_path


def make_batches(
    setup: DataSetup, cfg: config_lib.Config, *, train: bool, data_shards: int | None = None
) -> ShardedBatches:
    """This process's share of the training stream (endless, shuffled) or the eval stream.

    The training stream is cut into `data_shards` logical shards (default: the process count),
    each a pipeline of `batch_size / data_shards` rows; a process reads its contiguous range of
    shards and concatenates their rows. A run keeps the shard count of its first start, so a
    resume on another process count (every count dividing it) continues the very same batches.
    """
    count, index = jax.process_count(), jax.process_index()
    shards = count if data_shards is None or not train else data_shards
    if shards % count or cfg.train.batch_size % shards:
        raise ValueError(
            f"data_shards: got {shards}; expected a multiple of the {count} processes that "
            f"divides batch_size={cfg.train.batch_size}"
        )
    mine = range(index * shards // count, (index + 1) * shards // count)
    t = cfg.train
    # The process's row groups of sparse table updates, split among its logical shards.
    memory_shards = max(1, setup.memory_shards // len(mine))
    return ShardedBatches(
        {
            shard: data_lib.make_pipeline(
                document_stream(setup, cfg, train=train, shard_index=shard, shard_count=shards),
                setup.tokenizer,
                setup.spec,
                seq_len=t.seq_len,
                batch_size=t.batch_size // shards,
                seed=t.seed,
                add_eos=setup.spec.eos_id is not None,
                engram=setup.engram,
                worker_count=t.data_workers if train else 0,
                prefetch=t.data_prefetch,
                shuffle_window=t.shuffle_window,
                memory_shards=memory_shards,
                overencoding=OverEncodingIds.from_model_config(cfg.model),
            )
            for shard in mine
        }
    )


def document_stream(
    setup: DataSetup,
    cfg: config_lib.Config,
    *,
    train: bool,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> corpus_lib.DocumentStream:
    """The documents of one data shard (default: this process's) of the train or eval split."""
    return setup.corpus.stream(
        "train" if train else "eval",
        shard_index=jax.process_index() if shard_index is None else shard_index,
        shard_count=jax.process_count() if shard_count is None else shard_count,
        seed=cfg.train.seed,
        shuffle=train,
        num_epochs=num_epochs,
    )


class ShardedBatches:
    """The batches of several logical data shards, rows concatenated in shard order.

    `get_state()` is `{"shards": {"<shard>": grain iterator state}}`; `set_state` takes the
    states of (at least) this process's shards, whichever processes saved them.
    """

    def __init__(self, iterators: dict[int, Any]):
        self._iterators = iterators

    def __iter__(self) -> ShardedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(iterator) for iterator in self._iterators.values()]
        if len(parts) == 1:
            return parts[0]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def get_state(self) -> dict[str, Any]:
        return {"shards": {str(k): it.get_state() for k, it in self._iterators.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state["shards"]
        missing = [k for k in self._iterators if str(k) not in saved]
        if missing:
            raise ValueError(
                f"data state: no saved state for shards {missing} (saved {sorted(saved)})"
            )
        for shard, iterator in self._iterators.items():
            iterator.set_state(saved[str(shard)])
