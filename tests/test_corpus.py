"""engram_jax.corpus: streaming readers equal whole-file reads, per-process shards are disjoint
and complete, the train/eval split, the fingerprint, and exact resume of the lazy stream."""

from __future__ import annotations

import gzip
import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from absl import flags

from engram_jax import corpus, data, storage
from tests.gcs_emulator import gcs_emulator

_WORDS = ["alpha", "beta", "gamma", "delta", "café", "日本語", "naïve", "résumé", "yield"]


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        f"doc {i} " + " ".join(rng.choice(_WORDS, size=int(rng.integers(1, 30)))) for i in range(n)
    ]


def _write(path, docs):
    """Writes docs in the format named by the file's extension."""
    name = str(path)
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    elif name.endswith(".jsonl.gz"):
        path.write_bytes(
            gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
        )
    elif name.endswith(".parquet"):
        # Small row groups: parts cut through them.
        pq.write_table(pa.table({"text": docs}), name, row_group_size=7)
    elif name.endswith(".txt"):
        path.write_text("\n\n\n".join(docs), encoding="utf-8")
    elif name.endswith(".txt.gz"):
        path.write_bytes(gzip.compress("\n\n\n".join(docs).encode()))
    return name


def _whole_file(name: str) -> list[str]:
    """Independent reference: the whole file read at once."""
    if name.endswith(".parquet"):
        return [d for d in pq.read_table(name).column("text").to_pylist() if d is not None]
    with open(name, "rb") as f:
        raw = f.read()
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
    text = raw.decode("utf-8")
    if ".jsonl" in name:
        return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    return [d for d in re.split(r"\n[ \t]*\n(?:[ \t]*\n)+", text) if d.strip()]


FORMATS = ["a.jsonl", "a.jsonl.gz", "a.parquet", "a.txt", "a.txt.gz"]


@pytest.mark.parametrize("name", FORMATS)
def test_streaming_equals_whole_file_and_parts_partition_it(tmp_path, name):
    docs = _docs(40)
    path = _write(tmp_path / name, docs)
    assert list(corpus.piece_documents(corpus.Piece(path))) == _whole_file(path) == docs
    # Any cut into parts: disjoint, complete, and for range formats in file order.
    for parts in (2, 3, 5):
        pieces = [corpus.Piece(path, i, parts) for i in range(parts)]
        per_part = [list(corpus.piece_documents(p)) for p in pieces]
        assert sorted(sum(per_part, [])) == sorted(docs)
        assert all(p for p in per_part)
        if name in ("a.jsonl", "a.parquet"):
            assert sum(per_part, []) == docs
        refined = corpus.refine_pieces(pieces[:1], 4)
        assert sorted(sum((list(corpus.piece_documents(p)) for p in refined), [])) == sorted(
            per_part[0]
        )


def test_text_chunks_equal_one_split():
    rng = np.random.default_rng(1)
    pieces = ["word", "\n", "\n\n", " \n", "\t\n\n", "\n \n \n", "x y"]
    for _ in range(200):
        text = "".join(rng.choice(pieces, size=int(rng.integers(1, 40))))
        for chunk in (1, 2, 5):
            streamed = list(corpus.iter_text_documents(io.StringIO(text), chunk_chars=chunk))
            assert streamed == corpus.split_text_documents(text), (text, chunk)


def test_process_shards_are_disjoint_and_complete(tmp_path):
    """By file (files >= processes) and by part (one file), checked on the documents each saw."""
    docs = _docs(60)
    for i, chunk in enumerate(np.array_split(np.arange(60), 5)):
        _write(tmp_path / f"f{i}.jsonl", [docs[j] for j in chunk])
    single = tmp_path / "single"
    single.mkdir()
    _write(single / "one.parquet", docs)
    for data_path, count in ((str(tmp_path / "*.jsonl"), 3), (str(single), 4)):
        c = corpus.Corpus(data_path, eval_fraction=0.2)
        seen = [
            list(c.stream("all", shard_index=i, shard_count=count, num_epochs=1))
            for i in range(count)
        ]
        assert all(seen)
        flat = sum(seen, [])
        assert len(flat) == len(set(flat)) and set(flat) == set(docs)
        # The split is a partition too, decided per document by every process alike.
        train = {
            d
            for i in range(count)
            for d in c.stream("train", shard_index=i, shard_count=count, num_epochs=1)
        }
        held = {
            d
            for i in range(count)
            for d in c.stream("eval", shard_index=i, shard_count=count, num_epochs=1)
        }
        assert not train & held and train | held == set(docs) and 0 < len(held) < 30


def test_gs_corpus_lists_reads_and_shards_like_a_local_one(tmp_path):
    """A corpus in a bucket of the local GCS emulator: a directory, a `*` glob and a `**` glob
    (which epath refuses on GCS) list the same files as locally; every format reads the same
    documents with the same fingerprint; the per-process shards are disjoint and complete."""
    docs = _docs(60, seed=4)
    local = tmp_path / "corpus"
    (local / "nested").mkdir(parents=True)
    names = ["a.jsonl", "b.parquet", "c.txt.gz", "nested/d.jsonl.gz", "nested/e.txt"]
    for name, chunk in zip(names, np.array_split(np.arange(60), len(names)), strict=True):
        _write(local / name, [docs[j] for j in chunk])
    (local / "notes.md").write_text("not a corpus file")
    with gcs_emulator() as bucket:
        for name in [*names, "notes.md"]:
            storage.copy_file(str(local / name), f"{bucket}/corpus/{name}")
        root = f"{bucket}/corpus"
        assert corpus.list_files(root) == [f"{root}/{n}" for n in names]
        assert corpus.list_files(f"{root}/*.jsonl") == [f"{root}/a.jsonl"]
        assert corpus.list_files(f"{root}/**/*.jsonl*") == [
            f"{root}/a.jsonl",
            f"{root}/nested/d.jsonl.gz",
        ]
        with pytest.raises(FileNotFoundError, match="matches no files"):
            corpus.list_files(f"{root}/**/*.parquet.gz")
        remote, here = corpus.Corpus(root, 0.2), corpus.Corpus(str(local), 0.2)
        assert remote.fingerprint == here.fingerprint
        assert list(remote.documents()) == list(here.documents()) == docs
        for count in (2, 7):  # by file, and by part of each file
            seen = [
                list(remote.stream("train", shard_index=i, shard_count=count, num_epochs=1))
                for i in range(count)
            ]
            assert all(seen)
            flat = sum(seen, [])
            assert len(flat) == len(set(flat)) and set(flat) == set(here.documents("train"))


def test_empty_split_is_named(tmp_path):
    path = _write(tmp_path / "tiny.jsonl", _docs(2))
    stream = corpus.Corpus(path, eval_fraction=1e-9).stream("eval", shard_index=1, shard_count=2)
    with pytest.raises(
        ValueError, match=r"tiny.jsonl.*eval split, process 1 of 2.*no non-blank eval"
    ):
        next(iter(stream))


def test_fingerprint_is_cheap_and_sees_names_sizes_and_content(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    docs = _docs(20)
    _write(a / "x.jsonl", docs)
    _write(b / "x.jsonl", docs)
    fp = corpus.corpus_fingerprint
    assert fp([str(a / "x.jsonl")]) == fp([str(b / "x.jsonl")])  # moving the corpus keeps it
    _write(b / "x.jsonl", docs[:-1] + ["other text " + docs[-1][11:]])
    assert fp([str(a / "x.jsonl")]) != fp([str(b / "x.jsonl")])
    (b / "x.jsonl").rename(b / "y.jsonl")
    _write(b / "x.jsonl", docs)
    assert fp([str(b / "x.jsonl"), str(b / "y.jsonl")]) != fp([str(b / "x.jsonl")])


def test_sample_is_bounded(tmp_path):
    for i in range(3):
        _write(tmp_path / f"s{i}.jsonl", _docs(50, seed=i))
    c = corpus.Corpus(str(tmp_path), eval_fraction=0.1)
    sample = list(c.sample(600))
    # 200 bytes from the start of each file, passed by at most one document per file.
    longest = max(len(d.encode()) for d in sample)
    assert 600 <= sum(len(d.encode()) for d in sample) <= 600 + 3 * longest
    assert {d for d in sample if d.startswith("doc 0 ")} == {
        d for d in c.documents("train") if d.startswith("doc 0 ")
    }
    assert set(sample) <= set(c.documents("train"))


# ---------------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    docs = _docs(80, seed=3)
    _write(root / "a.parquet", docs[:30])
    _write(root / "b.jsonl", docs[30:60])
    _write(root / "c.txt.gz", docs[60:])
    tokenizer = data.load_or_train_tokenizer("", docs, 300, str(root / "tok"))
    return corpus.Corpus(str(root), eval_fraction=0.1), tokenizer, data.make_data_spec(tokenizer)


def _pipeline(c, tokenizer, spec, **kwargs):
    return data.make_pipeline(
        c.stream("train", seed=5, shuffle=True),
        tokenizer,
        spec,
        seq_len=16,
        batch_size=2,
        seed=5,
        shuffle_window=8,
        **kwargs,
    )


@pytest.mark.parametrize("kwargs", [{}, {"prefetch": 2}, {"worker_count": 2}], ids=str)
def test_stream_pipeline_resumes_exactly(setup, kwargs):
    c, tokenizer, spec = setup
    if kwargs.get("worker_count") and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # as absl.app.run does in engram_jax.train
    it = _pipeline(c, tokenizer, spec, **kwargs)
    for _ in range(70):  # past the end of the first epoch (~55 batches)
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(6)]
    resumed = _pipeline(c, tokenizer, spec, **kwargs)
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(6)], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_stream_epochs_hold_each_train_document_once(setup):
    c, _, _ = setup
    stream = c.stream("train", seed=1, shuffle=True, num_epochs=2)
    seen = list(stream)
    train = list(c.documents("train"))
    half = len(seen) // 2
    assert sorted(seen[:half]) == sorted(train) == sorted(seen[half:])
    assert seen[:half] != seen[half:]  # a new piece order per epoch
