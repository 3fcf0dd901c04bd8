"""`python -m engram_jax.generate --workdir=DIR --prompt=TEXT`: continue a prompt from a checkpoint.

Decoding runs one token at a time with the KV cache (attention keys/values, MLA latents and the
Engram convolution state); the host hashes each new token from the last `max_ngram` tokens, exactly
as the training pipeline hashes whole sequences.

`--table_placement` chooses where the Engram tables live: `device` (restored into accelerator
memory, looked up inside the step), `host` (numpy in host RAM) or `disk` (a flat row file beside
the checkpoints, `tables/row_files.py`, read through an LRU row cache of `--row_cache_mib`). With
`host` and `disk` the host gathers each step's rows and the model runs on the pre-gathered rows.

`--table_dtype=fp8` (config `model.engram.inference_table_dtype`) serves the tables as packed FP8
rows (`tables/fp8.py`: 264 bytes per 256 values instead of 1024), converted from the checkpoint in
row blocks in every placement: `device` keeps the packed rows as device arrays and dequantizes
the gathered rows inside the step; `host` holds packed rows in RAM and `disk` a row file of
packed rows (`<name>.fp8.rows`), both dequantizing the gathered rows on the host. A checkpoint
whose tables are already packed (`engram_jax.convert`) is served as FP8 in any case.

Prefetch (`DecodeStep`, host and disk placements). Row addresses depend only on the tokens, so the
rows of token t can be read as soon as t is sampled, before the model has seen it. Each step is
split at the first Engram layer `s` into two jitted programs:

    host:    hash t -> submit rows (all Engram layers) ------ reading rows ------> wait -> dispatch
    device:  prefix (embed + layers [0, s)) dispatched --- running ---          suffix ([s, L))

1. the host hashes token t and submits the reads of every Engram layer's rows at once
   (`RowGatherer.submit`; `disk`: worker threads start reading, file reads release the GIL);
2. it dispatches the prefix without waiting for it (JAX dispatch is asynchronous);
3. it waits for the rows (the only wait: `DecodeStep.wait_seconds`; `host`: the numpy gather
   runs here, on this thread, while the device runs the prefix), transfers them with the
   suffix's arguments and dispatches the suffix, which starts at the first Engram layer and holds
   the later Engram layers too.

So the row reads overlap the prefix's layers. With the first Engram layer at 0 only the embedding
would, so such a model runs one program on the collected rows instead. The split is the default
where it can pay: on an accelerator (the device runs the prefix while the host gathers), and for
row files on any backend (reads wait on I/O in worker threads). With host rows on the CPU backend
there is nothing to overlap: the prefix and the numpy gather share the same cores (XLA:CPU even
runs programs as small as a batch-1 decode step on the dispatching thread), and the second program
launch costs more than the microseconds of the gather, so that case submits, gathers and runs one
program on the rows (`DecodeStep(split=)` overrides; BENCHMARKS.md, offload section, measures both).

Sampling token t+1 needs the suffix's logits, so nothing of step t+1 can start before step t ends:
the overlap is within a step, never across steps. The split is exact: prefix then suffix gives the
unsplit step's logits and cache bit for bit, and the `device` placement keeps the single unsplit
step (its lookup is inside the program).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import checkpoint as checkpoint_lib
from engram_jax import config as config_lib
from engram_jax import data as data_lib
from engram_jax import optim, storage
from engram_jax import train as train_lib
from engram_jax.engram import head_offsets
from engram_jax.hashing import tokenizer_fingerprint
from engram_jax.model import MOE_BIAS, Transformer, engram_table_sizes, first_engram_layer
from engram_jax.tables import fp8, memory_item, row_files

PLACEMENTS = ("device", "host", "disk")
TABLE_DTYPES = ("stored", "fp8")  # `--table_dtype`: as saved, or packed FP8 rows
ROW_DIR = "table_rows"  # <workdir>/table_rows/<step>/: flat row files of the disk placement

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            problems.append(f"max_tokens: got {self.max_tokens}; expected an integer >= 0")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            problems.append(
                f"temperature: got {self.temperature}; expected a finite number >= 0 (0 is greedy)"
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k: got {self.top_k}; expected an integer >= 0 (0 keeps all)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p: got {self.top_p}; expected a value in (0, 1]")
        if problems:
            raise ValueError("sampling: " + "; ".join(problems))


def mask_beyond_vocab(logits_BV: jax.Array, num_tokens: int) -> jax.Array:
    """Sets the logits of ids >= `num_tokens` to -inf: the model's vocabulary may be larger than
    the tokenizer's (a BPE trained on a small corpus comes out short), and such ids have no text
    and no compressed id to hash."""
    ids_V = jnp.arange(logits_BV.shape[-1])
    return jnp.where(ids_V[None, :] < num_tokens, logits_BV, -jnp.inf)  # [B, V]


def sample_logits(
    logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float
) -> jax.Array:
    """Draws one token per row: greedy, or softmax sampling after temperature, top-k and top-p.

    Args:
      logits_BV: `[B, V]` float logits.
      rng: PRNG key.
      temperature: 0 selects the argmax; otherwise logits are divided by it. A Python number,
        finite and >= 0 (NaN and inf raise ValueError, as in `SamplingConfig`).
      top_k: keep only the k largest logits (0 keeps all).
      top_p: keep the smallest set of tokens whose probability reaches top_p (1.0 keeps all).

    Returns:
      `[B]` int32 token ids.
    """
    if not (0 <= temperature < math.inf) or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"sampling: temperature={temperature} (finite, >= 0), top_k={top_k} (>= 0), "
            f"top_p={top_p} (in (0, 1]) expected"
        )
    if top_k > logits_BV.shape[-1]:
        raise ValueError(
            f"top_k: got {top_k}; expected at most the vocabulary size {logits_BV.shape[-1]} "
            "(0 keeps all)"
        )
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]  # [B, 1]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Mass of the tokens strictly more likely than each one; keep while it is below top_p.
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        cutoff_B1 = jnp.min(
            jnp.where(mass_before_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True
        )
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


class DecodeStep:
    """One decode step of `Transformer(decode=True)` wherever the tables live:
    `step(variables, cache, tokens [B, T], positions [B, T], hash_ids [B, L_e, T, M] | None)
    -> (logits [B, V] of the last position, masked beyond the tokenizer, cache)`.

    Without `rows` (device tables, or no Engram) it is one jitted step that looks rows up itself;
    with `packed_tables` (device FP8 tables, one `[R, W + W/32]` uint8 array per Engram layer) the
    step gathers and dequantizes their rows itself, then runs the model on them.
    With a `rows` gatherer (host or disk tables) it is the prefetching split step of the module
    docstring: submit the rows, dispatch the prefix, wait for the rows, dispatch the suffix; or,
    unsplit (`split=False`, or the first Engram layer at 0), submit, wait, one program on the rows.
    `split=None` splits where the overlap can pay (module docstring): on an accelerator backend, or
    when the gatherer reads in worker threads (row files).
    `offsets [L_e, M]` turn per-head hash ids into the flat row ids of each layer's table.
    `wait_seconds` adds up the time spent collecting rows (split: after the prefix was dispatched,
    the step's blocking share; for host tables, read on this thread, the gather itself).
    The cache argument is donated.
    """

    def __init__(
        self,
        model_config: config_lib.ModelConfig,
        num_tokens: int,
        rows: row_files.RowGatherer | None = None,
        offsets: np.ndarray | None = None,
        split: bool | None = None,
        packed_tables: tuple[jax.Array, ...] | None = None,
    ):
        self.decoder = Transformer(model_config, decode=True)
        self.num_tokens = num_tokens
        self.rows = rows
        self.offsets = offsets
        self.packed_tables = packed_tables
        self.wait_seconds = 0.0
        self._cache_shapes: dict[int, Any] = {}  # decode cache shapes per length
        self.split_layer = first_engram_layer(model_config)
        if rows is not None and (self.split_layer is None or offsets is None):
            raise ValueError(
                "DecodeStep: rows given for a model without Engram layers or without offsets "
                "[L_e, M]; expected both (or rows=None for device tables)"
            )
        if rows is not None and split is None:
            split = rows.threaded or jax.default_backend() != "cpu"
        self.split = bool(rows is not None and split and self.split_layer > 0)
        self.full = jax.jit(self._apply, donate_argnums=1)
        if packed_tables is not None:
            self.full_packed = jax.jit(self._apply_packed, donate_argnums=2)
        if self.split:
            num_layers = model_config.num_layers
            self.prefix = jax.jit(
                functools.partial(self._apply, layer_range=(0, self.split_layer)),
                donate_argnums=1,
            )
            self.suffix = jax.jit(
                functools.partial(self._apply, layer_range=(self.split_layer, num_layers)),
                donate_argnums=1,
            )

    def _apply(
        self, variables, cache, tokens_BT, positions_BT, hash_ids, rows, hidden_BTGD=None, *,
        layer_range=None,
    ):  # fmt: skip
        (out, _), updated = self.decoder.apply(
            {**variables, "cache": cache},
            tokens_BT,
            positions_BT,
            None,
            hash_ids,
            rows,
            mutable=["cache"],
            hidden_BTGD=hidden_BTGD,
            layer_range=layer_range,
        )
        if layer_range is not None and layer_range[1] < self.decoder.config.num_layers:
            return out, updated["cache"]  # out: hidden streams [B, T, G, D]
        return mask_beyond_vocab(out[:, -1], self.num_tokens), updated["cache"]

    def _apply_packed(self, variables, tables, cache, tokens_BT, positions_BT, flat_ids):
        """The step on device FP8 tables: each layer's packed rows gathered at `flat_ids [B, L_e,
        T, M]` and dequantized, then the model on the rows (as the host and disk placements)."""
        rows = jnp.stack(
            [fp8.decode_jax(jnp.take(t, flat_ids[:, i], axis=0)) for i, t in enumerate(tables)],
            axis=1,
        )  # [B, L_e, T, M, W]
        return self._apply(variables, cache, tokens_BT, positions_BT, None, rows)

    def cache_bytes(self, total: int) -> int:
        """Bytes of the decode cache for `total` positions, by arithmetic from the traced shapes
        at 1 and 2 positions (the cache grows linearly; tracing at `total` itself could be as
        large as the cache)."""
        sizes = [
            sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(self._shapes(n))) for n in (1, 2)
        ]
        return sizes[0] + (total - 1) * (sizes[1] - sizes[0])

    def empty_cache(self, total: int) -> Any:
        """A zero decode cache for `total` positions of one sequence."""
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._shapes(total))

    def _shapes(self, total: int) -> Any:
        """The decode cache's shapes for `total` positions, traced once per length (tracing the
        model's init costs about as much as decoding dozens of tokens), with the inputs this step
        gives the model: pre-gathered rows, or hash ids."""
        if total not in self._cache_shapes:
            e = self.decoder.config.engram
            hash_ids = rows = None
            if self.rows is not None or self.packed_tables is not None:
                dtype = self.rows.cache.row_dtype if self.rows is not None else jnp.float32
                rows = jax.ShapeDtypeStruct(
                    (1, len(e.layer_ids), total, e.num_heads, e.row_width), dtype
                )  # [B, L_e, T, M, W]
            elif e.enabled:
                hash_ids = jax.ShapeDtypeStruct(
                    (1, len(e.layer_ids), total, e.num_heads), jnp.int32
                )  # [B, L_e, T, M]
            self._cache_shapes[total] = jax.eval_shape(
                self.decoder.init,
                jax.random.PRNGKey(0),
                jax.ShapeDtypeStruct((1, total), jnp.int32),
                None,
                None,
                hash_ids,
                rows,
            )["cache"]
        return self._cache_shapes[total]

    def flat_ids(self, hash_ids: np.ndarray) -> np.ndarray:
        """`[B, L_e, T, M]` flat row ids of each layer's table (per-head ids + head offsets)."""
        return hash_ids.astype(np.int64) + self.offsets[None, :, None, :]  # [B, L_e, T, M]

    def __call__(self, variables, cache, tokens_BT, positions_BT, hash_ids):
        if self.packed_tables is not None:
            flat_ids = self.flat_ids(hash_ids).astype(np.int32)  # [B, L_e, T, M]
            return self.full_packed(
                variables, self.packed_tables, cache, tokens_BT, positions_BT, flat_ids
            )
        if self.rows is None:
            return self.full(variables, cache, tokens_BT, positions_BT, hash_ids, None)
        rows_future = self.rows.submit(self.flat_ids(hash_ids))  # 1. reads start now
        if not self.split:
            # One program on the rows: nothing but the embedding precedes the first Engram layer,
            # or the CPU backend with host rows (nothing to overlap).
            start = time.perf_counter()
            rows = rows_future.result()  # [B, L_e, T, M, W]
            self.wait_seconds += time.perf_counter() - start
            return self.full(variables, cache, tokens_BT, positions_BT, None, rows)
        hidden_BTGD, cache = self.prefix(variables, cache, tokens_BT, positions_BT, None, None)
        start = time.perf_counter()  # 2. the prefix is dispatched, not awaited
        rows = rows_future.result()  # 3. [B, L_e, T, M, W], needed from the first Engram layer
        self.wait_seconds += time.perf_counter() - start
        return self.suffix(variables, cache, tokens_BT, positions_BT, None, rows, hidden_BTGD)


class Generator:
    """A trained model loaded from a workdir, ready to continue prompts.

    Args:
      workdir: the training workdir (checkpoints/, tokenizer.json).
      step: checkpoint step; None = latest.
      table_placement: "device", "host" or "disk" (see the module docstring).
      row_cache_mib: row cache size of the "disk" placement, in MiB (0 disables the cache).
      table_dtype: "stored" or "fp8" (module docstring); None = the checkpoint config's
        `model.engram.inference_table_dtype`.
      ffn_granularity: MatFormer models: the granularity index of every layer (one index, or one
        per layer: Mix'n'Match), sliced from the trained weights; None keeps the config's
        `matformer.inference_granularity` (default: the full width).
    """

    def __init__(
        self,
        workdir: str,
        step: int | None = None,
        table_placement: str = "device",
        row_cache_mib: float = 256.0,
        table_dtype: str | None = None,
        ffn_granularity: tuple[int, ...] | None = None,
    ):
        if table_placement not in PLACEMENTS:
            raise ValueError(
                f"table_placement: got {table_placement!r}; expected one of {PLACEMENTS}"
            )
        if table_dtype is not None and table_dtype not in TABLE_DTYPES:
            raise ValueError(f"table_dtype: got {table_dtype!r}; expected one of {TABLE_DTYPES}")
        if not row_cache_mib >= 0:
            raise ValueError(f"row_cache_mib: got {row_cache_mib}; expected >= 0")
        self.table_placement = table_placement
        self.rows: row_files.RowGatherer | None = None
        self.packed_tables: tuple[jax.Array, ...] | None = None  # device FP8 tables
        self._offsets: np.ndarray | None = None  # [L_e, M] head offsets, all but device float
        store = checkpoint_lib.CheckpointStore(
            storage.join(workdir, "checkpoints"), create=False, cleanup_partial=False
        )
        metadata = store.read_metadata(step)
        self.config = config_lib.from_saved(metadata["config"])
        if ffn_granularity is not None:
            self.config.model.matformer.inference_granularity = tuple(ffn_granularity)
        cfg = config_lib.validate(self.config)
        self.model_config = cfg.model
        self._load_tokenizer(workdir, cfg, metadata)

        model = Transformer(cfg.model)
        txs = train_lib.make_optimizers(cfg)[:2]
        abstract = jax.eval_shape(
            lambda rng: nn.meta.unbox(train_lib.init_train_state(model, cfg, txs, rng)),
            jax.random.PRNGKey(0),
        )
        abstract_dense, abstract_memory = train_lib.checkpoint_items(abstract)
        saved_step = metadata[checkpoint_lib.RESERVED_META_KEY]["step"]
        memory_dir = store.directory / str(saved_step) / "memory"
        self.table_encoding = self._table_encoding(memory_dir, table_dtype)
        # Tables this class reads itself in row blocks (not restored into the model's params).
        offloaded = self.engram is not None and (
            table_placement != "device" or self.table_encoding == "fp8"
        )
        # Inference needs the tables, not their optimizer state (2x the tables under Adam).
        tables_only = (memory_dir / memory_item.INDEX_FILE).exists()
        restored = store.restore(
            step,
            abstract_state=abstract_dense,
            abstract_memory=abstract_memory,
            items=("state",) if offloaded or tables_only else ("state", "memory"),
        )
        memory = restored.get("memory") or {}
        memory = memory["tables"] if memory else {}
        abstract_tables = abstract_memory["tables"]  # Engram, OverEncoding or PLE tables
        if offloaded:
            self._open_tables(workdir, memory_dir, metadata, row_cache_mib)
            # The Engram tables are read in row blocks; OverEncoding's and PLE's are parameters.
            abstract_tables, _ = optim.partition_params(abstract_tables, r"(^|/)engram/table$")
        if tables_only and abstract_tables:
            memory = memory_item.restore_memory(
                memory_dir, {"tables": abstract_tables}, partial=True
            )["tables"]
        store.close()
        self.variables = {"params": optim.merge_params(restored["state"]["params"], memory)}
        if restored["state"]["moe_bias"]:
            self.variables[MOE_BIAS] = restored["state"]["moe_bias"]
        self.decoder = Transformer(cfg.model, decode=True)
        self.num_tokens = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.context_length = cfg.train.seq_len
        self.step = DecodeStep(
            cfg.model,
            self.num_tokens,
            self.rows,
            self._offsets,
            packed_tables=self.packed_tables,
        )

    def _load_tokenizer(self, workdir: str, cfg: config_lib.Config, metadata: dict) -> None:
        """The run's tokenizer and token specs, checked against the checkpoint's fingerprints."""
        path = storage.join(workdir, train_lib.TOKENIZER_FILE)
        self.tokenizer = data_lib.load_tokenizer(path)
        self._encode = data_lib.make_encoder(self.tokenizer)
        digest = tokenizer_fingerprint(self.tokenizer)
        if digest != metadata["tokenizer_fingerprint"]:
            raise checkpoint_lib.CheckpointMismatchError(
                f"{path}: tokenizer fingerprint {digest[:12]}... differs from the checkpoint's "
                f"{metadata['tokenizer_fingerprint'][:12]}...; the checkpoint was trained with "
                "another tokenizer"
            )
        self.spec, self.engram = train_lib.token_specs(cfg, self.tokenizer)
        if self.engram is not None and self.engram.hasher.fingerprint() != metadata["hasher"]:
            raise checkpoint_lib.CheckpointMismatchError(
                "Engram hasher fingerprint differs from the checkpoint's: the hash layout "
                "(seed, orders, heads, layers, primes, compressed vocabulary) changed"
            )

    def _table_encoding(self, memory_dir, table_dtype: str | None) -> str:
        """ "fp8" (packed FP8 rows) or "float": the requested dtype, the config's, or packed rows
        already in the checkpoint."""
        e = self.model_config.engram
        requested = table_dtype or e.inference_table_dtype
        if self.engram is None:
            return "float"
        if requested == "fp8":
            fp8.check_width(e.row_width, "table_dtype=fp8")
            return "fp8"
        path = (f"layer_{e.layer_ids[0]}", "engram", "table")
        return row_files.stored_encoding(row_files.open_checkpoint_table(memory_dir, path))

    def _open_tables(self, workdir: str, memory_dir, metadata: dict, row_cache_mib: float) -> None:
        """Every Engram layer's table, in `layer_ids` order, read in row blocks: packed device
        tables (`device`, FP8), or row readers behind one cache (`host`, `disk`)."""
        e = self.model_config.engram
        sizes = engram_table_sizes(self.model_config)
        # [L_e, M] row offset of each head in its layer's flat table.
        self._offsets = np.stack([head_offsets(sizes[layer]) for layer in e.layer_ids])
        step = metadata[checkpoint_lib.RESERVED_META_KEY]["step"]
        suffix = ".fp8" if self.table_encoding == "fp8" else ""
        sources, packed = [], []
        for layer in e.layer_ids:
            path = (f"layer_{layer}", "engram", "table")
            rows_dir = os.path.join(workdir, ROW_DIR, str(step))
            if (
                self.table_placement == "disk"
                and not (memory_dir / memory_item.INDEX_FILE).exists()
            ):
                # A checkpoint without its tables (e.g. a converted release whose `memory` item was
                # deleted to halve the disk it takes): the row files are served as they are,
                # their checksums still verified; there is no table to compare fingerprints with.
                sources.append(
                    row_files.RowFile(
                        row_files.row_file_paths(rows_dir, f"layer_{layer}{suffix}")[0]
                    )
                )
                continue
            array = row_files.open_checkpoint_table(memory_dir, path)
            if self.table_placement == "device":
                # One layer's packed rows on the host at a time, then on the device.
                packed.append(jnp.asarray(row_files.load_host_table(array, encoding="fp8")))
            elif self.table_placement == "host":
                table = row_files.load_host_table(array, encoding=self.table_encoding)
                sources.append(row_files.HostRows(table))
            else:
                rows_path = row_files.write_row_file(
                    array,
                    rows_dir,
                    f"layer_{layer}{suffix}",
                    step=step,
                    source=row_files.memory_array_name(path),
                    fingerprint=row_files.table_fingerprint(
                        array, json.dumps(metadata, sort_keys=True, default=str)
                    ),
                    encoding=self.table_encoding,
                )
                sources.append(row_files.RowFile(rows_path))
        if self.table_placement == "device":
            self.packed_tables = tuple(packed)
            return
        # Host tables are already in RAM: a cache would only copy rows.
        capacity = int(row_cache_mib * 2**20) if self.table_placement == "disk" else 0
        # Host rows are read on the decoding thread after the prefix is dispatched (a thread hop
        # costs more than the read); row files are read by worker threads from submit on.
        self.rows = row_files.RowGatherer(
            row_files.RowCache(sources, capacity), threads=self.table_placement == "disk"
        )

    def _hash_ids(self, history: np.ndarray, count: int) -> np.ndarray | None:
        """Hash ids `[1, L_e, count, M]` of the last `count` tokens of `history` ([1, n])."""
        if self.engram is None:
            return None
        window = self.model_config.engram.max_ngram - 1 + count
        recent = history[:, -window:]
        segments = np.ones_like(recent)
        ids = data_lib.compute_hash_ids(recent, segments, self.engram)  # [1, L_e, w, M]
        return ids[:, :, -count:]

    def close(self) -> None:
        """Releases the host and disk placements' row readers (worker threads, open row files);
        the generator cannot generate afterwards. Also `with Generator(...) as generator:`."""
        if self.rows is not None:
            self.rows.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuses a decode cache that cannot fit; warns past the trained context."""
        from engram_jax import memory_estimate

        total = prompt_tokens + max_tokens
        needed = self.step.cache_bytes(total)
        available, source = memory_estimate.available_bytes()
        if available is not None and needed > available:
            gib = memory_estimate.GIB
            raise ValueError(
                f"max_tokens: got {max_tokens}; the prompt's {prompt_tokens} tokens plus "
                f"{max_tokens} need a decode cache of {needed / gib:,.2f} GiB but "
                f"{available / gib:,.2f} GiB are available ({source}); lower max_tokens "
                f"(the model was trained on seq_len={self.context_length} positions)"
            )
        if total > self.context_length:
            logger.warning(
                "max_tokens: the prompt's %d tokens plus %d reach position %d, past the trained "
                "context seq_len=%d; positions past it were never trained and the continuation "
                "there may degrade",
                prompt_tokens,
                max_tokens,
                total,
                self.context_length,
            )

    def generate(self, prompt: str, sampling: SamplingConfig) -> str:
        """Continues `prompt` by up to `sampling.max_tokens` tokens (stopping at eos)."""
        prompt_ids = self._encode(prompt).astype(np.int32)  # [P]
        return self.tokenizer.decode(self.generate_ids(prompt_ids, sampling))

    def generate_ids(self, prompt_ids: np.ndarray, sampling: SamplingConfig) -> list[int]:
        """The token ids that continue `prompt_ids` (`[P]` raw ids), eos excluded."""
        prompt_ids = np.asarray(prompt_ids, np.int32)[None, :]  # [1, P]
        if prompt_ids.shape[1] == 0:
            raise ValueError("prompt: got an empty prompt; expected at least one token")
        data_lib.check_token_ids(prompt_ids, self.num_tokens, where="prompt")
        if sampling.top_k > self.num_tokens:
            raise ValueError(
                f"top_k: got {sampling.top_k}; expected at most the tokenizer's "
                f"{self.num_tokens} tokens (0 keeps all)"
            )
        if prompt_ids.shape[1] > self.context_length:
            # Positions past the trained context were never seen in training; the most recent
            # tokens are the ones that condition the continuation.
            logger.warning(
                "prompt: %d tokens, longer than the trained context seq_len=%d; keeping its "
                "last %d tokens",
                prompt_ids.shape[1],
                self.context_length,
                self.context_length,
            )
            prompt_ids = prompt_ids[:, -self.context_length :]
        total = prompt_ids.shape[1] + sampling.max_tokens
        self._check_length(prompt_ids.shape[1], sampling.max_tokens)
        cache = self.step.empty_cache(total)
        rng = jax.random.PRNGKey(sampling.seed)

        history = prompt_ids
        positions = np.arange(prompt_ids.shape[1], dtype=np.int32)[None, :]
        logits, cache = self.step(
            self.variables, cache, prompt_ids, positions, self._hash_ids(history, history.shape[1])
        )
        new_tokens = []
        for index in range(sampling.max_tokens):
            rng, key = jax.random.split(rng)
            token = int(
                sample_logits(logits, key, sampling.temperature, sampling.top_k, sampling.top_p)[0]
            )
            if token == self.spec.eos_id:
                break
            new_tokens.append(token)
            history = np.concatenate([history, [[token]]], axis=1).astype(np.int32)
            if index + 1 == sampling.max_tokens:
                break
            position = np.asarray([[history.shape[1] - 1]], np.int32)
            logits, cache = self.step(
                self.variables, cache, history[:, -1:], position, self._hash_ids(history, 1)
            )
        return new_tokens


def main(argv: list[str]) -> None:
    from absl import app, flags

    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    f = flags.FLAGS
    # Before loading the model: a typo should not cost a checkpoint restore.
    if f.max_tokens < 0:
        raise app.UsageError(
            f"--max_tokens: got {f.max_tokens}; expected a positive number of tokens (0: the "
            "config's generate_max_tokens)"
        )
    if f.top_k < 0:
        raise app.UsageError(f"--top_k: got {f.top_k}; expected >= 0 (0 keeps all)")
    granularity = None
    if f.ffn_granularity:
        try:
            granularity = tuple(int(i) for i in f.ffn_granularity.split(","))
        except ValueError:
            raise app.UsageError(
                f"--ffn_granularity: got {f.ffn_granularity!r}; expected one index or one per "
                "layer, comma-separated (e.g. 0 or 0,1,1,2)"
            ) from None
    # The sampling settings too (NaN or inf temperature, top_p outside (0, 1]).
    SamplingConfig(f.max_tokens, f.temperature, f.top_k, f.top_p, f.seed)
    with Generator(
        f.workdir,
        step=f.step,
        table_placement=f.table_placement,
        row_cache_mib=f.row_cache_mib,
        table_dtype=f.table_dtype or None,
        ffn_granularity=granularity,
    ) as generator:
        if f.top_k > generator.num_tokens:
            raise app.UsageError(
                f"--top_k: got {f.top_k}; expected 0 (keep all) to the tokenizer's "
                f"{generator.num_tokens} tokens"
            )
        sampling = SamplingConfig(
            max_tokens=f.max_tokens or generator.config.generate_max_tokens,
            temperature=f.temperature,
            top_k=f.top_k,
            top_p=f.top_p,
            seed=f.seed,
        )
        print(f.prompt + generator.generate(f.prompt, sampling))


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Training workdir (checkpoints/, tokenizer.json).")
    flags.DEFINE_string(
        "prompt",
        None,
        "Text to continue. A prompt longer than the trained context (the config's seq_len) "
        "keeps its last seq_len tokens, with a warning.",
    )
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_integer(
        "max_tokens", 0, "Tokens to sample, >= 0 (0: the config's generate_max_tokens)."
    )
    flags.DEFINE_float("temperature", 0.0, "0 is greedy decoding.")
    flags.DEFINE_integer(
        "top_k", 0, "Keep the k most likely tokens, at most the tokenizer's size (0: all)."
    )
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0: off).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_enum(
        "table_placement",
        "device",
        list(PLACEMENTS),
        "Engram tables in accelerator memory (device), host RAM (host) or a row file read "
        "through a row cache (disk).",
    )
    flags.DEFINE_float("row_cache_mib", 256.0, "Row cache of the disk placement, in MiB.")
    flags.DEFINE_enum(
        "table_dtype",
        "",
        ["", *TABLE_DTYPES],
        "Engram table rows at inference: 'stored' (as saved) or 'fp8' (packed FP8 rows, 264 "
        "bytes per 256 values, dequantized after the gather); '' = the checkpoint config's "
        "model.engram.inference_table_dtype.",
    )
    flags.DEFINE_string(
        "ffn_granularity",
        "",
        "MatFormer models: granularity index of every layer (one index, or one per layer, "
        "comma-separated); '' keeps the config's matformer.inference_granularity.",
    )
    flags.mark_flags_as_required(["workdir", "prompt"])


if __name__ == "__main__":
    from engram_jax import cli

    _define_flags()
    cli.run(main)
