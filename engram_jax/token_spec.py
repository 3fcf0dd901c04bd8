"""What a tokenizer's ids mean to the pipeline and the model: the pad, eos and bos ids (found by
name among the tokenizer's specials, or configured) and each id's length in UTF-8 bytes (the
denominator of bits per byte), gathered in a `DataSpec`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, pre_tokenizers

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"  # id 0 in tokenizers trained here
EOS_TOKEN = "<eos>"  # id 1 in tokenizers trained here
# Special-token names recognised by text, first match wins. DeepSeek-V3 spells its specials with
# FULLWIDTH VERTICAL LINE (U+FF5C) and LOWER ONE EIGHTH BLOCK (U+2581); some conversions use "|".
_PAD_NAMES = (
    PAD_TOKEN,
    "[PAD]",
    "<|pad|>",
    "<|padding|>",
    "<\uff5c\u2581pad\u2581\uff5c>",
    "<|\u2581pad\u2581|>",
    "<|finetune_right_pad_id|>",
)
_EOS_NAMES = (
    EOS_TOKEN,
    "</s>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eos|>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
    "<|end\u2581of\u2581sentence|>",
    "[SEP]",
)
_BOS_NAMES = (
    "<bos>",
    "<s>",
    "<|begin_of_text|>",
    "<|startoftext|>",
    "<|bos|>",
    "<\uff5cbegin\u2581of\u2581sentence\uff5c>",
    "<|begin\u2581of\u2581sentence|>",
    "[CLS]",
)


def _special_token_ids(tokenizer: tokenizers.Tokenizer) -> set[int]:
    return {i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}


def _find_token(tokenizer: tokenizers.Tokenizer, names: Sequence[str]) -> int | None:
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def token_byte_lengths(
    tokenizer: tokenizers.Tokenizer, vocab_size: int | None = None
) -> np.ndarray:
    """UTF-8 byte length of every token, for bits-per-byte.

    Exact for byte-level BPE (each character of a token string stands for one byte). For other
    tokenizers it is the byte length of `decode([id])`, which is approximate where decoding a lone
    token drops or adds spaces. Special tokens count 0 bytes.

    Args:
      tokenizer: the tokenizer.
      vocab_size: length of the table (>= the tokenizer's size); ids past the tokenizer get 0.

    Returns:
      int32 array [V].
    """
    num_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    size = num_tokens if vocab_size is None else vocab_size
    if size < num_tokens:
        raise ValueError(f"vocab_size: got {size}; the tokenizer has {num_tokens} tokens")
    lengths_V = np.zeros((size,), np.int32)
    special = _special_token_ids(tokenizer)
    added = tokenizer.get_added_tokens_decoder()
    byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    for token_id in range(num_tokens):
        if token_id in special:
            continue
        if token_id in added:
            lengths_V[token_id] = len(added[token_id].content.encode("utf-8"))
            continue
        token = tokenizer.id_to_token(token_id)
        if token is None:
            continue
        if byte_level and all(ch in alphabet for ch in token):
            lengths_V[token_id] = len(token)
        else:
            text = tokenizer.decode([token_id], skip_special_tokens=False)
            lengths_V[token_id] = len(text.encode("utf-8"))
    return lengths_V


@dataclasses.dataclass(frozen=True, eq=False)
class DataSpec:
    """What the model and the metrics need to know about the tokens.

    Attributes:
      vocab_size: ids are checked to lie in [0, vocab_size) (the model's vocabulary, >= tokenizer).
      pad_id: raw id written at padding positions (Engram hashes its compressed id).
      eos_id: id appended to every document, or None when the tokenizer has none.
      token_bytes_V: int32 [vocab_size] UTF-8 byte length per token (`token_byte_lengths`).
      bos_id: the tokenizer's begin-of-sequence id, or None; recognised for the start-up report
        only (documents are separated by eos, no bos is added).
    """

    vocab_size: int
    pad_id: int
    eos_id: int | None
    token_bytes_V: np.ndarray
    bos_id: int | None = None


def _describe(tokenizer: tokenizers.Tokenizer, token_id: int | None) -> str:
    if token_id is None:
        return "none"
    return f"{token_id} {tokenizer.id_to_token(token_id)!r}"


def _special_names(tokenizer: tokenizers.Tokenizer) -> list[str]:
    """The tokenizer's special tokens, for error messages (at most 12)."""
    added = tokenizer.get_added_tokens_decoder()
    names = [added[i].content for i in sorted(added) if added[i].special]
    return names[:12] + (["..."] if len(names) > 12 else [])


def _eos_id(tokenizer: tokenizers.Tokenizer, eos_token: str) -> int | None:
    """The eos id: `eos_token`'s when given (it must exist), else the first recognised name."""
    if not eos_token:
        return _find_token(tokenizer, _EOS_NAMES)
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
        raise ValueError(
            f"eos_token: got {eos_token!r}, which the tokenizer does not have; expected one "
            f'of its tokens (special tokens: {_special_names(tokenizer)}) or "" to recognise '
            "it by name"
        )
    return eos_id


def _resolve_pad_id(
    tokenizer: tokenizers.Tokenizer, pad_id: int | None, eos_id: int | None
) -> tuple[int, bool]:
    """(pad id, whether the tokenizer or the config chose it) for config `pad_id` (None or -1:
    the tokenizer's pad token, else its eos, else 0)."""
    own_pad = _find_token(tokenizer, _PAD_NAMES)
    if own_pad is None and tokenizer.padding is not None:
        own_pad = tokenizer.padding["pad_id"]
    if pad_id == -1:
        pad_id = None
    if own_pad is not None and pad_id is not None and own_pad != pad_id:
        raise ValueError(
            f"pad_id: got {pad_id}; the tokenizer's pad token has id {own_pad} "
            f"(set model.pad_id={own_pad} or -1)"
        )
    if own_pad is not None:
        return own_pad, True
    if pad_id is not None:
        return pad_id, True
    return (eos_id if eos_id is not None else 0), False


def resolve_pad_id(tokenizer: tokenizers.Tokenizer, pad_id: int, eos_token: str = "") -> int:
    """The raw pad id that config `model.pad_id` (-1: the tokenizer's) means with this tokenizer,
    as `make_data_spec` resolves it, without its log lines."""
    return _resolve_pad_id(tokenizer, pad_id, _eos_id(tokenizer, eos_token))[0]


def make_data_spec(
    tokenizer: tokenizers.Tokenizer,
    *,
    pad_id: int | None = None,
    vocab_size: int | None = None,
    eos_token: str = "",
) -> DataSpec:
    """Reads pad/eos/bos ids from the tokenizer and builds a `DataSpec`.

    Special tokens are recognised by their text: pad is the first of `<pad>`, `[PAD]`, `<|pad|>`,
    `<|padding|>`, DeepSeek's `<｜▁pad▁｜>`, Llama 3's `<|finetune_right_pad_id|>` (or the
    tokenizer's padding setting); eos the first of `<eos>`, `</s>`, `<|endoftext|>`,
    `<|end_of_text|>`, `<|eos|>`, `<｜end▁of▁sentence｜>`, `[SEP]`; bos the first of `<bos>`, `<s>`,
    `<|begin_of_text|>`, `<|startoftext|>`, `<|bos|>`, `<｜begin▁of▁sentence｜>`, `[CLS]`.

    Without a recognisable pad token the pad id falls back to the eos id, then to 0; without an
    eos token documents are packed with no separator and generation stops only at its token
    limit. Both cases log a warning naming the config key that sets the id.

    Args:
      tokenizer: the tokenizer.
      pad_id: raw pad id from the config (`model.pad_id`); None or -1 takes the tokenizer's. An
        explicit id must agree with the tokenizer's pad token if it has one.
      vocab_size: model vocabulary size (>= the tokenizer's size); None uses the tokenizer's size.
      eos_token: the eos token's text (config `eos_token`); "" recognises it by name.

    Raises:
      ValueError: a pad id conflicting with the tokenizer, an `eos_token` the tokenizer lacks, or
        ids outside the vocab.
    """
    num_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    size = num_tokens if vocab_size is None else vocab_size
    if size < num_tokens:
        raise ValueError(f"vocab_size: got {size}; expected >= the tokenizer's {num_tokens} tokens")
    eos_id = _eos_id(tokenizer, eos_token)
    if eos_id is None:
        logger.warning(
            "the tokenizer has no recognisable eos token (none of %s): documents are packed "
            "without a separator and generation stops only at max_tokens; set config "
            "eos_token (--config.eos_token=TEXT) to its text",
            ", ".join(_EOS_NAMES),
        )
    resolved_pad, chosen = _resolve_pad_id(tokenizer, pad_id, eos_id)
    if not chosen:
        logger.warning(
            "the tokenizer has no recognisable pad token (none of %s): padding uses id %s (%s); "
            "set config model.pad_id (--config.model.pad_id=ID) to choose another",
            ", ".join(_PAD_NAMES),
            _describe(tokenizer, resolved_pad),
            "its eos token" if resolved_pad == eos_id else "no eos token either",
        )
    if not 0 <= resolved_pad < size:
        raise ValueError(f"pad_id: got {resolved_pad}; expected an id in [0, {size})")
    bos_id = _find_token(tokenizer, _BOS_NAMES)
    logger.info(
        "tokenizer: %d tokens; pad %s, eos %s, bos %s",
        num_tokens,
        _describe(tokenizer, resolved_pad),
        _describe(tokenizer, eos_id),
        _describe(tokenizer, bos_id),
    )
    return DataSpec(
        vocab_size=size,
        pad_id=int(resolved_pad),
        eos_id=eos_id,
        token_bytes_V=token_byte_lengths(tokenizer, size),
        bos_id=bos_id,
    )
