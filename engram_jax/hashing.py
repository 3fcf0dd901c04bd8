"""Host-side Engram front end: tokenizer compression (docs/design.md §1.2) and multi-head N-gram
hashing (§1.3).

Runs on the host inside the input pipeline; imports numpy, `tokenizers` and the standard library;
the hashing kernel is compiled with numba (imported on first use) and falls back to a pure numpy
implementation when numba is not importable. Both give bit-identical ids.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers

# The prime search lives beside the hasher; callers have always imported it from here.
from engram_jax.hash_primes import table_primes

__all__ = [
    "CompressedTokenizer",
    "NgramHasher",
    "canonicalise",
    "canonicaliser",
    "table_primes",
]

_log = logging.getLogger(__name__)

_TABLE_VERSION = "engram_jax.compressed_tokenizer.v1"
_HASHER_VERSION = "engram_jax.ngram_hasher.v1"
_SENTINEL = (
    "\ue000"  # §1.2 steps 6-8: a lone space survives Strip as U+E000, then becomes " " again.
)
_INT_KINDS = "iu"


# --------------------------------------------------------------------------------------------------
# Tokenizer compression (§1.2)
# --------------------------------------------------------------------------------------------------


def canonicaliser() -> normalizers.Normalizer:
    """The §1.2 canonicalisation chain built from the `tokenizers` normalizers the demo uses.

    Built from the library's own objects (not Python's `unicodedata`/`str.lower`) because
    per-character Unicode lowercasing differs from Python's on e.g. the Greek final sigma
    ("ΟΔΟΣ" -> "οδοσ", not "οδος").
    """
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


_CANONICALISER = canonicaliser()


def canonicalise(text: str) -> str:
    """Applies the §1.2 chain to one token's text: `" Café"` -> `"cafe"`, `"\\n\\n"` -> `" "`."""
    return _CANONICALISER.normalize_str(text)


def _tokenizer_from(tokenizer: Tokenizer | str | os.PathLike) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.fspath(tokenizer)
        if not os.path.isfile(path):
            raise ValueError(
                f"tokenizer: got path {path!r}; expected an existing tokenizer.json file"
            )
        return Tokenizer.from_file(path)
    raise TypeError(
        f"tokenizer: got {type(tokenizer).__name__}; expected a tokenizers.Tokenizer or a "
        "path to a tokenizer.json"
    )


def _build_table(tokenizer: Tokenizer) -> np.ndarray:
    """The §1.2 lookup table, int32 [V]; batched decode, then the normalizer per token string."""
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    # Each id is decoded on its own (per-token semantics); decode_batch only batches the Rust calls.
    texts = tokenizer.decode_batch([[tid] for tid in range(vocab_size)], skip_special_tokens=False)
    normalize = _CANONICALISER.normalize_str
    key_to_new: dict[
        str, int
    ] = {}  # one dictionary for raw and normalised keys (§1.2: they may merge)
    old_to_new = np.empty(vocab_size, dtype=np.int32)
    for tid, text in enumerate(texts):
        if "\ufffd" in text:  # undecodable byte fragment: keep the raw token string as key
            raw = tokenizer.id_to_token(tid)
            key = raw if raw is not None else text
        else:
            norm = normalize(text)
            key = norm if norm != "" else text
        new = key_to_new.get(key)
        if new is None:
            new = key_to_new[key] = len(key_to_new)
        old_to_new[tid] = new
    return old_to_new


def _table_is_valid(table: np.ndarray, vocab_size: int) -> bool:
    """A cached table must be a dense first-appearance interning of the right length."""
    if table.ndim != 1 or table.shape[0] != vocab_size or table.dtype != np.int32:
        return False
    if vocab_size == 0:
        return True
    # First appearances must be 0, 1, 2, ... in order (dense interning); this rejects most
    # corruptions.
    running_max = np.maximum.accumulate(table)
    firsts = np.concatenate([[True], running_max[1:] > running_max[:-1]])
    if table[0] != 0 or np.any(running_max[1:] - running_max[:-1] > 1):
        return False
    return bool(np.all(table[firsts] == np.arange(int(firsts.sum()))))


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's full JSON (vocabulary, merges, normalizer, special tokens)."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


class CompressedTokenizer:
    """Surjective map from raw token ids to compressed ids (docs/design.md §1.2).

    Build with `CompressedTokenizer.from_tokenizer(tokenizer_or_path, cache_dir=None)`. With a
    `cache_dir` the table is stored as `<cache_dir>/compressed_<sha256 of tokenizer.to_str()>.npy`
    (written atomically); a cache file that fails to load or to validate is rebuilt, never trusted.

    Decoding uses `tokenizers`' own `decode` of a single id with `skip_special_tokens=False`; this
    matches the demo when the Hugging Face tokenizer config has
    `clean_up_tokenization_spaces=False` (as DeepSeek-V3's has).

    Attributes:
        old_to_new: int32 [V] table, raw id -> compressed id.
        vocab_size: V, `get_vocab_size(with_added_tokens=True)`.
        compressed_vocab_size: V', the number of distinct keys.
        compression_ratio: `1 - V'/V`, the fraction of the vocabulary removed (the paper reports
            ~0.23).
        tokenizer_sha256: sha256 hex of `tokenizer.to_str()`.
    """

    def __init__(self, old_to_new: np.ndarray, *, tokenizer_sha256: str = ""):
        """Wraps an existing table (int array [V]); use `from_tokenizer` to build one."""
        table = np.asarray(old_to_new)
        if table.ndim != 1 or table.dtype.kind not in _INT_KINDS:
            raise ValueError(
                f"old_to_new: got dtype {table.dtype} shape {table.shape}; "
                "expected a 1-D integer array"
            )
        self.old_to_new = np.ascontiguousarray(table, dtype=np.int32)
        self.old_to_new.setflags(write=False)
        self.vocab_size = int(table.shape[0])
        self.compressed_vocab_size = int(table.max()) + 1 if table.size else 0
        self.tokenizer_sha256 = tokenizer_sha256

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Tokenizer | str | os.PathLike, cache_dir: str | os.PathLike | None = None
    ) -> CompressedTokenizer:
        """Builds (or loads from `cache_dir`) the compression table of a Hugging Face tokenizer.

        Args:
            tokenizer: a `tokenizers.Tokenizer` or the path of a `tokenizer.json`.
            cache_dir: optional directory for the cached table, keyed by the tokenizer's JSON
                content.

        Returns:
            The CompressedTokenizer.

        Raises:
            TypeError: `tokenizer` is neither a Tokenizer nor a path.
            ValueError: the path does not exist.
        """
        tok = _tokenizer_from(tokenizer)
        digest = tokenizer_fingerprint(tok)
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        path = None
        if cache_dir is not None:
            path = os.path.join(os.fspath(cache_dir), f"compressed_{digest}.npy")
            if os.path.exists(path):
                try:
                    table = np.load(path, allow_pickle=False)
                except (OSError, ValueError, EOFError) as err:
                    _log.warning("compressed-token cache %s unreadable (%s); rebuilding", path, err)
                else:
                    if _table_is_valid(table, vocab_size):
                        return cls(table, tokenizer_sha256=digest)
                    _log.warning("compressed-token cache %s failed validation; rebuilding", path)
        table = _build_table(tok)
        if path is not None:
            _atomic_save(path, table)
        return cls(table, tokenizer_sha256=digest)

    @property
    def compression_ratio(self) -> float:
        """`1 - V'/V`: the fraction of the raw vocabulary merged away."""
        return 1.0 - self.compressed_vocab_size / self.vocab_size if self.vocab_size else 0.0

    def compress(self, ids: np.ndarray) -> np.ndarray:
        """Maps raw ids to compressed ids (§1.2); negative ids (padding markers) pass through
        unchanged.

        Args:
            ids: integer array of any shape.

        Returns:
            An array of the same shape and dtype (int32 for unsigned input).

        Raises:
            TypeError: `ids` is not an integer array.
            ValueError: an id is >= vocab_size (the demo's later clipping is not reproduced).
        """
        arr = np.asarray(ids)
        if arr.dtype.kind not in _INT_KINDS:
            raise TypeError(f"compress: ids has dtype {arr.dtype}; expected an integer dtype")
        too_big = arr >= self.vocab_size
        if np.any(too_big):
            where = tuple(int(i) for i in np.argwhere(too_big)[0])
            raise ValueError(
                f"compress: ids contains {int(arr[where])} at position {where}; expected ids < "
                f"vocab_size={self.vocab_size} (negative ids are padding and pass through)"
            )
        negative = arr < 0
        result = self.old_to_new[np.where(negative, 0, arr)]
        out_dtype = arr.dtype if arr.dtype.kind == "i" else np.int32
        return np.where(negative, arr, result).astype(out_dtype, copy=False)

    def fingerprint(self) -> str:
        """sha256 hex of a version tag, V, V' and the table content (never its size only)."""
        h = hashlib.sha256()
        h.update(f"{_TABLE_VERSION};V={self.vocab_size};V'={self.compressed_vocab_size};".encode())
        h.update(self.old_to_new.astype("<i4", copy=False).tobytes())
        return h.hexdigest()


def check_compressed_vocab_size(compressor: CompressedTokenizer, expected: int) -> None:
    """Refuses a compressor whose V' differs from the config's (`model.engram.
    compressed_vocab_size`; 0 skips the check). A different V' changes every hash multiplier
    (§1.3 step 1), so tables trained with one tokenizer map are garbage with another.

    Raises:
      ValueError: naming both sizes.
    """
    if expected and compressor.compressed_vocab_size != expected:
        raise ValueError(
            f"compressed vocabulary: the tokenizer compresses to {compressor.compressed_vocab_size}"
            f" ids; expected model.engram.compressed_vocab_size = {expected} (another tokenizer, "
            "or another normalisation of it?)"
        )


def _atomic_save(path: str, table: np.ndarray) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".compressed_", suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, table, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------------
# N-gram hashing (§1.3)
# --------------------------------------------------------------------------------------------------

# Float quotient error < 1 needs p > ~5122 (see _hash_rows and _hash_tokens); margin included.
_FAST_MIN_PRIME = 2**13
_MAGIC = float(2**52)  # x + 2^52 rounds x to an integer held in the low mantissa bits
_BLOCK = 4096  # tokens per block: [heads, block] f64 temporaries stay in L2
_USE_NUMBA = True  # private switch: False forces the numpy fallback (tests exercise both paths)
_numba_kernel: object = None  # the compiled kernel, built on first use; False when unavailable


def _hash_tokens(
    ids_BT, starts_BT, has_segments, m_N, p_H, inv_H, pad_id, k_heads, fast, out_BTH, start, stop
):
    """Hashes flat tokens [start, stop) of [B, T] into out_BTH (§1.3 steps 3-5); numba-compiled.

    Per token the mixes of all orders are built incrementally (step 4) and every head's
    `mix mod p` (step 5) is written straight into the int32 [B, T, H] output. With `fast` (all
    primes >= _FAST_MIN_PRIME), q = trunc(float(mix) * (1/p)) is within 1 of floor(mix / p)
    (|fl(mix) - mix| <= 2^9 since 0 <= mix < 2^63, and the product's relative error is ~2^-52 on a
    quotient < 2^50), so r = mix - q*p (int64, wrapping) lies in [-p, 2p) and one correction step
    each way makes it exact. Windows stop at document starts: `starts_BT[b, t]` marks t == 0 or a
    segment change (only read when `has_segments`).
    """
    t_len = ids_BT.shape[1]
    n = m_N.shape[0]
    mixes_O = np.empty(n - 1, np.int64)
    if t_len == 0:
        return
    for b in range(start // t_len, (stop + t_len - 1) // t_len):  # rows, no division per token
        for t in range(max(start - b * t_len, 0), min(stop - b * t_len, t_len)):
            # pos = min(position inside the document, n - 1); window k reads ids_BT[b, t - k]
            # iff pos >= k, else pad_id (§1.3 step 3).
            pos = min(t, n - 1)
            if has_segments:
                pos = 0
                while pos < n - 1 and pos < t and not starts_BT[b, t - pos]:
                    pos += 1
            mix = ids_BT[b, t] * m_N[0]
            for k in range(1, n):
                tok = ids_BT[b, t - k] if pos >= k else pad_id
                mix ^= tok * m_N[k]  # §1.3 step 4: mix_{k+1} = mix_k XOR (s_k * m_k)
                mixes_O[k - 1] = mix
            for o in range(n - 1):
                mix = mixes_O[o]
                mix_f = np.float64(mix)
                for j in range(k_heads):  # vectorised over heads
                    h = o * k_heads + j
                    p = p_H[h]
                    if fast:
                        r = mix - np.int64(mix_f * inv_H[h]) * p
                        if r < 0:
                            r += p
                        elif r >= p:
                            r -= p
                    else:
                        r = mix % p
                    out_BTH[b, t, h] = r


def _compiled_kernel():
    """The numba-compiled `_hash_tokens` (cached on disk), or None when numba is unavailable."""
    global _numba_kernel
    if not _USE_NUMBA:
        return None
    if _numba_kernel is None:
        try:
            import numba
        except ImportError:
            _log.info("numba not importable; NgramHasher uses the numpy fallback")
            _numba_kernel = False
        else:
            try:
                _numba_kernel = numba.njit(cache=True, nogil=True)(_hash_tokens)
            except RuntimeError as err:  # no writable cache location: compile per process
                _log.warning("numba cache unavailable (%s); compiling without it", err)
                _numba_kernel = numba.njit(nogil=True)(_hash_tokens)
    return _numba_kernel or None


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"NgramHasher: {name}={value!r}; expected an integer >= {minimum}")
    return int(value)


class NgramHasher:
    """Multi-head N-gram hashing, bit-exact to docs/design.md §1.3.

    Args:
        vocab_bases: `max_ngram - 1` starting points of the prime searches, one per order 2..N (each
            > 1).
        max_ngram: N >= 2.
        heads_per_ngram: K >= 1 hash heads per order.
        layer_ids: the Engram layers; primes are drawn in this order, globally distinct.
        token_vocab_size: V', the compressed vocabulary size.
        pad_id: the compressed pad id in [0, V'), fills windows before a sequence/document start.
        seed: global seed; layer l draws multipliers from `default_rng(seed + 10007 * l)`.

    Ids must lie in [0, V'). The reference hashes negative ids (to meaningless rows) and lets ids >=
    V' overflow;
    this class rejects both: replace padding markers left by `CompressedTokenizer.compress` with
    `pad_id`.
    """

    def __init__(
        self,
        vocab_bases: Sequence[int],
        max_ngram: int,
        heads_per_ngram: int,
        layer_ids: Sequence[int],
        token_vocab_size: int,
        pad_id: int,
        seed: int = 0,
    ):
        self.max_ngram = _check_int("max_ngram", max_ngram, 2)
        self.heads_per_ngram = _check_int("heads_per_ngram", heads_per_ngram, 1)
        self.token_vocab_size = _check_int("token_vocab_size", token_vocab_size, 1)
        self.seed = _check_int("seed", seed, 0)
        bases = [_check_int("vocab_bases[...]", b, 2) for b in vocab_bases]
        if len(bases) != self.max_ngram - 1:
            raise ValueError(
                f"NgramHasher: vocab_bases has {len(bases)} entries {list(vocab_bases)}; expected "
                f"max_ngram - 1 = {self.max_ngram - 1} (one per order 2..{self.max_ngram})"
            )
        self.vocab_bases = tuple(bases)
        if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)):
            raise ValueError(f"NgramHasher: pad_id={pad_id!r}; expected an integer")
        if not 0 <= pad_id < self.token_vocab_size:
            raise ValueError(
                f"NgramHasher: pad_id={pad_id}; expected a compressed id in "
                f"[0, token_vocab_size={self.token_vocab_size})"
            )
        self.pad_id = int(pad_id)
        layers = [_check_int("layer_ids[...]", layer, 0) for layer in layer_ids]
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(
                f"NgramHasher: layer_ids={list(layer_ids)}; expected distinct ids, at least one"
            )
        self.layer_ids = tuple(layers)
        self.half_bound = max(1, ((2**63 - 1) // self.token_vocab_size) // 2)

        # §1.3 step 1: multipliers from numpy's own PCG64 bounded integers.
        self._multipliers = {}
        for layer in self.layer_ids:
            rng = np.random.default_rng(self.seed + 10007 * layer)
            r = rng.integers(0, self.half_bound, size=(self.max_ngram,), dtype=np.int64)
            self._multipliers[layer] = r * 2 + 1

        self._primes = table_primes(self.vocab_bases, self.heads_per_ngram, self.layer_ids)
        self._prime_arrays = {
            layer: np.asarray(p, dtype=np.int64) for layer, p in self._primes.items()
        }

    @property
    def num_heads(self) -> int:
        """(max_ngram - 1) * heads_per_ngram: hash ids per token and layer."""
        return (self.max_ngram - 1) * self.heads_per_ngram

    def _check_layer(self, layer_id: int) -> int:
        if layer_id not in self._primes:
            raise ValueError(
                f"NgramHasher: layer_id={layer_id!r}; expected one of {self.layer_ids}"
            )
        return layer_id

    def head_vocab_sizes(self, layer_id: int) -> list[int]:
        """The primes (table sizes) of one layer, order-major: all heads of n=2, then n=3, ..."""
        return list(self._primes[self._check_layer(layer_id)])

    def multipliers(self, layer_id: int) -> np.ndarray:
        """int64 [max_ngram] odd multipliers of one layer (m_0 multiplies the current token)."""
        return self._multipliers[self._check_layer(layer_id)].copy()

    def fingerprint(self) -> str:
        """sha256 hex over everything that decides a hash id: seed, orders, heads, layers, primes,
        multipliers,
        pad id, V', bases."""
        h = hashlib.sha256()
        h.update(
            (
                f"{_HASHER_VERSION};seed={self.seed};N={self.max_ngram};K={self.heads_per_ngram};"
                f"layers={list(self.layer_ids)};bases={list(self.vocab_bases)};"
                f"V'={self.token_vocab_size};"
                f"pad={self.pad_id};"
            ).encode()
        )
        for layer in self.layer_ids:
            h.update(f"primes[{layer}]={self._primes[layer]};".encode())
            h.update(f"mult[{layer}]={self._multipliers[layer].tolist()};".encode())
        return h.hexdigest()

    # ---- hashing ---------------------------------------------------------------------------------

    def _validate(
        self, ids: object, segment_ids: object | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Checks ids (and segment ids); returns ids int64 [B, T] and document starts bool [B, T].

        `starts_BT[b, t]` is True at t == 0 and wherever the segment id changes; None without
        segment ids.
        """
        ids_BT = np.asarray(ids)
        if ids_BT.dtype.kind not in _INT_KINDS:
            raise TypeError(f"NgramHasher: ids has dtype {ids_BT.dtype}; expected an integer dtype")
        if ids_BT.ndim != 2:
            raise ValueError(f"NgramHasher: ids has shape {ids_BT.shape}; expected 2-D [B, T]")
        b, t = ids_BT.shape
        if ids_BT.size:
            lo, hi = int(ids_BT.min()), int(ids_BT.max())
            if lo < 0 or hi >= self.token_vocab_size:
                bad = lo if lo < 0 else hi
                pos = tuple(int(i) for i in np.argwhere(ids_BT == bad)[0])
                hint = " (replace padding markers by pad_id before hashing)" if bad < 0 else ""
                raise ValueError(
                    f"NgramHasher: ids contains {bad} at position {pos}; expected compressed ids "
                    "in "
                    f"[0, token_vocab_size={self.token_vocab_size}){hint}"
                )
        ids_BT = np.ascontiguousarray(ids_BT, dtype=np.int64)
        if segment_ids is None:
            return ids_BT, None
        seg_BT = np.asarray(segment_ids)
        if seg_BT.shape != (b, t):
            raise ValueError(
                f"NgramHasher: segment_ids has shape {seg_BT.shape}; expected ids' shape {(b, t)}"
            )
        # Windows stop at the document start, exactly as at the start of a row, so a document
        # hashes the same wherever packing puts it.
        starts_BT = np.ones((b, t), dtype=bool)
        starts_BT[:, 1:] = seg_BT[:, 1:] != seg_BT[:, :-1]
        return ids_BT, starts_BT

    def block(
        self, ids_BT: np.ndarray, starts_BT: np.ndarray | None, blocked: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Applies a blocked mask: ids with pad_id at blocked slots, and window starts at every
        blocked slot and right after it (copies; unchanged when `blocked` is None).

        No window reaches through a blocked slot (an image token, say): the text after it hashes
        exactly as at a sequence start, however short the blocked span, and a blocked slot's own
        windows are all padding (DeepSeek-V4.1's rule; its Engram output is masked anyway).

        Raises:
          ValueError: `blocked` is not an array of ids' [B, T] shape.
        """
        if blocked is None:
            return ids_BT, starts_BT
        blocked_BT = np.asarray(blocked)
        if blocked_BT.shape != ids_BT.shape:
            raise ValueError(
                f"NgramHasher: blocked has shape {blocked_BT.shape}; expected ids' shape "
                f"{ids_BT.shape} (True at image / non-text positions)"
            )
        blocked_BT = blocked_BT.astype(bool)
        new_starts_BT = np.zeros(ids_BT.shape, bool) if starts_BT is None else starts_BT.copy()
        new_starts_BT[:, 0] = True
        new_starts_BT |= blocked_BT
        new_starts_BT[:, 1:] |= blocked_BT[:, :-1]  # the slot after a blocked one starts afresh
        return np.where(blocked_BT, np.int64(self.pad_id), ids_BT), new_starts_BT

    def _windows(self, ids_BT: np.ndarray, starts_BT: np.ndarray | None) -> np.ndarray:
        """The shifted windows s_k of the numpy fallback, int64 [N, B*T] (§1.3 step 3)."""
        n = self.max_ngram
        b, t = ids_BT.shape
        windows_NBT = np.empty((n, b, t), dtype=np.int64)
        windows_NBT[0] = ids_BT
        for k in range(1, n):
            windows_NBT[k, :, :k] = self.pad_id
            windows_NBT[k, :, k:] = ids_BT[:, : max(t - k, 0)]
        if starts_BT is not None:
            # Position of each token inside its document; earlier positions read as pad_id.
            index_BT = np.broadcast_to(np.arange(t), (b, t))
            doc_start_BT = np.maximum.accumulate(np.where(starts_BT, index_BT, 0), axis=1)
            pos_BT = index_BT - doc_start_BT
            for k in range(1, n):
                windows_NBT[k][pos_BT < k] = self.pad_id
        return windows_NBT.reshape(n, b * t)  # [N, B, T] -> [N, B*T]

    def _hash_rows(
        self, windows_NX: np.ndarray, layer_id: int, out_XH: np.ndarray, start: int, stop: int
    ) -> None:
        """Hashes flat tokens [start, stop) of one layer into out_XH (§1.3 steps 4-5)."""
        m = self._multipliers[layer_id]
        primes = self._prime_arrays[layer_id]
        n_orders, k_heads = self.max_ngram - 1, self.heads_per_ngram
        fast = bool(primes.min() >= _FAST_MIN_PRIME)
        block = _BLOCK
        mix_L = np.empty(block, np.int64)
        term_L = np.empty(block, np.int64)
        mix_OL = np.empty((n_orders, block), np.int64)
        if fast:
            inv_OK1 = (1.0 / primes.astype(np.float64)).reshape(n_orders, k_heads, 1)
            p_OK1 = primes.astype(np.uint32).reshape(n_orders, k_heads, 1)
            mixf_O1L = np.empty((n_orders, 1, block), np.float64)
            lo_O1L = np.empty((n_orders, 1, block), np.uint32)
            quot_OKL = np.empty((n_orders, k_heads, block), np.float64)
            rem_OKL = np.empty((n_orders, k_heads, block), np.uint32)
            alt_OKL = np.empty((n_orders, k_heads, block), np.uint32)
        for s in range(start, stop, block):
            e = min(stop, s + block)
            size = e - s
            mix = mix_L[:size]
            term = term_L[:size]
            # §1.3 step 4: mix_{n+1} = mix_n XOR (s_n * m_n); one mix per order serves all heads.
            np.multiply(windows_NX[0, s:e], m[0], out=mix)
            for o in range(n_orders):
                np.multiply(windows_NX[o + 1, s:e], m[o + 1], out=term)
                np.bitwise_xor(mix, term, out=mix)
                mix_OL[o, :size] = mix
            out_HL = out_XH[s:e].T  # [H, L] view of the [L, H] output rows; H is order-major
            if not fast:
                for o in range(n_orders):
                    for j in range(k_heads):
                        h = o * k_heads + j
                        np.remainder(mix_OL[o, :size], primes[h], out=out_HL[h], casting="unsafe")
                continue
            # §1.3 step 5, exact: q = round(mix / p) from float64 (|q - mix/p| < 1 for p > ~5122,
            # since
            # |fl(mix) - mix| <= 2^9 and mix/p < 2^52), so r = mix - q*p lies in (-p, p); only the
            # low 32 bits
            # of q*p matter, so uint32 wrap-around arithmetic gives r exactly; then r += p where r <
            # 0.
            mixf = mixf_O1L[:, :, :size]
            lo = lo_O1L[:, :, :size]
            quot = quot_OKL[:, :, :size]
            rem = rem_OKL[:, :, :size]
            alt = alt_OKL[:, :, :size]
            np.copyto(mixf[:, 0], mix_OL[:, :size], casting="unsafe")  # [O, 1, L]
            np.copyto(lo[:, 0], mix_OL[:, :size], casting="unsafe")  # low 32 bits of mix
            np.multiply(mixf, inv_OK1, out=quot)  # [O, K, L]
            np.add(quot, _MAGIC, out=quot)  # round to an integer kept in the low mantissa bits
            np.copyto(rem, quot.view(np.int64), casting="unsafe")  # low 32 bits of q
            np.multiply(rem, p_OK1, out=rem)
            np.subtract(lo, rem, out=rem)  # r mod 2^32, r in (-p, p)
            np.add(rem, p_OK1, out=alt)  # r + p
            # min as uint32 picks r when r >= 0 (r + p is larger) and r + p when r < 0 (r wraps
            # above 2^31).
            np.minimum(
                rem.reshape(n_orders * k_heads, size),
                alt.reshape(n_orders * k_heads, size),
                out=out_HL.view(np.uint32),
            )

    def __call__(
        self,
        ids: np.ndarray,
        layer_id: int,
        segment_ids: np.ndarray | None = None,
        *,
        blocked: np.ndarray | None = None,
        num_threads: int = 1,
    ) -> np.ndarray:
        """Hash ids of one layer.

        Args:
            ids: compressed ids, integer [B, T], each in [0, token_vocab_size).
            layer_id: one of `layer_ids`.
            segment_ids: optional [B, T] document ids of packed rows; windows stop at document
                boundaries (earlier positions read as pad_id). Without it the output equals the
                reference demo's.
            blocked: optional bool [B, T], True at image or other non-text positions: no window
                reaches through them, so the text after a blocked slot hashes as at a sequence
                start, and blocked slots read as pad_id (`block`; DeepSeek-V4.1). The Engram output
                at blocked positions is masked separately (`Engram(..., blocked=...)`).
            num_threads: threads over token blocks (the kernel releases the GIL); results are
                identical.

        Returns:
            int32 [B, T, (max_ngram - 1) * heads_per_ngram] (C-contiguous), order-major heads, each
            value < its prime.

        Raises:
            TypeError: ids is not an integer array.
            ValueError: bad shape, ids out of range, unknown layer_id, segment_ids shape mismatch.
        """
        self._check_layer(layer_id)
        ids_BT, starts_BT = self._validate(ids, segment_ids)
        ids_BT, starts_BT = self.block(ids_BT, starts_BT, blocked)
        kernel = _compiled_kernel()
        windows_NX = None if kernel is not None else self._windows(ids_BT, starts_BT)
        return self._hash_layer(kernel, ids_BT, starts_BT, windows_NX, layer_id, num_threads)

    def hash_all(
        self,
        ids: np.ndarray,
        segment_ids: np.ndarray | None = None,
        *,
        blocked: np.ndarray | None = None,
        num_threads: int = 1,
    ) -> dict[int, np.ndarray]:
        """Hash ids for every layer; ids are validated once (`blocked` as in `__call__`).

        Returns:
            {layer_id: int32 [B, T, H]}, each C-contiguous: the layers share one [L, B, T, H]
            allocation (one block of fresh pages instead of L).
        """
        ids_BT, starts_BT = self._validate(ids, segment_ids)
        ids_BT, starts_BT = self.block(ids_BT, starts_BT, blocked)
        kernel = _compiled_kernel()
        windows_NX = None if kernel is not None else self._windows(ids_BT, starts_BT)
        b, t = ids_BT.shape
        out_LBTH = np.empty((len(self.layer_ids), b, t, self.num_heads), dtype=np.int32)
        for i, layer in enumerate(self.layer_ids):
            self._hash_layer(kernel, ids_BT, starts_BT, windows_NX, layer, num_threads, out_LBTH[i])
        return {layer: out_LBTH[i] for i, layer in enumerate(self.layer_ids)}  # [B, T, H] each

    def _hash_layer(
        self,
        kernel: object,
        ids_BT: np.ndarray,
        starts_BT: np.ndarray | None,
        windows_NX: np.ndarray | None,
        layer_id: int,
        num_threads: int,
        out_BTH: np.ndarray | None = None,
    ) -> np.ndarray:
        """Hashes one layer into out_BTH (int32 [B, T, H], C-contiguous; allocated when None)."""
        b, t = ids_BT.shape
        total = b * t
        if out_BTH is None:
            out_BTH = np.empty((b, t, self.num_heads), dtype=np.int32)
        if kernel is not None:
            primes_H = self._prime_arrays[layer_id]
            args = (
                ids_BT,
                starts_BT if starts_BT is not None else np.ones((1, 1), dtype=bool),
                starts_BT is not None,
                self._multipliers[layer_id],
                primes_H,
                1.0 / primes_H.astype(np.float64),
                self.pad_id,
                self.heads_per_ngram,
                bool(primes_H.min() >= _FAST_MIN_PRIME),
                out_BTH,
            )

            def work(s: int, e: int) -> None:
                kernel(*args, s, e)
        else:
            out_XH = out_BTH.reshape(total, self.num_heads)  # [B, T, H] -> [B*T, H], a view

            def work(s: int, e: int) -> None:
                self._hash_rows(windows_NX, layer_id, out_XH, s, e)

        if num_threads <= 1 or total <= _BLOCK:
            work(0, total)
        else:
            chunk = -(-total // num_threads)
            chunk = -(-chunk // _BLOCK) * _BLOCK  # whole blocks per thread
            with ThreadPoolExecutor(max_workers=num_threads) as pool:
                futures = [
                    pool.submit(work, s, min(total, s + chunk)) for s in range(0, total, chunk)
                ]
                for future in futures:
                    future.result()  # re-raises a worker's exception
        return out_BTH
