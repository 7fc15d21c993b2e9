"""The model zoo: teachers and students by registry name.

Every model is a Flax Linen module called as
``model.apply(variables, x, train=False, return_features=False)`` and returns float32 logits
``[B, num_classes]``, or ``(logits, features)`` with ``features`` a dict of named
intermediates (``hidden1..``/``conv1..``/``stage1..`` and ``embedding``, the vector that feeds
the classifier ``head``). BatchNorm statistics live in collection ``batch_stats`` and are
updated only when ``train=True``; dropout draws from rng stream ``'dropout'``, only in train.

:func:`register` adds a model defined elsewhere (any Linen module that follows this
contract). Registry names and their kwargs besides ``num_classes``:

- ``mlp``: ReLU MLP (Hinton et al. 2015); widths, dropout_rate, input_dropout_rate,
  tie_hidden.
- ``cnn1d``: the MNIST-1D CNN (Greydanus 2020); channels (one or three), kernel_size,
  tie_convs.
- ``lenet5``: LeNet-5 (LeCun et al. 1998); padding, channels, widths.
- ``resnet8``, ``resnet14``, ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``,
  ``resnet110``: CIFAR ResNets (He et al. 2016); none.
- ``resnet8x4``, ``resnet32x4``: RepDistiller's wide-stem ResNets (Tian et al. 2020); none.
- ``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2``: Wide ResNets (Zagoruyko &
  Komodakis 2016); dropout_rate.
- ``wrn``: WRN-depth-widen_factor, default WRN-28-10; depth, widen_factor, dropout_rate.
- ``bert``: BERT encoder (Devlin et al. 2019) on token ids ``[B, L]`` (input shape ``(L,)``,
  with optional ``attention_mask`` and ``token_type_ids``); vocab_size, hidden_size,
  num_layers, num_heads, intermediate_size, max_position, type_vocab_size, layer_norm_eps,
  dropout_rate, attention_dropout_rate, pooling, head_dim, layer_heads, layer_intermediate
  (:mod:`jaxkd.models.bert`; HF weights: :mod:`jaxkd.models.pretrained`).
- ``gemma3``: Gemma 3's causal decoder (Gemma Team 2025) on token ids ``[B, L]`` with an
  optional ``mask``, logits ``[B, L, vocabulary]`` (``num_classes`` is the vocabulary);
  hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size,
  sliding_window, global_every, rope_local_base, rope_global_base, query_scale, rms_eps,
  layer_intermediate (:mod:`jaxkd.models.gemma`; GGUF weights: :mod:`jaxkd.models.gguf_io`).

Every zoo model also takes ``dtype`` and ``param_dtype`` (mixed precision: one of
:data:`DTYPES`, default float32 for both), and the ResNets, WRNs and BERT ``remat_policy``
(rematerialisation of every residual block or layer: one of :data:`REMAT_POLICIES`,
``''`` = off); see :mod:`jaxkd.models.compute`. :func:`takes_precision` and
:func:`takes_remat` tell whether a registered model accepts them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.typing import DTypeLike

from jaxkd.models.bert import BertEncoder, build_bert
from jaxkd.models.cnn1d import CNN1D
from jaxkd.models.compute import DTYPES, REMAT_POLICIES, as_dtype
from jaxkd.models.gemma import Gemma3, build_gemma3
from jaxkd.models.lenet import LeNet5
from jaxkd.models.mlp import MLP
from jaxkd.models.resnet import (
    BasicBlock,
    CifarResNet,
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet32,
    resnet32x4,
    resnet44,
    resnet56,
    resnet110,
)
from jaxkd.models.wrn import (
    WideBasicBlock,
    WideResNet,
    wide_resnet,
    wrn_16_1,
    wrn_16_2,
    wrn_40_1,
    wrn_40_2,
)
from jaxkd.schema import ConfigError


def build_mlp(
    *,
    num_classes: int,
    widths: Sequence[int] = (1200, 1200),
    dropout_rate: float = 0.0,
    input_dropout_rate: float = 0.0,
    tie_hidden: bool = False,
    dtype: DTypeLike = "float32",
    param_dtype: DTypeLike = "float32",
) -> MLP:
    """ReLU MLP; Hinton et al.'s MNIST teacher is ``widths=(1200, 1200), dropout_rate=0.5,
    input_dropout_rate=0.2``, the student ``widths=(800, 800)``. ``tie_hidden`` shares
    ``hidden2..N`` (ALBERT-style cross-layer sharing). ``dtype``, ``param_dtype``: mixed
    precision (:mod:`jaxkd.models.compute`)."""
    widths = tuple(int(w) for w in widths)
    if tie_hidden and len(set(widths)) > 1:
        raise ConfigError(f"config.model.kwargs.tie_hidden=True needs equal widths, got {widths}")
    return MLP(
        num_classes=num_classes,
        widths=widths,
        dropout_rate=float(dropout_rate),
        input_dropout_rate=float(input_dropout_rate),
        tie_hidden=bool(tie_hidden),
        dtype=as_dtype(dtype, "dtype"),
        param_dtype=as_dtype(param_dtype, "param_dtype"),
    )


def build_cnn1d(*, num_classes: int, channels: int | Sequence[int] = 25, kernel_size: int = 5,
                tie_convs: bool = False, dtype: DTypeLike = "float32",
                param_dtype: DTypeLike = "float32") -> CNN1D:
    """The MNIST-1D paper's CNN (5,210 parameters for 10 classes); ``channels`` is one width
    or one per convolution; ``tie_convs`` shares ``conv2``/``conv3``. ``dtype``,
    ``param_dtype``: mixed precision (:mod:`jaxkd.models.compute`)."""
    if isinstance(channels, int):
        channels = int(channels)
    else:
        channels = tuple(int(c) for c in channels)
        if len(channels) != 3:
            raise ConfigError(f"config.model.kwargs.channels={channels!r} must be an int or 3 "
                             "ints (conv1, conv2, conv3)")
    widths = (channels,) * 3 if isinstance(channels, int) else channels
    if tie_convs and len(set(widths)) > 1:
        raise ConfigError(f"config.model.kwargs.tie_convs=True needs equal channels, got {widths}")
    return CNN1D(num_classes=num_classes, channels=channels, kernel_size=int(kernel_size),
                 tie_convs=bool(tie_convs), dtype=as_dtype(dtype, "dtype"),
                 param_dtype=as_dtype(param_dtype, "param_dtype"))


def build_lenet5(*, num_classes: int, padding: str | None = None,
                 channels: Sequence[int] = (6, 16), widths: Sequence[int] = (120, 84),
                 dtype: DTypeLike = "float32", param_dtype: DTypeLike = "float32") -> LeNet5:
    """LeNet-5 with ReLU and max pooling; ``padding`` None picks VALID for inputs >= 16x16.
    ``channels=(20, 50), widths=(500,)`` is Caffe's LeNet (Deep Compression's "LeNet-5").
    ``dtype``, ``param_dtype``: mixed precision (:mod:`jaxkd.models.compute`)."""
    channels, widths = tuple(int(c) for c in channels), tuple(int(w) for w in widths)
    if len(channels) != 2 or min(channels) < 1:
        raise ConfigError(f"config.model.kwargs.channels={channels!r} must be 2 positive ints "
                          "(conv1, conv2)")
    if not widths or min(widths) < 1:
        raise ConfigError(f"config.model.kwargs.widths={widths!r} must be one or more "
                          "positive ints (fc1, fc2, ...)")
    return LeNet5(num_classes=num_classes, padding=padding.upper() if padding else None,
                  channels=channels, widths=widths, dtype=as_dtype(dtype, "dtype"),
                  param_dtype=as_dtype(param_dtype, "param_dtype"))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": build_mlp,
    "cnn1d": build_cnn1d,
    "lenet5": build_lenet5,
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn": wide_resnet,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "bert": build_bert,
    "gemma3": build_gemma3,
}


def register(name: str, builder: Callable[..., nn.Module], *, replace: bool = False) -> None:
    """Makes ``config.model.name=name`` build ``builder(num_classes=..., **kwargs)``.

    The module must follow the zoo's contract (module docstring): ``apply(variables, x,
    train=False, return_features=False)`` returns float logits ``[B, num_classes]``, or
    ``(logits, features)`` with ``return_features``; BatchNorm statistics live in
    ``batch_stats``; dropout draws from the rng stream ``'dropout'``. Its Dense/Conv layers
    are what quantization, pruning and clustering act on; the classifier layer should be
    named ``head`` (:mod:`jaxkd.layers`). The builder's keyword arguments besides
    ``num_classes`` are the model's ``config.model.kwargs``; a process that loads a
    teacher or an artifact of this model must register it too.
    """
    if name in MODELS and not replace and MODELS[name] is not builder:
        raise ConfigError(f"model {name!r} is already registered; pass replace=True to "
                         "replace it")
    MODELS[name] = builder


def names() -> list[str]:
    """The registered model names (``config.model.name`` values), sorted."""
    return sorted(MODELS)


def model_kwargs(name: str) -> list[str]:
    """The keyword arguments, besides ``num_classes``, that model ``name`` accepts (sorted)."""
    params = inspect.signature(MODELS[name]).parameters
    return sorted(p for p in params if p != "num_classes")


def takes_precision(name: str) -> bool:
    """Whether model ``name``'s builder accepts ``dtype`` and ``param_dtype`` (every zoo model
    does; a model added with :func:`register` may not)."""
    _check_name(name)
    return {"dtype", "param_dtype"} <= set(model_kwargs(name))


def takes_remat(name: str) -> bool:
    """Whether model ``name``'s builder accepts ``remat_policy`` (the zoo's ResNets, WRNs
    and BERT, which have repeated residual blocks)."""
    _check_name(name)
    return "remat_policy" in model_kwargs(name)


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ConfigError(
            f"config.model.name={name!r} is not a model; choose one of: {', '.join(names())}"
        )


def get_model(name: str, *, num_classes: int, **kwargs: Any) -> nn.Module:
    """The model registered as ``name`` (``config.model.name``), with ``num_classes`` logits.

    Raises:
      ValueError: in one line, for an unknown name, an unknown kwarg (naming the allowed
        ones) or a ``num_classes`` that is not a positive integer.
    """
    _check_name(name)
    allowed = model_kwargs(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(
            f"config.model.kwargs: model {name!r} got unknown kwarg(s) {', '.join(unknown)}; "
            f"allowed for {name!r}: {', '.join(allowed) or '(none)'}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def input_names(model: nn.Module) -> tuple[str, ...]:
    """The names of the model's inputs, in call order: ``('input_ids', 'attention_mask')``
    (int32 ``[B, L]``) for a token model (:class:`BertEncoder`, :class:`Gemma3`), else
    ``('input',)`` (float32 ``[B, *input_shape]``). Exports (StableHLO, ONNX) name and type
    their inputs by it."""
    return ("input_ids", "attention_mask") if is_token_model(model) else ("input",)


def is_token_model(model: nn.Module) -> bool:
    """Whether the model reads token ids (int32) rather than float inputs."""
    return isinstance(model, (BertEncoder, Gemma3))


def input_dtype(model: nn.Module) -> Any:
    """int32 for a token model's inputs (:func:`input_names`), else float32."""
    return np.int32 if is_token_model(model) else np.float32


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (pass ``variables['params']``, not the
    batch statistics). Works on arrays and on ``jax.eval_shape`` results alike."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


__all__ = [
    "input_dtype",
    "input_names",
    "DTYPES",
    "MODELS",
    "REMAT_POLICIES",
    "MLP",
    "BertEncoder",
    "Gemma3",
    "is_token_model",
    "CNN1D",
    "LeNet5",
    "BasicBlock",
    "CifarResNet",
    "WideBasicBlock",
    "WideResNet",
    "count_params",
    "get_model",
    "model_kwargs",
    "names",
    "register",
    "takes_precision",
    "takes_remat",
]
