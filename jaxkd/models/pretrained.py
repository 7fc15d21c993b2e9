"""Pretrained BERT weights from a Hugging Face directory, read without PyTorch.

:func:`from_pretrained` reads an HF-format BERT directory (``config.json`` and
``model.safetensors``, e.g. a ``BertModel`` or ``BertForSequenceClassification`` checkpoint
or sentence-transformers' all-MiniLM-L6-v2) into a :class:`~jaxkd.models.bert.BertEncoder`
and its variables. Loading is a rename, because the module's parameter names mirror HF's:

==============================================  =============================================
HF tensor (``bert.`` prefix optional)           jaxkd parameter
==============================================  =============================================
``embeddings.word_embeddings.weight``           ``embeddings/word_embeddings/embedding``
``embeddings.LayerNorm.weight`` / ``.gamma``    ``embeddings/LayerNorm/scale``
``encoder.layer.{i}.attention.self.query.*``    ``layer{i}/attention/query/{kernel,bias}``
``encoder.layer.{i}.attention.output.dense.*``  ``layer{i}/attention/output/*``
``encoder.layer.{i}.attention.output.LayerNorm``  ``layer{i}/attention/LayerNorm``
``encoder.layer.{i}.intermediate.dense.*``      ``layer{i}/intermediate/*``
``encoder.layer.{i}.output.dense.*``            ``layer{i}/output/*``
``encoder.layer.{i}.output.LayerNorm.*``        ``layer{i}/LayerNorm/*``
``pooler.dense.*``                              ``pooler/*`` (with ``pooling='pooler'``)
==============================================  =============================================

PyTorch's ``nn.Linear`` stores ``[out, in]`` weights (``y = x W^T + b``); Flax's Dense
kernels are ``[in, out]`` (``y = x K + b``), so every Linear weight is transposed. Every
tensor must have the shape that ``config.json`` implies, and every tensor in the file must
be used, except the ``embeddings.position_ids`` buffer, an unused pooler, and the task heads
that jaxkd replaces with its own ``head`` (``cls.*`` of BertForPreTraining / BertForMaskedLM,
``classifier.*`` of BertForSequenceClassification). The ``head`` is new, N(0, 0.02) from a
fixed seed (:data:`HEAD_SEED`), bias 0, unless the file holds a ``classifier`` with
``num_classes`` outputs (a BertForSequenceClassification fine-tuned for those labels, or
one that :mod:`jaxkd.export.hf` wrote): then it is that classifier.

:func:`sentence_embedding` is sentence-transformers' embedding (Reimers & Gurevych,
"Sentence-BERT", EMNLP 2019): the mean of the last hidden states over the unpadded tokens,
L2-normalised as all-MiniLM-L6-v2's ``Normalize`` module does.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

from jaxkd.models.bert import INIT, POOLINGS, BertEncoder, build_bert, mean_pool
from jaxkd.schema import ConfigError, MissingError

HEAD_SEED = 0
BUFFERS = ("embeddings.position_ids",)  # not weights: HF's registered position buffer
TASK_HEADS = ("cls.", "classifier.")  # pretraining / classification heads; jaxkd has `head`
_LEAVES = {"kernel": ("weight",), "embedding": ("weight",), "scale": ("weight", "gamma"),
           "bias": ("bias", "beta")}
_LAYER_MODULES = {
    ("attention", "query"): "attention.self.query",
    ("attention", "key"): "attention.self.key",
    ("attention", "value"): "attention.self.value",
    ("attention", "output"): "attention.output.dense",
    ("attention", "LayerNorm"): "attention.output.LayerNorm",
    ("intermediate",): "intermediate.dense",
    ("output",): "output.dense",
    ("LayerNorm",): "output.LayerNorm",
}


def hf_names(path: tuple[str, ...]) -> tuple[str, ...]:
    """The HF names (alternatives, unprefixed) of the tensor behind jaxkd parameter ``path``
    (``('layer0', 'attention', 'query', 'kernel')`` -> ``encoder.layer.0.attention.self.
    query.weight``); ``()`` for the new ``head``."""
    *module, leaf = path
    if module[0] == "head":
        return ()
    if module[0] == "embeddings":
        base = ".".join(module)
    elif module[0] == "pooler":
        base = "pooler.dense"
    else:
        i = int(module[0].removeprefix("layer"))
        base = f"encoder.layer.{i}.{_LAYER_MODULES[tuple(module[1:])]}"
    return tuple(f"{base}.{name}" for name in _LEAVES[leaf])


def read_config(directory: str) -> dict[str, Any]:
    """``directory/config.json`` as a dict.

    Raises:
      MissingError: no such directory or file; ConfigError: not a JSON object.
    """
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise MissingError(f"{path}: no such file (an HF model directory holds config.json "
                           "and model.safetensors)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: must hold a JSON object, got {type(config).__name__}")
    return config


def model_kwargs(config: dict[str, Any], path: str = "config.json") -> dict[str, Any]:
    """:func:`~jaxkd.models.bert.build_bert` kwargs from an HF BERT ``config`` (read from
    ``path``); absent fields take HF BertConfig's defaults.

    Raises:
      ConfigError: one line naming ``path`` and the field it cannot build.
    """
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type is None:
        if not any(str(a).startswith("Bert") for a in architectures):
            raise ConfigError(f"{path}: model_type is missing and architectures="
                              f"{architectures!r} names no Bert model")
    elif model_type != "bert":
        raise ConfigError(f"{path}: model_type={model_type!r} is not 'bert'; only BERT "
                          "checkpoints are read")
    for field, default, allowed in (("hidden_act", "gelu", "'gelu' (exact erf GELU)"),
                                    ("position_embedding_type", "absolute", "'absolute'")):
        if config.get(field, default) != default:
            raise ConfigError(f"{path}: {field}={config[field]!r} is not supported; only "
                              f"{allowed}")

    def integer(field: str, default: int) -> int:
        value = config.get(field, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{path}: {field}={value!r} must be a positive integer")
        return value

    def number(field: str, default: float, low: float, high: float) -> float:
        value = config.get(field, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                not low <= value < high:
            raise ConfigError(f"{path}: {field}={value!r} must be in [{low}, {high})")
        return float(value)

    hidden, heads = integer("hidden_size", 768), integer("num_attention_heads", 12)
    if hidden % heads:
        raise ConfigError(f"{path}: hidden_size={hidden} is not divisible by "
                          f"num_attention_heads={heads}")
    return {
        "vocab_size": integer("vocab_size", 30522),
        "hidden_size": hidden,
        "num_layers": integer("num_hidden_layers", 12),
        "num_heads": heads,
        "intermediate_size": integer("intermediate_size", 3072),
        "max_position": integer("max_position_embeddings", 512),
        "type_vocab_size": integer("type_vocab_size", 2),
        "layer_norm_eps": number("layer_norm_eps", 1e-12, 1e-30, 1.0),
        "dropout_rate": number("hidden_dropout_prob", 0.1, 0.0, 1.0),
        "attention_dropout_rate": number("attention_probs_dropout_prob", 0.1, 0.0, 1.0),
    }


def _pooling_of(directory: str, tensors: dict[str, np.ndarray]) -> str:
    """sentence-transformers' pooling (``1_Pooling/config.json``) if the directory has one,
    else ``'pooler'`` when the file holds HF's pooler, else ``'cls'``."""
    path = os.path.join(directory, "1_Pooling", "config.json")
    if not os.path.isfile(path):
        return "pooler" if "pooler.dense.weight" in tensors else "cls"
    config = read_config(os.path.dirname(path))
    modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v)
    known = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    if len(modes) != 1 or modes[0] not in known:
        raise ConfigError(f"{path}: pooling modes {modes} are not supported; only one of "
                          f"{', '.join(known)}")
    return known[modes[0]]


def _read_tensors(directory: str) -> tuple[str, dict[str, np.ndarray]]:
    path = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(path):
        other = [f for f in ("pytorch_model.bin", "tf_model.h5") if
                 os.path.isfile(os.path.join(directory, f))]
        hint = f" (found {other[0]}; only safetensors is read, without torch)" if other else ""
        raise MissingError(f"{path}: no such file{hint}")
    try:
        tensors = load_file(path)
    except Exception as e:  # a corrupt file, or a dtype numpy lacks (BF16)
        raise ConfigError(f"{path}: not readable by safetensors.numpy ({type(e).__name__}: "
                          f"{e})") from None
    prefixed = any(name.startswith("bert.") for name in tensors)
    return path, {(name.removeprefix("bert.") if prefixed else name): array
                  for name, array in tensors.items()}


def from_pretrained(directory: str, *, num_classes: int = 1, pooling: str | None = None
                    ) -> tuple[BertEncoder, dict[str, Any]]:
    """The BERT of an HF directory and ``{'params': ...}`` holding its weights.

    Args:
      directory: holds ``config.json`` and ``model.safetensors`` (HF format).
      num_classes: outputs of the new ``head`` (>= 1; irrelevant for embeddings).
      pooling: what feeds the head (:data:`~jaxkd.models.bert.POOLINGS`); None:
        sentence-transformers' pooling from ``1_Pooling/config.json`` when present, else
        ``'pooler'`` when the file holds the pooler, else ``'cls'``.

    Raises:
      ConfigError (MissingError for absent files): one line naming the file and the field
        or tensor: a config it cannot build (another model_type, hidden_act or
        position_embedding_type), a missing tensor (the first), a shape that is not the
        one config.json implies, a tensor it does not use.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r} must be a positive integer")
    if pooling is not None and pooling not in POOLINGS:
        raise ConfigError(f"pooling={pooling!r} is not a pooling; allowed: "
                          f"{', '.join(POOLINGS)}")
    if not os.path.isdir(directory):
        raise MissingError(f"{directory}: no such directory")
    config_path = os.path.join(directory, "config.json")
    kwargs = model_kwargs(read_config(directory), config_path)
    file, tensors = _read_tensors(directory)
    pooling = pooling or _pooling_of(directory, tensors)
    try:
        model = build_bert(num_classes=num_classes, pooling=pooling, **kwargs)
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    flat: dict[tuple[str, ...], Any] = {}
    used: set[str] = set()
    for path, expected in traverse_util.flatten_dict(shapes["params"]).items():
        names = hf_names(path)
        classifier = tensors.get(f"classifier.{'weight' if path[-1] == 'kernel' else 'bias'}")
        if not names and classifier is not None and classifier.shape == expected.shape[::-1]:
            # BertForSequenceClassification's classifier, as many labels as num_classes
            flat[path] = jnp.asarray(np.asarray(classifier.T, expected.dtype))
            used.add(f"classifier.{'weight' if path[-1] == 'kernel' else 'bias'}")
            continue
        if not names:  # the new head
            kernel = path[-1] == "kernel"
            init = INIT if kernel else jax.nn.initializers.zeros
            flat[path] = init(jax.random.key(HEAD_SEED), expected.shape, expected.dtype)
            continue
        name = next((n for n in names if n in tensors), None)
        if name is None:
            raise ConfigError(f"{file}: tensor {names[0]} is missing (needed for "
                              f"{'/'.join(path)}; config.json: {config_path})")
        array = tensors[name]
        want = expected.shape[::-1] if path[-1] == "kernel" else expected.shape
        if array.shape != want:
            raise ConfigError(f"{file}: tensor {name} has shape {array.shape}, but "
                              f"config.json implies {want}")
        array = array.T if path[-1] == "kernel" else array
        flat[path] = jnp.asarray(np.asarray(array, expected.dtype))
        used.add(name)
    unused = sorted(n for n in tensors if n not in used and n not in BUFFERS
                    and not n.startswith(("pooler.", *TASK_HEADS)))
    if unused:
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        raise ConfigError(f"{file}: tensor(s) {', '.join(unused[:3])}{more} are not part of "
                          f"a BERT encoder with config.json's shape")
    return model, {"params": traverse_util.unflatten_dict(flat)}


def sentence_embedding(model: BertEncoder, variables: dict[str, Any], input_ids: jax.Array,
                       attention_mask: jax.Array, *, normalize: bool = True) -> jax.Array:
    """sentence-transformers' sentence embedding ``[B, H]`` float32: the last hidden state
    averaged over the tokens where ``attention_mask`` is 1,
    ``e = sum_t m_t h_t / sum_t m_t``, then ``e / max(||e||_2, 1e-12)`` with ``normalize``
    (all-MiniLM-L6-v2 normalises)."""
    _, features = model.apply(variables, input_ids, attention_mask, return_features=True)
    embedding = mean_pool(features[f"hidden{model.num_layers}"], features["mask"])
    if normalize:
        norm = jnp.linalg.norm(embedding, axis=-1, keepdims=True)
        embedding = embedding / jnp.maximum(norm, 1e-12)
    return embedding
