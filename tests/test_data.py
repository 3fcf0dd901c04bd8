"""Tests for engram_jax.data: loaders, tokenizer cache, packing, resume, sharding, hash ids."""

import gzip
import json
import os
import string

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from absl import flags

from engram_jax import data

SEQ_LEN = 32
BATCH = 2
VOCAB = 300

_VOCABULARY = (
    "the python tutorial explains lists tuples dictionaries classes modules functions "
    "errors exceptions iterators generators café naïve 日本語 résumé print return yield"
)
_WORDS = _VOCABULARY.split()


def _make_documents(num_docs: int = 40, seed: int = 0) -> list[str]:
    """Unique documents of 1..120 words (some longer than SEQ_LEN tokens), ASCII first char."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(num_docs):
        words = rng.choice(_WORDS, size=int(rng.integers(1, 120)))
        docs.append(f"Doc {i}: " + " ".join(words) + ("\n  indented line" if i % 3 else ""))
    docs[5] = "Doc 5 mentions <eos> and <pad> as plain text."
    return docs


DOCS = _make_documents()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("tokcache")
    return data.load_or_train_tokenizer("", DOCS, VOCAB, str(cache_dir))


@pytest.fixture(scope="module")
def spec(tokenizer):
    return data.make_data_spec(tokenizer, pad_id=0)


def _bytes_to_unicode() -> dict[str, int]:
    """Reference GPT-2 byte-level alphabet: printable char -> byte value."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _direct_tokens(tokenizer, doc: str, eos_id: int) -> list[int]:
    """Reference tokenisation: literal special-token text is plain text, eos appended."""
    ids = []
    char_to_byte = _bytes_to_unicode()
    for token in tokenizer.encode(doc, add_special_tokens=False).tokens:
        # Re-encode specials that the tokenizer matched in the text as their byte tokens.
        if token in ("<eos>", "<pad>"):
            ids.extend(tokenizer.token_to_id(ch) for ch in token)
        else:
            assert all(ch in char_to_byte for ch in token)
            ids.append(tokenizer.token_to_id(token))
    return ids + [eos_id]


def _pieces(batches):
    """Yields (inputs, targets, target_bytes) per segment, in emission order."""
    for batch in batches:
        for row in range(batch["inputs"].shape[0]):
            seg_T = batch["segment_ids"][row]
            for s in np.unique(seg_T[seg_T > 0]):
                sel_T = seg_T == s
                yield (
                    batch["inputs"][row][sel_T],
                    batch["targets"][row][sel_T],
                    batch["target_bytes"][row][sel_T],
                )


def _reassemble(batches, eos_id):
    """Documents (token lists incl. eos) and their target-byte sums, from packed batches."""
    docs, byte_sums, current, current_bytes = [], [], [], 0
    for inputs, targets, target_bytes in _pieces(batches):
        if not current:
            current = [int(inputs[0])]
        assert current[-1] == int(inputs[0]) or len(current) == 1
        current.extend(int(t) for t in targets)
        current_bytes += int(target_bytes.sum())
        if targets[-1] == eos_id:
            docs.append(current)
            byte_sums.append(current_bytes)
            current, current_bytes = [], 0
    assert not current, "stream ended inside a document"
    return docs, byte_sums


def _finite(documents, tokenizer, spec, **kwargs):
    kwargs.setdefault("seed", 0)
    return list(
        data.make_pipeline(
            documents,
            tokenizer,
            spec,
            seq_len=SEQ_LEN,
            batch_size=BATCH,
            num_epochs=1,
            drop_remainder=False,
            **kwargs,
        )
    )


# ---------------------------------------------------------------------------------------- loading


def _write(path, fmt, docs):
    if fmt == "txt":
        path.write_text("\n\n\n".join(docs), encoding="utf-8")
    elif fmt == "txt.gz":
        path.write_bytes(gzip.compress("\n\n\n\n".join(docs).encode("utf-8")))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.table({"text": docs}), str(path))
    elif fmt == "arrayrecord":
        from array_record.python import array_record_module

        writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
        for d in docs:
            writer.write(d.encode("utf-8"))
        writer.close()


@pytest.mark.parametrize("fmt", ["txt", "txt.gz", "jsonl", "parquet", "arrayrecord"])
def test_load_each_format(tmp_path, fmt):
    path = tmp_path / f"corpus.{fmt}"
    _write(path, fmt, DOCS[:6])
    assert data.load_documents(str(path)) == DOCS[:6]


def test_txt_paragraphs_stay_in_one_document(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("Para one.\n\nPara two.\n \n\t\nSecond doc.\n\n\n\n   \n", encoding="utf-8")
    assert data.load_documents(str(path)) == ["Para one.\n\nPara two.", "Second doc."]


def test_load_glob_and_directory_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "b.jsonl", "jsonl", DOCS[2:4])
    _write(tmp_path / "a.txt", "txt", DOCS[0:2])
    _write(tmp_path / "sub" / "c.parquet", "parquet", DOCS[4:6])
    (tmp_path / "README.md").write_text("not a corpus file")
    assert data.load_documents(str(tmp_path)) == DOCS[:6]
    assert data.load_documents(str(tmp_path / "*.*l")) == DOCS[2:4]
    assert data.load_documents(str(tmp_path / "**" / "*.parquet")) == DOCS[4:6]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.load_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="nothing"):
        data.load_documents(str(tmp_path / "nothing*.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="empty.txt"):
        data.load_documents(str(empty))
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"x\.csv.*\.jsonl.*\.parquet"):
        data.load_documents(str(tmp_path / "x.csv"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        data.load_documents(str(bad))
    (tmp_path / "only_md").mkdir()
    with pytest.raises(ValueError, match="only_md"):
        data.load_documents(str(tmp_path / "only_md"))


def test_bundled_corpus():
    docs = data.load_documents("")
    # Shipped inside the package, never read from beside the repository.
    assert data.bundled_corpus_path().startswith(os.path.dirname(data.__file__))
    assert len(docs) >= 700
    assert sum(len(d.encode("utf-8")) for d in docs) > 1_000_000
    assert docs[0].startswith("2 The Python Tutorial")
    # An earlier slice had lost every f, x, 0, 7 and 8 ("Python Sotware Foundation").
    text = "".join(docs)
    missing = sorted(set(string.ascii_letters + string.digits) - set(text))
    assert missing == [], f"the bundled corpus lacks {missing}"
    assert "for x in" in text and "f-string" in text


def test_split_documents():
    train, held_out = data.split_documents(DOCS, 0.1)
    assert train == DOCS[:36] and held_out == DOCS[36:]
    assert data.split_documents(DOCS[:2], 0.01) == (DOCS[:1], DOCS[1:2])
    with pytest.raises(ValueError, match="eval_fraction"):
        data.split_documents(DOCS, 1.0)


# ---------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_cache_reuse(tmp_path):
    docs = DOCS[:10]
    first = data.load_or_train_tokenizer("", docs, 280, str(tmp_path))
    (cached,) = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path) for f in fs]
    assert os.path.basename(cached) == "tokenizer.json"
    mtime = os.stat(cached).st_mtime_ns
    second = data.load_or_train_tokenizer("", docs, 280, str(tmp_path))
    assert os.stat(cached).st_mtime_ns == mtime
    assert second.to_str() == first.to_str()
    data.load_or_train_tokenizer("", docs, 290, str(tmp_path))  # new key -> second file
    assert sum(len(fs) for _, _, fs in os.walk(tmp_path)) == 2
    assert data.load_or_train_tokenizer(cached, [], 0, "unused").to_str() == first.to_str()


def test_tokenizer_errors(tmp_path):
    garbage = tmp_path / "tokenizer.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        data.load_or_train_tokenizer(str(garbage), DOCS, VOCAB, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        data.load_or_train_tokenizer(str(tmp_path / "nope.json"), DOCS, VOCAB, str(tmp_path))


def test_special_ids_and_spec(tokenizer, spec):
    assert (spec.pad_id, spec.eos_id) == (0, 1)
    assert tokenizer.token_to_id("<pad>") == 0 and tokenizer.token_to_id("<eos>") == 1
    assert spec.token_bytes_V.shape == (tokenizer.get_vocab_size(),)
    assert spec.token_bytes_V[0] == spec.token_bytes_V[1] == 0
    with pytest.raises(ValueError, match="model.pad_id=0"):
        data.make_data_spec(tokenizer, pad_id=3)
    assert data.make_data_spec(tokenizer, vocab_size=512).token_bytes_V.shape == (512,)


def test_token_byte_lengths_reference(tokenizer, spec):
    char_to_byte = _bytes_to_unicode()
    for token_id in range(2, tokenizer.get_vocab_size()):
        token = tokenizer.id_to_token(token_id)
        assert spec.token_bytes_V[token_id] == len(bytes(char_to_byte[c] for c in token))


# ---------------------------------------------------------------------------------------- packing


def test_packing_invariants(tokenizer, spec):
    batches = _finite(DOCS, tokenizer, spec, shuffle=False)
    for batch in batches:
        assert set(batch) == {
            "inputs",
            "targets",
            "loss_mask",
            "segment_ids",
            "positions",
            "target_bytes",
        }
        for key in ("inputs", "targets", "segment_ids", "positions", "target_bytes"):
            assert batch[key].dtype == np.int32 and batch[key].shape[1:] == (SEQ_LEN,)
        assert batch["loss_mask"].dtype == np.float32
        for row in range(batch["inputs"].shape[0]):
            seg_T, pos_T = batch["segment_ids"][row], batch["positions"][row]
            valid_T = seg_T > 0
            np.testing.assert_array_equal(batch["loss_mask"][row], valid_T.astype(np.float32))
            # Padding only at the end; segments numbered 1, 2, ... without gaps.
            num_valid = int(valid_T.sum())
            assert valid_T[:num_valid].all() and not valid_T[num_valid:].any()
            assert seg_T[0] == 1 and set(np.diff(seg_T[:num_valid])) <= {0, 1}
            for t in range(SEQ_LEN):
                if not valid_T[t]:
                    assert batch["inputs"][row, t] == batch["targets"][row, t] == spec.pad_id
                    assert pos_T[t] == 0 and batch["target_bytes"][row, t] == 0
                    continue
                starts = t == 0 or seg_T[t - 1] != seg_T[t]
                assert pos_T[t] == (0 if starts else pos_T[t - 1] + 1)
                if t + 1 < SEQ_LEN and seg_T[t + 1] == seg_T[t]:
                    assert batch["targets"][row, t] == batch["inputs"][row, t + 1]
    # Only the very last row may hold padding in a finite stream.
    masks = np.concatenate([b["loss_mask"] for b in batches])
    assert masks[:-1].all()

    docs, _ = _reassemble(batches, spec.eos_id)
    assert docs == [_direct_tokens(tokenizer, d, spec.eos_id) for d in DOCS]


def test_target_bytes_sum_to_document_bytes(tokenizer, spec):
    batches = _finite(DOCS, tokenizer, spec, shuffle=False)
    docs, byte_sums = _reassemble(batches, spec.eos_id)
    char_to_byte = _bytes_to_unicode()
    for doc, ids, byte_sum in zip(DOCS, docs, byte_sums, strict=True):
        # Every token but the first is a target once; eos counts 0 bytes.
        first = bytes(char_to_byte[c] for c in tokenizer.id_to_token(ids[0]))
        assert byte_sum == len(doc.encode("utf-8")) - len(first)
        assert tokenizer.decode(ids[:-1]) == doc


def test_empty_documents_are_skipped(tokenizer, spec):
    batches = _finite(["", DOCS[0], "", DOCS[1]], tokenizer, spec, shuffle=False)
    docs, _ = _reassemble(batches, spec.eos_id)
    assert docs == [_direct_tokens(tokenizer, d, spec.eos_id) for d in DOCS[:2]]


def test_out_of_vocab_ids_rejected(tokenizer, spec):
    small = data.DataSpec(vocab_size=100, pad_id=0, eos_id=1, token_bytes_V=spec.token_bytes_V)
    with pytest.raises(ValueError, match=r"token id \d+ is outside \[0, vocab_size=100\)"):
        _finite(DOCS, tokenizer, small)


def test_argument_errors(tokenizer, spec):
    with pytest.raises(ValueError, match="shard_index"):
        _finite(DOCS, tokenizer, spec, shard_index=2, shard_count=2)
    no_eos = data.DataSpec(
        vocab_size=VOCAB, pad_id=0, eos_id=None, token_bytes_V=spec.token_bytes_V
    )
    with pytest.raises(ValueError, match="add_eos"):
        _finite(DOCS, tokenizer, no_eos)


# ---------------------------------------------------------------------------------------- order


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _make_train(tokenizer, spec, seed, **kwargs):
    return data.make_pipeline(
        DOCS, tokenizer, spec, seq_len=SEQ_LEN, batch_size=BATCH, seed=seed, **kwargs
    )


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_determinism_and_seed(tokenizer, spec):
    a = _take(_make_train(tokenizer, spec, seed=1), 6)
    b = _take(_make_train(tokenizer, spec, seed=1), 6)
    c = _take(_make_train(tokenizer, spec, seed=2), 6)
    _assert_batches_equal(a, b)
    assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c, strict=True))


def test_repeats_forever_with_new_order_per_epoch(tokenizer, spec):
    docs = DOCS[:4]
    it = data.make_pipeline(docs, tokenizer, spec, seq_len=SEQ_LEN, batch_size=1, seed=0)
    stream = np.concatenate([b["inputs"][0] for b in _take(it, 60)])
    firsts = [_direct_tokens(tokenizer, d, spec.eos_id)[:3] for d in docs]
    assert len(stream) == 60 * SEQ_LEN  # never ends, never pads
    assert all(
        any(np.array_equal(stream[i : i + 3], f) for i in range(len(stream))) for f in firsts
    )


def test_iterator_state_roundtrip(tokenizer, spec):
    it = _make_train(tokenizer, spec, seed=3)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 4)
    resumed = _make_train(tokenizer, spec, seed=3)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 4), expected)


def test_iterator_state_roundtrip_with_workers(tokenizer, spec):
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # as absl.app.run does in engram_jax.train
    it = _make_train(tokenizer, spec, seed=3, worker_count=2)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 3)
    resumed = _make_train(tokenizer, spec, seed=3, worker_count=2)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 3), expected)


def test_sharding_disjoint_and_complete(tokenizer, spec):
    seen = []
    for shard in range(2):
        batches = _finite(DOCS, tokenizer, spec, shard_index=shard, shard_count=2, seed=4)
        docs, _ = _reassemble(batches, spec.eos_id)
        seen.append({tuple(d) for d in docs})
    everything = {tuple(_direct_tokens(tokenizer, d, spec.eos_id)) for d in DOCS}
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == everything


# ---------------------------------------------------------------------------------------- hash ids

LAYER_IDS = (3, 1)  # deliberately not sorted: hash_ids follows this order


@pytest.fixture(scope="module")
def engram(tokenizer, spec, tmp_path_factory):
    return data.make_engram_hash_spec(
        tokenizer,
        spec,
        vocab_bases=(101, 211),
        max_ngram=3,
        heads_per_ngram=2,
        layer_ids=LAYER_IDS,
        seed=0,
        cache_dir=str(tmp_path_factory.mktemp("compress")),
    )


def test_hash_ids_match_hasher_on_compressed_inputs(tokenizer, spec, engram):
    """THE acceptance test: the model's hash ids are NgramHasher(compress(inputs), segment_ids)."""
    it = _make_train(tokenizer, spec, seed=5, engram=engram)
    batches = _take(it, 8)
    assert max(int(b["segment_ids"].max()) for b in batches) > 1  # document boundaries occur
    for batch in batches:
        hash_ids = batch["hash_ids"]
        assert hash_ids.dtype == np.int32
        assert hash_ids.shape == (BATCH, len(LAYER_IDS), SEQ_LEN, 2 * 2)
        compressed_BT = engram.compressor.old_to_new[batch["inputs"]]  # [B, T]
        for slot, layer in enumerate(LAYER_IDS):
            expected_BTM = engram.hasher(compressed_BT, layer, segment_ids=batch["segment_ids"])
            np.testing.assert_array_equal(hash_ids[:, slot], expected_BTM)


def test_hash_ids_stop_at_document_boundaries(tokenizer, spec, engram):
    """Each segment hashes as if it were alone in a row (windows never see the previous doc)."""
    batches = _finite(DOCS[:8], tokenizer, spec, shuffle=False, engram=engram)
    pad_compressed = int(engram.compressor.old_to_new[spec.pad_id])
    assert engram.hasher.pad_id == pad_compressed
    for batch in batches:
        for row in range(batch["inputs"].shape[0]):
            seg_T = batch["segment_ids"][row]
            for s in np.unique(seg_T):
                sel_T = seg_T == s
                alone_1X = engram.compressor.old_to_new[batch["inputs"][row][sel_T]][None]  # [1, X]
                for slot, layer in enumerate(LAYER_IDS):
                    np.testing.assert_array_equal(
                        batch["hash_ids"][row, slot][sel_T], engram.hasher(alone_1X, layer)[0]
                    )


def test_hash_spec_must_match_tokenizer(tokenizer, spec, engram, tmp_path):
    other = data.load_or_train_tokenizer("", DOCS[:10], 280, str(tmp_path))
    with pytest.raises(ValueError, match="engram.compressor"):
        _finite(DOCS, other, data.make_data_spec(other), engram=engram)
    wrong_pad = data.EngramHashSpec(
        engram.compressor,
        type(engram.hasher)(
            (101, 211),
            3,
            2,
            LAYER_IDS,
            engram.compressor.compressed_vocab_size,
            int(engram.compressor.old_to_new[spec.pad_id]) + 1,
        ),
        LAYER_IDS,
    )
    with pytest.raises(ValueError, match="compressed pad id"):
        _finite(DOCS, tokenizer, spec, engram=wrong_pad)


# ---------------------------------------------------------------------------------------- specials

_DEEPSEEK = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>")


def _tokenizer_with_specials(specials):
    """A real byte-level BPE whose first ids are `specials`, as tokenizers of other families
    (DeepSeek-V3, Llama 3, GPT-2, T5, BERT, Gemma) carry them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(DOCS[:10], trainer=trainer)
    return tokenizer


@pytest.mark.parametrize(
    "specials, expected",
    [
        (_DEEPSEEK, (2, 1, 0)),  # DeepSeek-V3: bos 0, eos 1, pad 2
        (("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"), (2, 1, 0)),
        (("<pad>", "</s>", "<unk>"), (0, 1, None)),  # T5
        (("[PAD]", "[UNK]", "[CLS]", "[SEP]"), (0, 3, 2)),  # BERT
        (("<pad>", "<eos>", "<bos>"), (0, 1, 2)),  # Gemma
        (("<unk>", "<s>", "</s>"), (2, 2, 1)),  # Llama 2: no pad, so pad = eos (warned)
    ],
)
def test_special_token_families(specials, expected, caplog):
    tokenizer = _tokenizer_with_specials(specials)
    with caplog.at_level("WARNING", logger="engram_jax"):
        spec = data.make_data_spec(tokenizer, vocab_size=320)
    assert (spec.pad_id, spec.eos_id, spec.bos_id) == expected
    assert ("no recognisable pad token" in caplog.text) == ("<unk>" in specials[0])


def test_deepseek_specials_in_the_pipeline():
    """Documents end with DeepSeek's eos (id 1) and padding holds its pad (id 2), not its bos."""
    tokenizer = _tokenizer_with_specials(_DEEPSEEK)
    spec = data.make_data_spec(tokenizer, pad_id=-1)
    batches = _finite(DOCS[:3], tokenizer, spec, shuffle=False)
    targets = np.concatenate([b["targets"].ravel() for b in batches])
    inputs = np.concatenate([b["inputs"].ravel() for b in batches])
    mask = np.concatenate([b["loss_mask"].ravel() for b in batches])
    assert np.sum(targets[mask > 0] == 1) == 3  # one eos per document
    assert np.all(inputs[mask == 0] == 2) and np.any(mask == 0)
    assert not np.any(inputs == 0)  # bos is never written


def test_missing_specials_warn_and_name_the_config_keys(caplog):
    tokenizer = _tokenizer_with_specials(())
    with caplog.at_level("WARNING", logger="engram_jax"):
        spec = data.make_data_spec(tokenizer)
    assert (spec.pad_id, spec.eos_id, spec.bos_id) == (0, None, None)
    assert "no recognisable eos token" in caplog.text and "eos_token" in caplog.text
    assert "no recognisable pad token" in caplog.text and "model.pad_id" in caplog.text


def test_explicit_eos_token():
    tokenizer = _tokenizer_with_specials(("<|im_end|>", "<|pad|>"))
    assert data.make_data_spec(tokenizer, eos_token="<|im_end|>").eos_id == 0
    with pytest.raises(ValueError, match=r"eos_token: got '</s>'.*\['<\|im_end\|>', '<\|pad\|>'\]"):
        data.make_data_spec(tokenizer, eos_token="</s>")


# ---------------------------------------------------------------------------------------- encodings


def test_non_utf8_and_broken_gzip_files_are_named(tmp_path):
    # The bad byte sits past the reader's first 1 MiB chunk, right after a 2-byte character cut
    # by the chunk boundary, so the offset must count across chunks.
    prefix = ("a" * ((1 << 20) - 1) + "é").encode("utf-8")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(prefix + b" ok \xff rest")
    offset = len(prefix) + 4
    with pytest.raises(ValueError, match=rf"latin1.txt: invalid UTF-8 at byte offset {offset} "):
        data.load_documents(str(bad))
    zipped = tmp_path / "latin1.jsonl.gz"
    zipped.write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'))
    with pytest.raises(ValueError, match="latin1.jsonl.gz: invalid UTF-8 at byte offset 28 of the"):
        data.load_documents(str(zipped))
    not_gzip = tmp_path / "plain.txt.gz"
    not_gzip.write_text("just text")
    with pytest.raises(ValueError, match="plain.txt.gz: not a readable gzip file"):
        data.load_documents(str(not_gzip))
    truncated = tmp_path / "cut.txt.gz"
    truncated.write_bytes(gzip.compress(b"x" * 1000)[:20])
    with pytest.raises(ValueError, match="cut.txt.gz: not a readable gzip file.*EOFError"):
        data.load_documents(str(truncated))
    misnamed = tmp_path / "zipped.txt"
    misnamed.write_bytes(gzip.compress(b"text"))
    with pytest.raises(ValueError, match="zipped.txt: invalid UTF-8 at byte offset 1 .*name it"):
        data.load_documents(str(misnamed))
