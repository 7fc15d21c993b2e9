"""Text examples as token ids held in memory, and batches padded to a few lengths.

A text split is tokenised once, with a Hugging Face ``tokenizer.json`` read by the
``tokenizers`` package (no ``transformers``, no torch): every example's ids, special tokens
included, truncated to ``max_length``, kept ragged in memory as one flat int32 array and
offsets (:class:`TokenizedText`). The tokenizer's own padding and truncation settings are
replaced (:func:`load_tokenizer`): all-MiniLM-L6-v2's ``tokenizer.json`` pads every
sequence to 128, which would make every example look 128 tokens long.

**Batches** (:func:`batch`): ``input_ids`` int32 ``[b, L]`` (the ids, then the pad id),
``attention_mask`` int32 ``[b, L]`` (1 on tokens, 0 on padding) and ``label`` int32
``[b]``, where ``L`` is the smallest bucket that holds the longest sequence of the *global*
batch (:func:`bucket_length`), so every process pads its rows to the same length and a
run compiles one step per bucket, not one per length. Buckets are
``sorted({min(b, max_length) for b in bucket_lengths} | {max_length})``: padding to 128
a batch whose longest article has 40 tokens would cost three times the attention's work.

The pad id is the tokenizer's padding id if it has one, else the id of ``[PAD]``, else 0;
a model that reads ``attention_mask`` ignores it either way.

A ``.gguf`` file (llama.cpp's format, e.g. Gemma 3's) names the SentencePiece vocabulary
in its metadata, read by :mod:`jaxkd.models.spm` exactly as llama.cpp tokenizes
(:class:`GgufTokenizer`; ``<bos>`` first, pad id 0).

**Language modelling** (``config.data.task='causal_lm'``): each document is tokenised
whole, then cut into consecutive windows of ``max_length`` tokens (:func:`windows`), each
an example starting with the tokenizer's ``<bos>``; no window mixes two documents.

``config.data.tokenizer='bytes'`` needs no file: every UTF-8 byte is a token (ByT5's
vocabulary, Xue et al. 2022), ids ``[PAD]`` 0, ``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]`` 3, then
the 256 bytes (vocabulary 260), each sequence ``[CLS] bytes [SEP]`` (:func:`byte_tokenizer`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxkd.data.sources import UNLABELLED
from jaxkd.schema import ConfigError, MissingError

BYTES = "bytes"  # config.data.tokenizer: the built-in byte-level tokenizer
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def byte_tokenizer() -> Any:
    """The ``tokenizers.Tokenizer`` of ``config.data.tokenizer='bytes'`` (module docstring):
    byte-level pre-tokenization and a BPE model without merges, so each byte is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(
        [*SPECIAL, *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tokenizer


class GgufTokenizer:
    """The SentencePiece tokenizer of a GGUF file with the part of the ``tokenizers``
    API that :func:`tokenize` uses (``encode_batch``, ``get_vocab_size``)."""

    @dataclasses.dataclass(frozen=True)
    class Encoding:
        ids: list[int]

    def __init__(self, path: str, max_length: int | None):
        stat = os.stat(path)
        self.spm = _gguf_vocabulary(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
        self.max_length = max_length

    def get_vocab_size(self) -> int:
        return self.spm.vocab_size

    def encode_batch(self, texts: Sequence[str]) -> list[GgufTokenizer.Encoding]:
        return [self.Encoding(self.spm.encode(t)[:self.max_length]) for t in texts]


@functools.lru_cache(maxsize=4)
def _gguf_vocabulary(path: str, size: int, mtime_ns: int) -> Any:
    """The SentencePiece vocabulary of a GGUF file, read once per process and file version
    (the ``gguf`` package parses Gemma's 262,144 tokens in Python, seconds each time)."""
    del size, mtime_ns  # only keys of the cache
    from jaxkd.models import spm

    return spm.from_gguf(path)


def load_tokenizer(path: str, max_length: int | None, field: str = "config.data.tokenizer"
                   ) -> tuple[Any, int]:
    """``(tokenizer, pad_id)``: the ``tokenizers.Tokenizer`` of ``path`` (a HF
    ``tokenizer.json``, ``'bytes'``: :func:`byte_tokenizer`, or a ``.gguf`` file:
    :class:`GgufTokenizer`) without padding and truncating to ``max_length`` tokens
    (special tokens included; None: whole documents), and the id that pads (see the
    module). Errors name ``field``."""
    from tokenizers import Tokenizer

    if path == BYTES:
        tokenizer = byte_tokenizer()
        if max_length is not None:
            tokenizer.enable_truncation(max_length)
        return tokenizer, 0
    if not path:
        raise ConfigError(f"{field} is empty: a text dataset needs a HF tokenizer.json "
                          f"(or {BYTES!r})")
    if not os.path.isfile(path):
        raise MissingError(f"{field}={path!r} does not exist")
    if path.endswith(".gguf"):
        return GgufTokenizer(path, max_length), 0
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # the Rust parser's own reasons
        detail = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"{field}={path!r} is not a HF tokenizer.json "
                          f"({type(e).__name__}: {detail})") from None
    if tokenizer.padding is not None:
        pad = int(tokenizer.padding["pad_id"])
    else:
        pad = tokenizer.token_to_id("[PAD]") or 0
    tokenizer.no_padding()
    if max_length is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(max_length)
    return tokenizer, pad


def file_sha256(path: str) -> str:
    """sha256 of the tokenizer file (of the built-in tokenizer's JSON for ``'bytes'``),
    computed once per process and file version (a GGUF file is hundreds of MB)."""
    if path == BYTES:
        return hashlib.sha256(byte_tokenizer().to_str().encode()).hexdigest()
    stat = os.stat(path)
    return _sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # only keys of the cache
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class TokenizedText:
    """Every example of a split as token ids, in memory.

    Example ``i`` is ``ids[offsets[i]:offsets[i + 1]]`` (at most ``max_length`` ids) with
    label ``labels[i]`` (-1 = unlabelled). As a :class:`jaxkd.data.sources.Source`,
    ``read`` gives the ids padded to ``max_length``.
    """

    ids: np.ndarray  # int32 [total ids]
    offsets: np.ndarray  # int64 [n + 1]
    labels: np.ndarray  # int32 [n]
    max_length: int
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self, indices: np.ndarray) -> np.ndarray:
        """Tokens of each example ``indices``, ``[len(indices)]``."""
        indices = np.asarray(indices, np.int64)
        return self.offsets[indices + 1] - self.offsets[indices]

    def padded(self, indices: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)``, int32 ``[len(indices), length]``: each example's ids then the pad
        id, and 1 on its tokens, 0 after. ``length`` must hold the longest of them."""
        indices = np.asarray(indices, np.int64)
        lengths = self.lengths(indices)
        if len(indices) and lengths.max() > length:
            raise ValueError(f"a sequence of {lengths.max()} tokens does not fit {length}")
        mask = np.arange(length)[None, :] < lengths[:, None]
        ids = np.full((len(indices), length), self.pad_id, np.int32)
        # Token t of row r sits at ids[offsets[indices[r]] + t]: one gather for the batch.
        rows, cols = np.nonzero(mask)
        ids[rows, cols] = self.ids[self.offsets[indices][rows] + cols]
        return ids, mask.astype(np.int32)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ids padded to max_length, labels)``: the Source protocol."""
        ids, _ = self.padded(indices, self.max_length)
        return ids, self.labels[np.asarray(indices, np.int64)]

    def subset(self, indices: np.ndarray) -> TokenizedText:
        """The examples ``indices``, in that order."""
        indices = np.asarray(indices, np.int64)
        lengths = self.lengths(indices)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        rows = np.repeat(self.offsets[indices] - offsets[:-1], lengths) + np.arange(
            offsets[-1])
        return dataclasses.replace(self, ids=self.ids[rows], offsets=offsets,
                                   labels=self.labels[indices])


def tokenize(tokenizer: Any, texts: Sequence[str], labels: np.ndarray | None, *,
             max_length: int | None, pad: int = 0) -> TokenizedText:
    """``texts`` tokenised in one batch call (``labels`` None: every label -1);
    ``max_length`` None keeps whole documents (then cut them with :func:`windows`)."""
    encodings = tokenizer.encode_batch(list(texts))
    lengths = np.array([len(e.ids) for e in encodings], np.int64)
    if max_length is None:
        max_length = int(lengths.max(initial=1))
    elif len(lengths) and lengths.max() > max_length:
        raise ValueError(f"the tokenizer gave {lengths.max()} tokens, more than max_length="
                         f"{max_length}: it must truncate (load it with load_tokenizer)")
    ids = np.fromiter((i for e in encodings for i in e.ids), np.int32, int(lengths.sum()))
    if labels is None:
        labels = np.full(len(texts), UNLABELLED, np.int32)
    return TokenizedText(ids=ids, offsets=np.concatenate([[0], np.cumsum(lengths)]),
                         labels=np.asarray(labels, np.int32), max_length=max_length,
                         pad_id=pad)


def windows(documents: TokenizedText, length: int) -> TokenizedText:
    """Each document cut into consecutive windows of ``length`` tokens, each an unlabelled
    example; windows of one token (nothing to predict) are dropped.

    When every document starts with the same token (the tokenizer's ``<bos>``), every
    window starts with it: a document ``[b, x_1, x_2, ...]`` becomes ``[b, x_1 ..
    x_{length-1}]``, ``[b, x_length ..]``, ... (a decoder trained with ``<bos>`` first,
    as Gemma, is lost without it: Gemma 3 270M's perplexity on BBC News test windows of
    128 tokens was 197 without, 29.5 with), and every ``x`` is predicted once. Otherwise
    the windows are plain consecutive slices."""
    firsts = documents.ids[documents.offsets[:-1][documents.lengths(
        np.arange(len(documents))) > 0]]
    bos = int(firsts[0]) if len(firsts) and (firsts == firsts[0]).all() else None
    step = length - 1 if bos is not None else length
    if step < 1:
        raise ValueError(f"windows of {length} tokens cannot hold <bos> and a token")
    pieces = []
    for begin, end in zip(documents.offsets[:-1], documents.offsets[1:], strict=True):
        body = documents.ids[int(begin) + (bos is not None):int(end)]
        for s in range(0, len(body), step):
            piece = body[s:s + step]
            window = piece if bos is None else np.concatenate([[bos], piece])
            if len(window) > 1:
                pieces.append(window.astype(np.int32))
    lengths = np.array([len(p) for p in pieces], np.int64)
    return TokenizedText(ids=np.concatenate(pieces) if pieces else np.zeros(0, np.int32),
                         offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                         labels=np.full(len(lengths), UNLABELLED, np.int32),
                         max_length=length, pad_id=documents.pad_id)


def concatenate(parts: Sequence[TokenizedText]) -> TokenizedText:
    """``parts[0]``'s examples, then ``parts[1]``'s, ...: one index space."""
    first = parts[0]
    starts = np.cumsum([0] + [len(p.ids) for p in parts[:-1]])
    offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, starts,
                                                                        strict=True)])
    return dataclasses.replace(first, ids=np.concatenate([p.ids for p in parts]),
                               offsets=offsets.astype(np.int64),
                               labels=np.concatenate([p.labels for p in parts]))


def buckets(bucket_lengths: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The lengths batches are padded to: ``bucket_lengths`` capped at ``max_length``, and
    ``max_length`` itself, sorted."""
    return tuple(sorted({min(b, max_length) for b in bucket_lengths} | {max_length}))


def bucket_length(longest: int, bucket_lengths: Sequence[int], max_length: int) -> int:
    """The smallest bucket (:func:`buckets`) that holds ``longest`` tokens."""
    for length in buckets(bucket_lengths, max_length):
        if length >= longest:
            return length
    raise ValueError(f"{longest} tokens exceed max_length={max_length}")


def batch(source: TokenizedText, indices: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """``{'input_ids', 'attention_mask': int32 [b, length], 'label': int32 [b]}`` of the
    examples ``indices``."""
    ids, mask = source.padded(indices, length)
    return {"input_ids": ids, "attention_mask": mask,
            "label": source.labels[np.asarray(indices, np.int64)]}
