"""The experiment's copy of a corpus: the train documents, the held-out tail of the text and one
tokenizer every run shares, written once into the workdir."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import ml_collections

from engram_jax import data as data_lib
from engram_jax.experiments.options import Options


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The experiment's copy of a corpus: the train documents and the held-out tail.

    `path` is a JSONL file of the train documents and `eval_path` one of the held-out text (the
    trainer's `data_path` and `eval_data_path`); `tokenizer_path` is one BPE trained on the train
    documents and shared by every run (losses of all runs are in the same tokens).
    """

    path: str
    eval_path: str
    tokenizer_path: str
    num_train: int
    num_eval: int
    train_chars: int
    eval_chars: int
    eval_tokens_available: int  # Held-out tokens (eos included), the most an evaluation can read.


def split_text(documents: Sequence[str], holdout_fraction: float) -> tuple[list[str], list[str]]:
    """Holds out the last `holdout_fraction` of the characters of the documents, in order.

    The document where the cut falls is split at the first line start at or after the cut (or at
    the cut itself if no line break follows), so one long document (a whole book) works too.

    Raises:
      ValueError: either side would be empty.
    """
    total = sum(len(d) for d in documents)
    cut = total - int(round(holdout_fraction * total))
    seen = 0
    for index, document in enumerate(documents):
        if seen + len(document) > cut:
            offset = cut - seen
            if offset > 0 and document[offset - 1] != "\n":  # not at a line start: move to one
                newline = document.find("\n", offset)
                offset = newline + 1 if newline >= 0 else offset
            head, tail = document[:offset], document[offset:]
            train = list(documents[:index]) + ([head] if head.strip() else [])
            held_out = ([tail] if tail.strip() else []) + list(documents[index + 1 :])
            break
        seen += len(document)
    else:
        train, held_out = list(documents), []
    if not train or not held_out:
        raise ValueError(
            f"--holdout_fraction={holdout_fraction}: leaves {len(train)} train and "
            f"{len(held_out)} held-out documents out of {len(documents)} ({total} characters); "
            "expected both sides non-empty"
        )
    return train, held_out


def prepare_corpus(
    data_path: str, holdout_fraction: float, workdir: str, vocab_size: int
) -> tuple[Corpus, list[str], list[str]]:
    """Writes `<workdir>/data/corpus.jsonl` and `tokenizer.json` once; later calls reuse them.

    Returns the corpus and its (train, held-out) documents.

    Raises:
      ValueError: the workdir already holds a corpus made from other data or settings.
    """
    documents = data_lib.load_documents(data_path)
    digest = hashlib.sha256()
    for document in documents:
        digest.update(hashlib.sha256(document.encode("utf-8")).digest())
    source = {
        "data_path": os.path.abspath(data_path),
        "documents_sha256": digest.hexdigest(),
        "holdout_fraction": holdout_fraction,
        "vocab_size": vocab_size,
    }
    directory = os.path.join(workdir, "data")
    os.makedirs(directory, exist_ok=True)
    source_path = os.path.join(directory, "source.json")
    corpus_path = os.path.join(directory, "corpus.jsonl")
    eval_path = os.path.join(directory, "eval.jsonl")
    tokenizer_path = os.path.join(directory, "tokenizer.json")
    if os.path.exists(source_path):
        with open(source_path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved != source:
            differing = sorted(k for k in source if saved.get(k) != source[k])
            was = {k: saved.get(k) for k in differing}
            now = {k: source[k] for k in differing}
            raise ValueError(
                f"{workdir}: made from other data or settings (saved {was}, now {now}); use a "
                "new --workdir"
            )
    train, held_out = split_text(documents, holdout_fraction)
    paths = (corpus_path, eval_path, tokenizer_path)
    if not all(os.path.exists(path) for path in paths):
        for path, documents_of_split in ((corpus_path, train), (eval_path, held_out)):
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                for document in documents_of_split:
                    f.write(json.dumps({"text": document}) + "\n")
            os.replace(path + ".tmp", path)
        tokenizer = data_lib.load_or_train_tokenizer(
            "", train, vocab_size, cache_dir=os.path.join(directory, "tokenizer_cache")
        )
        tokenizer.save(tokenizer_path + ".tmp")
        os.replace(tokenizer_path + ".tmp", tokenizer_path)
        with open(source_path, "w", encoding="utf-8") as f:
            json.dump(source, f, indent=2)
    tokenizer = data_lib.load_tokenizer(tokenizer_path)
    encode = data_lib.make_encoder(tokenizer)
    eval_tokens = sum(len(encode(d)) + 1 for d in held_out)
    corpus = Corpus(
        path=corpus_path,
        eval_path=eval_path,
        tokenizer_path=tokenizer_path,
        num_train=len(train),
        num_eval=len(held_out),
        train_chars=sum(len(d) for d in train),
        eval_chars=sum(len(d) for d in held_out),
        eval_tokens_available=eval_tokens,
    )
    return corpus, train, held_out


def evaluated_text(held_out: Sequence[str], tokenizer_path: str, num_tokens: int) -> str:
    """The held-out text an evaluation of `num_tokens` target tokens scores, in order.

    The eval stream packs the held-out documents in order (eos after each); its targets are the
    tokens after the first of each document, so this decodes exactly those tokens (eos has no
    bytes): the bits-per-byte denominator and the compression floors see the same bytes.
    """
    tokenizer = data_lib.load_tokenizer(tokenizer_path)
    encode = data_lib.make_encoder(tokenizer)
    pieces, left = [], num_tokens
    for document in held_out:
        ids = encode(document)
        targets = ids[1:]  # inputs x_0..x_{n-1}, targets x_1..x_n (x_n is the eos)
        take = min(left, len(targets) + 1)
        pieces.append(tokenizer.decode(targets[:take].tolist()) if take else "")
        left -= take
        if left <= 0:
            break
    return "".join(pieces)


def setup(options: Options, base: ml_collections.ConfigDict) -> tuple[Corpus, list[str], list[str]]:
    """Prepares the workdir's corpus and tokenizer; returns the corpus and its train and
    held-out documents."""
    os.makedirs(options.workdir, exist_ok=True)
    corpus, train, held_out = prepare_corpus(
        options.data_path, options.holdout_fraction, options.workdir, base.model.vocab_size
    )
    print(
        f"corpus {options.data_path}: {corpus.num_train} train / {corpus.num_eval} held-out "
        f"documents, {corpus.eval_tokens_available:,} held-out tokens",
        flush=True,
    )
    return corpus, train, held_out
