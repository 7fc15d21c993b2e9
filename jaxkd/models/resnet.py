"""CIFAR ResNets (He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", 2016,
section 4.2) and the wide-stem variants of the CRD benchmark (Tian, Krishnan & Isola,
"Contrastive Representation Distillation", 2020; github.com/HobbitLong/RepDistiller).

Architecture, depth = 6n + 2, for a 32x32 input::

    stem_conv: Conv(stem_width, 3x3) -> stem_bn -> ReLU                     [B, 32, 32, stem]
    stage1: n basic blocks, widths[0], stride 1                            [B, 32, 32, w0]
    stage2: n basic blocks, widths[1], first block stride 2                [B, 16, 16, w1]
    stage3: n basic blocks, widths[2], first block stride 2                [B,  8,  8, w2]
    global average pool -> head: Dense(num_classes)

    basic block: conv1 3x3 -> bn1 -> ReLU -> conv2 3x3 -> bn2 -> (+ shortcut) -> ReLU

He et al.'s ResNet-20/32/44/56/110 use stem 16 and widths 16/32/64; ``resnet8x4`` and
``resnet32x4`` (RepDistiller) use a 32-channel stem and widths 64/128/256.

Shortcuts are option B: a 1x1 convolution + BatchNorm (``shortcut_conv``, ``shortcut_bn``)
where the block changes width or stride, identity elsewhere, as in RepDistiller. He et al.'s
CIFAR models use the parameter-free option A (strided identity, zero-padded channels); option B
adds 2,752 parameters to ResNet-20..110 (1%, 0.2%) and is what the CRD numbers use.
Convolutions have no bias and Kaiming-normal (fan-out) initialisation; BatchNorm has momentum
0.9 and epsilon 1e-5 (PyTorch's defaults), statistics in collection ``batch_stats``.
3x3 convolutions pad one pixel on each side, as in PyTorch, so ported weights line up.

Named layers: ``stem_conv``, ``stem_bn``, ``stage{s}_block{b}`` (s from 1, b from 0) holding
``conv1``, ``bn1``, ``conv2``, ``bn2`` (and ``shortcut_conv``, ``shortcut_bn``), and ``head``.
Features: ``conv1`` (the stem after ReLU), ``stage1``, ``stage2``, ``stage3`` (NHWC stage
outputs after the final ReLU) and ``embedding`` ``[B, widths[-1]]`` (the pooled vector that
feeds the head). Any input of at least 4x4 works: pooling is global.

Mixed precision and rematerialisation (:mod:`jaxkd.models.compute`): layers compute in
``dtype`` and keep their parameters in ``param_dtype`` (features in ``dtype``, logits in
float32); ``remat_policy`` wraps every basic block in ``nn.remat``, names unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxkd.models.compute import as_dtype, checkpoint_policy, remat_block

kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, name: str, dtype: DTypeLike = jnp.float32,
               param_dtype: DTypeLike = jnp.float32) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.9 on the running average, epsilon 1e-5),
    output in ``dtype``, scale and bias stored in ``param_dtype``."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=dtype, param_dtype=param_dtype, name=name)


class BasicBlock(nn.Module):
    """Post-activation residual block of two 3x3 convolutions (He et al. 2016, figure 2).

    Attributes:
      features: output channels.
      strides: stride of the first convolution and of the projection shortcut.
      dtype: dtype of the activations and of the convolutions.
      param_dtype: dtype in which the parameters are stored.
    """

    features: int
    strides: int = 1
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        precision = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=kaiming_normal_fan_out,
                                 **precision)
        norm = functools.partial(batch_norm, train, **precision)
        pad = ((1, 1), (1, 1))
        y = conv(self.features, (3, 3), strides=self.strides, padding=pad, name="conv1")(x)
        y = nn.relu(norm("bn1")(y))
        y = conv(self.features, (3, 3), padding=pad, name="conv2")(y)
        y = norm("bn2")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, (1, 1), strides=self.strides, name="shortcut_conv")(x)
            shortcut = norm("shortcut_bn")(shortcut)
        return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
    """Three-stage ResNet of basic blocks for 32x32 images.

    Attributes:
      num_classes: number of logits.
      depth: 6n + 2 (n blocks per stage, two convolutions per block, stem and head).
      widths: channels of the three stages.
      stem_width: channels of the stem convolution.
      dtype: dtype of the activations and of the convolutions and matmuls.
      param_dtype: dtype in which the parameters are stored.
      remat_policy: rematerialise every basic block with this policy
        (:data:`jaxkd.models.compute.REMAT_POLICIES`); ``''`` keeps all activations.
    """

    num_classes: int
    depth: int = 20
    widths: Sequence[int] = (16, 32, 64)
    stem_width: int = 16
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    remat_policy: str = ""

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Logits ``[B, num_classes]`` for images ``[B, H, W, C]``."""
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 >= 8, got {self.depth}")
        x = jnp.asarray(x, self.dtype)
        if x.ndim != 4:
            raise ValueError(f"CIFAR ResNet expects images [B, H, W, C], got shape {x.shape}")
        blocks_per_stage = (self.depth - 2) // 6
        precision = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        block = remat_block(BasicBlock, self.remat_policy)
        x = nn.Conv(
            self.stem_width,
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            kernel_init=kaiming_normal_fan_out,
            name="stem_conv",
            **precision,
        )(x)
        x = nn.relu(batch_norm(train, "stem_bn", **precision)(x))
        features = {"conv1": x}
        for s, width in enumerate(self.widths, start=1):
            for b in range(blocks_per_stage):
                strides = 2 if s > 1 and b == 0 else 1
                x = block(width, strides, name=f"stage{s}_block{b}", **precision)(x, train)
            features[f"stage{s}"] = x
        embedding = jnp.mean(x, axis=(1, 2))
        features["embedding"] = embedding
        logits = nn.Dense(self.num_classes, name="head", **precision)(embedding)
        logits = logits.astype(jnp.float32)
        return (logits, features) if return_features else logits


def _cifar_resnet(
    name: str, depth: int, widths: tuple[int, int, int], stem_width: int
) -> Callable[..., CifarResNet]:
    def constructor(
        *,
        num_classes: int,
        dtype: DTypeLike = "float32",
        param_dtype: DTypeLike = "float32",
        remat_policy: str = "",
    ) -> CifarResNet:
        checkpoint_policy(remat_policy)  # refuses an unknown name early
        return CifarResNet(
            num_classes=num_classes,
            depth=depth,
            widths=widths,
            stem_width=stem_width,
            dtype=as_dtype(dtype, "dtype"),
            param_dtype=as_dtype(param_dtype, "param_dtype"),
            remat_policy=remat_policy,
        )

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = (f"ResNet-{depth}, stem {stem_width}, stage widths {widths}; "
                           "``dtype``, ``param_dtype`` and ``remat_policy`` as in "
                           ":mod:`jaxkd.models.compute`.")
    return constructor


resnet8 = _cifar_resnet("resnet8", 8, (16, 32, 64), 16)
resnet14 = _cifar_resnet("resnet14", 14, (16, 32, 64), 16)
resnet20 = _cifar_resnet("resnet20", 20, (16, 32, 64), 16)
resnet32 = _cifar_resnet("resnet32", 32, (16, 32, 64), 16)
resnet44 = _cifar_resnet("resnet44", 44, (16, 32, 64), 16)
resnet56 = _cifar_resnet("resnet56", 56, (16, 32, 64), 16)
resnet110 = _cifar_resnet("resnet110", 110, (16, 32, 64), 16)
resnet8x4 = _cifar_resnet("resnet8x4", 8, (64, 128, 256), 32)
resnet32x4 = _cifar_resnet("resnet32x4", 32, (64, 128, 256), 32)
