"""Tests for engram_jax.hashing: tokenizer compression (§1.2) and N-gram hashing (§1.3), against
references
written here (trial-division primes, per-head mixes from scratch, Python-side canonicalisation)."""

from __future__ import annotations

import math
import re
import unicodedata

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from engram_jax import hashing
from engram_jax.hashing import CompressedTokenizer, NgramHasher, canonicalise

# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------


def _trial_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def _reference_primes(bases, max_ngram, heads, layer_ids):
    seen, primes = set(), {}
    for layer in layer_ids:
        primes[layer] = []
        for n in range(2, max_ngram + 1):
            c = bases[n - 2] - 1
            for _ in range(heads):
                c += 1
                while c in seen or not _trial_prime(c):
                    c += 1
                seen.add(c)
                primes[layer].append(c)
    return primes


def _reference_multipliers(seed, layer, vocab, max_ngram):
    half_bound = max(1, ((2**63 - 1) // vocab) // 2)
    rng = np.random.default_rng(seed + 10007 * layer)
    return rng.integers(0, half_bound, size=(max_ngram,), dtype=np.int64) * 2 + 1


def _reference_hash(ids, layer, *, bases, max_ngram, heads, layer_ids, vocab, pad, seed=0):
    """Per head, the mix is rebuilt from the shifted windows; numpy floor modulo on int64."""
    primes = _reference_primes(bases, max_ngram, heads, layer_ids)[layer]
    m = _reference_multipliers(seed, layer, vocab, max_ngram)
    x = np.asarray(ids, dtype=np.int64)
    b, t = x.shape
    shifted = []
    for k in range(max_ngram):
        s = np.full((b, t), pad, dtype=np.int64)
        s[:, k:] = x[:, : t - k] if k < t else s[:, k:]
        shifted.append(s)
    cols = []
    for n in range(2, max_ngram + 1):
        for j in range(heads):
            mix = np.zeros((b, t), dtype=np.int64)
            for k in range(n):
                mix = mix ^ (shifted[k] * m[k])
            cols.append(mix % primes[(n - 2) * heads + j])
    return np.stack(cols, axis=-1)  # [B, T, H]


def _py_canonicalise(text: str) -> str:
    """Python's view of the §1.2 chain (differs from `tokenizers` on final sigma / dotted I)."""
    s = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    s = "".join(c for c in s if not unicodedata.combining(c))
    s = re.sub(r"[ \t\r\n]+", " ", s.lower())
    return " " if s == " " else s.strip()


_PY_STRIP_ONLY = {"\x1c", "\x1d", "\x1e", "\x1f"}  # str.isspace() but not Rust char::is_whitespace


def _reference_table(tok: Tokenizer) -> np.ndarray:
    keys: dict[str, int] = {}
    table = []
    for tid in range(tok.get_vocab_size(with_added_tokens=True)):
        text = tok.decode([tid], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tok.id_to_token(tid)
        else:
            norm = _py_canonicalise(text)
            if (
                text in _PY_STRIP_ONLY
            ):  # Python strips these separators; `tokenizers`' Strip keeps them
                norm = text
            key = norm if norm else text
        table.append(keys.setdefault(key, len(keys)))
    return np.asarray(table)


CORPUS = [
    "Apple apple APPLE Café cafe CAFE naïve naive NAÏVE",
    " apple pie, the Apple store and an APPLE tree",
    "Café au lait in a cafe; naive naïve NAIVE",
    "日本語 のテキスト 日本語 と 日本",
    "tabs\tand\nnew lines\n\n  double  spaces",
]


def _train(kind: str, vocab_size: int = 400) -> Tokenizer:
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<unk>", "<s>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def bytelevel_tok() -> Tokenizer:
    return _train("bytelevel")


@pytest.fixture(scope="module")
def metaspace_tok() -> Tokenizer:
    return _train("metaspace")


# --------------------------------------------------------------------------------------------------
# NgramHasher vs reference
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=["numba", "numpy"])
def kernel_path(request, monkeypatch) -> str:
    """Runs a test once with the numba kernel and once with the numpy fallback."""
    if request.param == "numba":
        pytest.importorskip("numba")
    monkeypatch.setattr(hashing, "_USE_NUMBA", request.param == "numba")
    assert (hashing._compiled_kernel() is not None) == (request.param == "numba")
    return request.param


CONFIGS = [
    # bases, N, K, layer_ids, V', pad, seed, T
    ([100], 2, 3, [0, 2, 5], 50, 0, 0, 16),  # small primes: exact int64 path
    ([1000, 2000], 3, 2, [1, 15, 3], 1000, 2, 0, 16),
    ([20000, 20000, 30000], 4, 4, [1, 7, 2, 9], 129280, 5, 7, 16),  # float-quotient path
    (
        [8200, 8200],
        3,
        8,
        [1, 15],
        2,
        1,
        3,
        16,
    ),  # V'=2: multipliers near 2^62, primes near the threshold
    ([2**31 - 300], 2, 2, [4], 98000, 0, 11, 16),  # primes near 2^31
    ([646400, 646400], 3, 8, [1, 15], 98000, 2, 0, 2),  # T < max_ngram
    ([646400, 646400, 646400], 4, 2, [0, 3], 10, 9, 1, 1),  # T = 1
]


@pytest.mark.parametrize("bases,n,k,layers,vocab,pad,seed,t", CONFIGS)
def test_hasher_matches_reference(bases, n, k, layers, vocab, pad, seed, t, kernel_path):
    hasher = NgramHasher(bases, n, k, layers, vocab, pad, seed=seed)
    rng = np.random.default_rng(seed + 1)
    ids = rng.integers(0, vocab, size=(2, t))
    ids[0, : min(3, t)] = pad  # leading padding
    all_layers = hasher.hash_all(ids)
    for layer in layers:
        expected = _reference_hash(
            ids,
            layer,
            bases=bases,
            max_ngram=n,
            heads=k,
            layer_ids=layers,
            vocab=vocab,
            pad=pad,
            seed=seed,
        )
        got = hasher(ids, layer)
        assert got.dtype == np.int32 and got.shape == (2, t, (n - 1) * k)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(all_layers[layer], expected)
        np.testing.assert_array_equal(hasher(ids, layer, num_threads=3), expected)
        assert hasher.head_vocab_sizes(layer) == _reference_primes(bases, n, k, layers)[layer]
        np.testing.assert_array_equal(
            hasher.multipliers(layer), _reference_multipliers(seed, layer, vocab, n)
        )


def test_hasher_many_blocks_and_threads(kernel_path):
    """Several 4096-token blocks, a ragged last block, int32 and uint16 inputs."""
    layers = [1, 15]
    hasher = NgramHasher([646400, 646400], 3, 8, layers, 98000, 2)
    ids = np.random.default_rng(3).integers(0, 98000, size=(3, 3001))
    for layer in layers:
        expected = _reference_hash(
            ids,
            layer,
            bases=[646400, 646400],
            max_ngram=3,
            heads=8,
            layer_ids=layers,
            vocab=98000,
            pad=2,
        )
        np.testing.assert_array_equal(hasher(ids.astype(np.int32), layer, num_threads=2), expected)
    small = NgramHasher([646400], 2, 2, [0], 60000, 0)
    ids16 = np.random.default_rng(4).integers(0, 60000, size=(2, 9)).astype(np.uint16)
    expected = _reference_hash(
        ids16, 0, bases=[646400], max_ngram=2, heads=2, layer_ids=[0], vocab=60000, pad=0
    )
    np.testing.assert_array_equal(small(ids16, 0), expected)


def test_primes_distinct_and_multipliers_odd():
    layers = [1, 15, 4]
    hasher = NgramHasher([5000, 5000, 7000], 4, 8, layers, 129280, 2)
    all_primes = [p for layer in layers for p in hasher.head_vocab_sizes(layer)]
    assert len(set(all_primes)) == len(all_primes) == 3 * 3 * 8
    for layer in layers:
        primes = hasher.head_vocab_sizes(layer)
        for order in range(3):
            chunk = primes[order * 8 : (order + 1) * 8]
            assert chunk == sorted(chunk)
            assert all(p >= hasher.vocab_bases[order] and _trial_prime(p) for p in chunk)
        m = hasher.multipliers(layer)
        assert m.dtype == np.int64 and m.shape == (4,)
        assert np.all(m % 2 == 1) and np.all(m > 0) and np.all(m < 2 * hasher.half_bound)


def test_worked_example(kernel_path):
    """docs/design.md §1.3 worked example, golden numbers."""
    hasher = NgramHasher([100, 100], 3, 2, [1, 15], 1000, 2, seed=0)
    assert hasher.half_bound == 4611686018427387
    assert hasher.multipliers(1).tolist() == [7593627661414631, 479593001838623, 3563315849468963]
    assert hasher.multipliers(15).tolist() == [2865651367968763, 5551170510236881, 5343936160617101]
    assert hasher.head_vocab_sizes(1) == [101, 103, 107, 109]
    assert hasher.head_vocab_sizes(15) == [113, 127, 131, 137]
    x = np.array([[5, 17, 999, 42]])
    m = hasher.multipliers(1)
    s1 = np.array([2, 5, 17, 999], dtype=np.int64)
    s2 = np.array([2, 2, 5, 17], dtype=np.int64)
    mix2 = (x[0] * m[0]) ^ (s1 * m[1])
    mix3 = mix2 ^ (s2 * m[2])
    assert mix2.tolist() == [
        37589613662348477,
        126704279998511052,
        7591933097874243454,
        201312127890937119,
    ]
    assert mix3.tolist() == [
        44149995242953979,
        133829794441269130,
        7594400447519372241,
        151998357238516556,
    ]
    assert hasher(x, 1)[0].tolist() == [[58, 98, 55, 107], [16, 23, 61, 48], [4, 4, 95, 19],
                                        [36, 58, 19, 62]]  # fmt: skip
    assert hasher(x, 15)[0].tolist() == [[73, 113, 42, 95], [75, 109, 30, 77], [16, 95, 127, 133],
                                         [43, 28, 82, 113]]  # fmt: skip


def test_demo_default_primes():
    hasher = NgramHasher([646400, 646400], 3, 8, [1, 15], 129280, 2)
    assert hasher.head_vocab_sizes(1) == [
        646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523,
        646537, 646543, 646549, 646571, 646573, 646577, 646609, 646619,
    ]  # fmt: skip
    assert hasher.head_vocab_sizes(15) == [
        646631, 646637, 646643, 646669, 646687, 646721, 646757, 646771,
        646781, 646823, 646831, 646837, 646843, 646859, 646873, 646879,
    ]  # fmt: skip
    assert sum(hasher.head_vocab_sizes(1)) == 10_344_164
    assert sum(hasher.head_vocab_sizes(15)) == 10_348_242


def test_segment_ids_make_documents_position_independent(kernel_path):
    layers = [1, 15]
    hasher = NgramHasher([646400, 646400, 646400], 4, 4, layers, 98000, 2)
    rng = np.random.default_rng(5)
    doc_a, doc_b = rng.integers(0, 98000, size=5), rng.integers(0, 98000, size=7)
    packed = np.concatenate([doc_a, doc_b])[None, :]  # [1, 12]
    segments = np.array([[0] * 5 + [1] * 7])
    for layer in layers:
        got = hasher(packed, layer, segment_ids=segments)
        alone_a = hasher(doc_a[None, :], layer)
        alone_b = hasher(doc_b[None, :], layer)
        np.testing.assert_array_equal(got[:, :5], alone_a)
        np.testing.assert_array_equal(got[:, 5:], alone_b)
        # Without segment ids the second document sees the first (the demo's behaviour).
        plain = hasher(packed, layer)
        expected = _reference_hash(
            packed,
            layer,
            bases=[646400] * 3,
            max_ngram=4,
            heads=4,
            layer_ids=layers,
            vocab=98000,
            pad=2,
        )
        np.testing.assert_array_equal(plain, expected)
        assert not np.array_equal(plain[:, 5:], alone_b)
        # One segment per row equals no segments.
        np.testing.assert_array_equal(hasher(packed, layer, segment_ids=np.zeros((1, 12))), plain)
    both = hasher.hash_all(packed, segment_ids=segments)
    np.testing.assert_array_equal(both[15][:, 5:], hasher(doc_b[None, :], 15))


def test_packed_documents_match_per_document_reference(kernel_path):
    """Many documents (lengths 1..9) packed in ragged rows: every token hashes as in its document
    alone (the reference on that document); threads and both layers agree."""
    layers = [1, 15]
    cfg = dict(bases=[646400, 646400], max_ngram=3, heads=8, layer_ids=layers, vocab=98000, pad=2)
    hasher = NgramHasher([646400, 646400], 3, 8, layers, 98000, 2)
    rng = np.random.default_rng(11)
    b, t = 3, 1500
    ids = rng.integers(0, 98000, size=(b, t))
    segments = np.zeros((b, t), dtype=np.int64)
    bounds = []  # (row, start, stop) of each document
    for row in range(b):
        start, seg = 0, 0
        while start < t:
            stop = min(t, start + int(rng.integers(1, 10)))
            segments[row, start:stop] = seg + 100 * row  # ids restart per row; values arbitrary
            bounds.append((row, start, stop))
            start, seg = stop, seg + 1
    all_layers = hasher.hash_all(ids, segment_ids=segments)
    threaded = hasher.hash_all(ids, segment_ids=segments, num_threads=2)
    # Documents as rows of one right-padded [D, 9] array (windows only look back, so the right
    # padding changes nothing): one reference call per layer.
    docs = np.full((len(bounds), 9), 2, dtype=np.int64)
    for d, (row, start, stop) in enumerate(bounds):
        docs[d, : stop - start] = ids[row, start:stop]
    for layer in layers:
        by_doc = _reference_hash(docs, layer, **cfg)  # [D, 9, H]
        expected = np.empty((b, t, 16), dtype=np.int64)
        for d, (row, start, stop) in enumerate(bounds):
            expected[row, start:stop] = by_doc[d, : stop - start]
        got = all_layers[layer]
        assert got.dtype == np.int32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(threaded[layer], expected)
        np.testing.assert_array_equal(hasher(ids, layer, segment_ids=segments), expected)


# --------------------------------------------------------------------------------------------------
# NgramHasher validation
# --------------------------------------------------------------------------------------------------

GOOD = dict(
    vocab_bases=[1000, 1000],
    max_ngram=3,
    heads_per_ngram=2,
    layer_ids=[1, 15],
    token_vocab_size=500,
    pad_id=2,
)


@pytest.mark.parametrize(
    "override,exc,pattern",
    [
        (dict(vocab_bases=[1000]), ValueError, "vocab_bases"),
        (dict(vocab_bases=[1000, 1]), ValueError, "vocab_bases"),
        (dict(max_ngram=1, vocab_bases=[]), ValueError, "max_ngram"),
        (dict(heads_per_ngram=0), ValueError, "heads_per_ngram"),
        (dict(pad_id=500), ValueError, "pad_id"),
        (dict(pad_id=-1), ValueError, "pad_id"),
        (dict(token_vocab_size=0), ValueError, "token_vocab_size"),
        (dict(layer_ids=[1, 1]), ValueError, "layer_ids"),
        (dict(layer_ids=[]), ValueError, "layer_ids"),
        (dict(vocab_bases=[2**31 - 40, 2**31 - 40], heads_per_ngram=8), ValueError, "2\\^31"),
    ],
)
def test_hasher_constructor_errors(override, exc, pattern):
    with pytest.raises(exc, match=pattern):
        NgramHasher(**{**GOOD, **override})


def test_hasher_call_errors():
    hasher = NgramHasher(**GOOD)
    ids = np.zeros((2, 8), dtype=np.int64)
    with pytest.raises(ValueError, match=r"ids has shape \(8,\); expected 2-D"):
        hasher(ids[0], 1)
    with pytest.raises(TypeError, match="ids has dtype float"):
        hasher(ids.astype(np.float32), 1)
    bad = ids.copy()
    bad[1, 3] = 500
    with pytest.raises(
        ValueError, match=r"ids contains 500 at position \(1, 3\).*token_vocab_size=500"
    ):
        hasher(bad, 1)
    bad[1, 3] = -1
    with pytest.raises(ValueError, match=r"ids contains -1 .*pad_id"):
        hasher.hash_all(bad)
    with pytest.raises(ValueError, match=r"layer_id=3; expected one of \(1, 15\)"):
        hasher(ids, 3)
    with pytest.raises(ValueError, match="layer_id"):
        hasher.head_vocab_sizes(2)
    with pytest.raises(ValueError, match="segment_ids has shape"):
        hasher(ids, 1, segment_ids=np.zeros((2, 7)))


def test_hasher_fingerprint():
    base = NgramHasher(**GOOD)
    assert base.fingerprint() == NgramHasher(**GOOD).fingerprint()
    variants = [
        dict(seed=1), dict(layer_ids=[1, 14]), dict(layer_ids=[15, 1]), dict(pad_id=3),
        dict(token_vocab_size=501), dict(vocab_bases=[1000, 1001]), dict(heads_per_ngram=3),
    ]  # fmt: skip
    prints = {base.fingerprint()}
    for v in variants:
        prints.add(NgramHasher(**{**GOOD, **v}).fingerprint())
    assert len(prints) == len(variants) + 1


# --------------------------------------------------------------------------------------------------
# Canonicalisation (§1.2)
# --------------------------------------------------------------------------------------------------


def _stepwise(text: str) -> str:
    """The chain applied one `tokenizers` normalizer at a time."""
    steps = [
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), "\ue000"),
        normalizers.Strip(), normalizers.Replace("\ue000", " "),
    ]  # fmt: skip
    for step in steps:
        text = step.normalize_str(text)
    return text


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Apple", "apple"), (" apple", "apple"), ("APPLE", "apple"), (" Café", "cafe"),
        ("\n\n", " "), ("  ", " "), (" ", " "), ("\t", " "), ("ﬁ", "fi"), ("e\u0301", "e"),
        ("é", "e"),
        ("ΟΔΟΣ", "οδοσ"), ("İ", "i"), (" a \n b ", "a b"), ("", ""),
    ],
)  # fmt: skip
def test_canonicalise(text, expected):
    assert canonicalise(text) == expected
    assert _stepwise(text) == expected


def test_lowercasing_special_letters_follow_tokenizers():
    lower = normalizers.Lowercase()
    # Per-character lowercasing: no final-sigma rule (Python's str.lower gives "οδος").
    assert lower.normalize_str("ΟΔΟΣ") == "οδοσ" and "ΟΔΟΣ".lower() == "οδος"
    assert canonicalise("ΟΔΟΣ") == "οδοσ" != _py_canonicalise("ΟΔΟΣ")
    # Dotted capital I lowercases to i + U+0307; the chain strips accents before lowercasing, giving
    # "i".
    assert lower.normalize_str("İ") == "i\u0307"
    assert normalizers.StripAccents().normalize_str(normalizers.NFD().normalize_str("İ")) == "I"
    assert canonicalise("İstanbul") == "istanbul"
    # Information separators: whitespace to Python's strip, not to the tokenizers Strip normalizer.
    for sep in sorted(_PY_STRIP_ONLY):
        assert sep.isspace() and canonicalise(sep) == sep and _stepwise(sep) == sep
    # Combining accent and precomposed letter agree.
    assert canonicalise("Cafe\u0301") == canonicalise("Café") == "cafe"


# --------------------------------------------------------------------------------------------------
# CompressedTokenizer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_table_matches_reference(kind, bytelevel_tok, metaspace_tok):
    tok = bytelevel_tok if kind == "bytelevel" else metaspace_tok
    comp = CompressedTokenizer.from_tokenizer(tok)
    v = tok.get_vocab_size(with_added_tokens=True)
    # The Python chain agrees with the tokenizers chain on this corpus (no final sigma / dotted I).
    for tid in range(v):
        text = tok.decode([tid], skip_special_tokens=False)
        if "\ufffd" not in text and text not in _PY_STRIP_ONLY:
            assert canonicalise(text) == _py_canonicalise(text), repr(text)
    expected = _reference_table(tok)
    np.testing.assert_array_equal(comp.old_to_new, expected)
    assert comp.old_to_new.dtype == np.int32 and comp.vocab_size == v
    assert comp.compressed_vocab_size == expected.max() + 1 < v
    assert comp.compression_ratio == pytest.approx(1 - comp.compressed_vocab_size / v)


def test_variants_share_one_id(bytelevel_tok, metaspace_tok):
    for tok, space in ((bytelevel_tok, "Ġ"), (metaspace_tok, "▁")):
        comp = CompressedTokenizer.from_tokenizer(tok)
        for word in ("apple", "cafe", "naive"):
            forms = {word, word.capitalize(), word.upper(), word.replace("e", "é"),
                     word.replace("i", "ï"), word.capitalize().replace("e", "é")}  # fmt: skip
            forms |= {space + f for f in forms}
            vocab = tok.get_vocab()
            ids = set()
            for form in forms:
                raw = form if space == "▁" else _to_bytelevel(form)
                if raw in vocab:
                    ids.add(vocab[raw])
            assert len(ids) >= 3, (word, ids)
            assert len({int(comp.old_to_new[i]) for i in ids}) == 1, word


def _to_bytelevel(text: str) -> str:
    table = dict(zip(range(256), _bytes_to_unicode(), strict=True))
    prefix = "Ġ" if text.startswith("Ġ") else ""
    body = text[1:] if prefix else text
    return prefix + "".join(table[b] for b in body.encode("utf-8"))


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, extra = {}, 0
    for b in range(256):
        if b in bs:
            cs[b] = chr(b)
        else:
            cs[b] = chr(256 + extra)
            extra += 1
    return [cs[b] for b in range(256)]


def test_undecodable_fragments_keep_raw_key(bytelevel_tok):
    tok = bytelevel_tok
    comp = CompressedTokenizer.from_tokenizer(tok)
    fragments = [
        tid for tid in range(tok.get_vocab_size())
        if "\ufffd" in tok.decode([tid], skip_special_tokens=False)
    ]  # fmt: skip
    assert len(fragments) > 10  # partial UTF-8 bytes of 日本語 and of all non-ASCII bytes
    # Distinct raw strings never merge with each other (their decodes are all "\ufffd"-bearing).
    raws = {tok.id_to_token(t) for t in fragments}
    assert len({int(comp.old_to_new[t]) for t in fragments}) == len(raws)
    # A whole character built from those fragments decodes fine and is keyed by its text.
    nihon = tok.token_to_id(_to_bytelevel("日本"))
    assert nihon is not None and "\ufffd" not in tok.decode([nihon])


def test_compress(bytelevel_tok):
    comp = CompressedTokenizer.from_tokenizer(bytelevel_tok)
    v = comp.vocab_size
    ids = np.array([[0, 5, -1, v - 1], [-7, 3, 2, 1]], dtype=np.int64)
    out = comp.compress(ids)
    assert out.shape == ids.shape and out.dtype == np.int64
    assert out[0, 2] == -1 and out[1, 0] == -7
    assert out[0, 1] == comp.old_to_new[5] and out[0, 3] == comp.old_to_new[v - 1]
    np.testing.assert_array_equal(comp.compress(np.array(7, dtype=np.int32)), comp.old_to_new[7])
    with pytest.raises(ValueError, match=rf"{v + 3}.*\(1, 2\).*vocab_size={v}"):
        comp.compress(np.array([[1, 2, 3], [4, 5, v + 3]]))
    with pytest.raises(TypeError, match="float"):
        comp.compress(np.array([1.0, 2.0]))


def test_cache_roundtrip_and_corruption(bytelevel_tok, tmp_path):
    first = CompressedTokenizer.from_tokenizer(bytelevel_tok, cache_dir=tmp_path)
    files = list(tmp_path.glob("compressed_*.npy"))
    assert len(files) == 1 and files[0].name == f"compressed_{first.tokenizer_sha256}.npy"
    np.testing.assert_array_equal(np.load(files[0]), first.old_to_new)
    assert not list(tmp_path.glob("*.tmp"))
    # A second construction loads the file: prove it by planting a different valid table.
    planted = np.zeros(first.vocab_size, dtype=np.int32)
    np.save(files[0], planted)
    loaded = CompressedTokenizer.from_tokenizer(bytelevel_tok, cache_dir=tmp_path)
    np.testing.assert_array_equal(loaded.old_to_new, planted)
    # Corrupt bytes, a wrong length and a non-dense table are rebuilt and rewritten.
    for corrupt in (b"not a numpy file", None, "sparse"):
        if corrupt is None:
            np.save(files[0], np.zeros(first.vocab_size - 1, dtype=np.int32))
        elif corrupt == "sparse":
            np.save(files[0], np.full(first.vocab_size, 7, dtype=np.int32))
        else:
            files[0].write_bytes(corrupt)
        rebuilt = CompressedTokenizer.from_tokenizer(bytelevel_tok, cache_dir=tmp_path)
        np.testing.assert_array_equal(rebuilt.old_to_new, first.old_to_new)
        np.testing.assert_array_equal(np.load(files[0]), first.old_to_new)
    # A path works as well as a Tokenizer object.
    path = tmp_path / "tokenizer.json"
    bytelevel_tok.save(str(path))
    from_path = CompressedTokenizer.from_tokenizer(path, cache_dir=tmp_path)
    np.testing.assert_array_equal(from_path.old_to_new, first.old_to_new)
    with pytest.raises(ValueError, match="tokenizer"):
        CompressedTokenizer.from_tokenizer(tmp_path / "missing.json")
    with pytest.raises(TypeError, match="tokenizer"):
        CompressedTokenizer.from_tokenizer(42)


def test_table_fingerprint(bytelevel_tok, metaspace_tok):
    a = CompressedTokenizer(np.array([0, 1, 0, 2]))
    b = CompressedTokenizer(np.array([0, 1, 1, 2]))
    assert a.compressed_vocab_size == b.compressed_vocab_size == 3
    assert a.fingerprint() != b.fingerprint()
    real = CompressedTokenizer.from_tokenizer(bytelevel_tok)
    assert real.fingerprint() == CompressedTokenizer.from_tokenizer(bytelevel_tok).fingerprint()
    changed = real.old_to_new.copy()
    changed[[3, 4]] = changed[[4, 3]]  # swap two entries: same size, different mapping
    other = CompressedTokenizer(changed)
    assert changed[3] != changed[4] and other.compressed_vocab_size == real.compressed_vocab_size
    assert other.fingerprint() != real.fingerprint()
    assert real.fingerprint() != CompressedTokenizer.from_tokenizer(metaspace_tok).fingerprint()
    with pytest.raises(ValueError, match="old_to_new"):
        CompressedTokenizer(np.zeros((2, 2), dtype=np.int32))


def test_prime_base_at_or_above_int32_range_is_rejected():
    with pytest.raises(ValueError, match="2\\^31"):
        hashing.table_primes([2**31 + 11], 1, [0])


# --------------------------------------------------------------------------------------------------
# DeepSeek-V4.1 details: blocked (image) slots, the compressed vocabulary check
# --------------------------------------------------------------------------------------------------


def test_blocked_slots_stop_the_look_back_as_a_sequence_start(kernel_path):
    """No window reaches through a blocked slot, however short the span: the text after it hashes
    as a sequence of its own (the reference on that text alone), the text before it is unchanged,
    and a blocked slot hashes as all padding. Segment ids combine with it."""
    layers = [1, 14]
    pad, vocab = 2, 99_092
    kw = dict(bases=[16_000] * 3, max_ngram=4, heads=2, layer_ids=layers, vocab=vocab, pad=pad)
    hasher = NgramHasher([16_000] * 3, 4, 2, layers, vocab, pad)
    rng = np.random.default_rng(8)
    ids = rng.integers(0, vocab, size=(2, 14))
    blocked = np.zeros((2, 14), bool)
    blocked[0, 4:8] = True  # an image span of 4 slots
    blocked[1, 6] = True  # a single blocked slot: shorter than max_ngram - 1 = 3
    for layer in layers:
        got = hasher(ids, layer, blocked=blocked)
        plain = hasher(ids, layer)
        for row, (first, last) in enumerate([(4, 8), (6, 7)]):
            np.testing.assert_array_equal(got[row, :first], plain[row, :first])
            after = _reference_hash(ids[row : row + 1, last:], layer, **kw)[0]
            np.testing.assert_array_equal(got[row, last:], after)
            all_pad = _reference_hash(np.full((1, 1), pad), layer, **kw)[0, 0]
            assert (got[row, first:last] == all_pad).all()
        assert not np.array_equal(got[1, 7:], plain[1, 7:])  # the test can fail
    both = hasher.hash_all(ids, blocked=blocked)
    np.testing.assert_array_equal(both[14], hasher(ids, 14, blocked=blocked))
    # With segment ids: a document start and a blocked slot both cut the windows.
    segments = np.repeat([[0] * 10 + [1] * 4], 2, axis=0)
    got = hasher(ids, 1, segments, blocked=blocked)
    np.testing.assert_array_equal(got[1, 7:10], _reference_hash(ids[1:, 7:10], 1, **kw)[0])
    np.testing.assert_array_equal(got[1, 10:], _reference_hash(ids[1:, 10:], 1, **kw)[0])
    with pytest.raises(ValueError, match=r"blocked has shape \(2, 13\); expected ids' shape"):
        hasher(ids, 1, blocked=blocked[:, :13])


def test_compressed_vocabulary_size_check_names_both_sizes():
    compressor = CompressedTokenizer(np.array([0, 1, 1, 2, 0], np.int32))
    hashing.check_compressed_vocab_size(compressor, 3)  # matches
    hashing.check_compressed_vocab_size(compressor, 0)  # 0: unchecked
    with pytest.raises(ValueError, match=r"compresses to 3 ids; expected .*= 99092"):
        hashing.check_compressed_vocab_size(compressor, 99_092)
