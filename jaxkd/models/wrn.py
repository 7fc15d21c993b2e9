"""Wide Residual Networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

Architecture WRN-d-k, depth d = 6n + 4, for a 32x32 input::

    stem_conv: Conv(16, 3x3)                                               [B, 32, 32, 16]
    stage1: n pre-activation blocks, width 16k, stride 1                   [B, 32, 32, 16k]
    stage2: n pre-activation blocks, width 32k, first block stride 2       [B, 16, 16, 32k]
    stage3: n pre-activation blocks, width 64k, first block stride 2       [B,  8,  8, 64k]
    final_bn -> ReLU -> global average pool -> head: Dense(num_classes)

    block: bn1 -> ReLU -> conv1 3x3 -> bn2 -> ReLU -> [dropout] -> conv2 3x3 (+ shortcut)

Where a block changes width (or stride) the shortcut is a 1x1 convolution (``shortcut_conv``,
no BatchNorm) of the *activated* input, otherwise the identity on the raw input, as in the
authors' code and RepDistiller's ``wrn.py``. Dropout between the convolutions is 0 by default
(the CRD/RepDistiller teachers ``wrn_40_2`` and students ``wrn_16_2`` use none). Convolutions
have no bias and Kaiming-normal (fan-out) initialisation; BatchNorm as in
:mod:`jaxkd.models.resnet`.

Named layers: ``stem_conv``, ``stage{s}_block{b}`` holding ``bn1``, ``conv1``, ``bn2``,
``conv2`` (and ``shortcut_conv``), ``final_bn`` and ``head``.
Features: ``conv1`` (the stem output), ``stage1``, ``stage2``, ``stage3`` and ``embedding``
``[B, 64k]``. In this pre-activation network a stage's output is the residual stream *before*
the next BatchNorm-ReLU (RepDistiller's ``f1..f3``; attention transfer uses the same maps);
``embedding`` is ``mean(ReLU(final_bn(stage3)))``, what feeds the head.

Mixed precision and rematerialisation (:mod:`jaxkd.models.compute`): layers compute in
``dtype`` and keep their parameters in ``param_dtype`` (features in ``dtype``, logits in
float32); ``remat_policy`` wraps every block in ``nn.remat``, names unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxkd.models.compute import as_dtype, checkpoint_policy, remat_block
from jaxkd.models.resnet import batch_norm, kaiming_normal_fan_out


class WideBasicBlock(nn.Module):
    """Pre-activation residual block of two 3x3 convolutions (He et al. 2016b; WRN "B(3,3)").

    Attributes:
      features: output channels.
      strides: stride of the first convolution and of the projection shortcut.
      dropout_rate: dropout between the two convolutions (rng stream ``'dropout'``).
      dtype: dtype of the activations and of the convolutions.
      param_dtype: dtype in which the parameters are stored.
    """

    features: int
    strides: int = 1
    dropout_rate: float = 0.0
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        precision = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=kaiming_normal_fan_out,
                                 **precision)
        norm = functools.partial(batch_norm, train, **precision)
        pad = ((1, 1), (1, 1))
        activated = nn.relu(norm("bn1")(x))
        y = conv(self.features, (3, 3), strides=self.strides, padding=pad, name="conv1")(activated)
        y = nn.relu(norm("bn2")(y))
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = conv(self.features, (3, 3), padding=pad, name="conv2")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, (1, 1), strides=self.strides, name="shortcut_conv")(
                activated
            )
        return y + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 images.

    Attributes:
      num_classes: number of logits.
      depth: 6n + 4 (n blocks per stage).
      widen_factor: k, the stages have 16k, 32k and 64k channels.
      dropout_rate: dropout inside every block.
      dtype: dtype of the activations and of the convolutions and matmuls.
      param_dtype: dtype in which the parameters are stored.
      remat_policy: rematerialise every block with this policy
        (:data:`jaxkd.models.compute.REMAT_POLICIES`); ``''`` keeps all activations.
    """

    num_classes: int
    depth: int = 28
    widen_factor: int = 10
    dropout_rate: float = 0.0
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    remat_policy: str = ""

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Logits ``[B, num_classes]`` for images ``[B, H, W, C]``."""
        if (self.depth - 4) % 6 or self.depth < 10:
            raise ValueError(f"WRN depth must be 6n + 4 >= 10, got {self.depth}")
        if self.widen_factor < 1:
            raise ValueError(f"WRN widen_factor must be >= 1, got {self.widen_factor}")
        x = jnp.asarray(x, self.dtype)
        if x.ndim != 4:
            raise ValueError(f"WRN expects images [B, H, W, C], got shape {x.shape}")
        blocks_per_stage = (self.depth - 4) // 6
        precision = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        block = remat_block(WideBasicBlock, self.remat_policy)
        x = nn.Conv(
            16,
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            kernel_init=kaiming_normal_fan_out,
            name="stem_conv",
            **precision,
        )(x)
        features = {"conv1": x}
        for s, width in enumerate((16, 32, 64), start=1):
            for b in range(blocks_per_stage):
                x = block(
                    width * self.widen_factor,
                    strides=2 if s > 1 and b == 0 else 1,
                    dropout_rate=self.dropout_rate,
                    name=f"stage{s}_block{b}",
                    **precision,
                )(x, train)
            features[f"stage{s}"] = x
        x = nn.relu(batch_norm(train, "final_bn", **precision)(x))
        embedding = jnp.mean(x, axis=(1, 2))
        features["embedding"] = embedding
        logits = nn.Dense(self.num_classes, name="head", **precision)(embedding)
        logits = logits.astype(jnp.float32)
        return (logits, features) if return_features else logits


def wide_resnet(
    *,
    num_classes: int,
    depth: int = 28,
    widen_factor: int = 10,
    dropout_rate: float = 0.0,
    dtype: DTypeLike = "float32",
    param_dtype: DTypeLike = "float32",
    remat_policy: str = "",
) -> WideResNet:
    """WRN-depth-widen_factor; the defaults are the paper's WRN-28-10 without dropout.
    ``dtype``, ``param_dtype`` and ``remat_policy`` as in :mod:`jaxkd.models.compute`."""
    checkpoint_policy(remat_policy)  # refuses an unknown name early
    return WideResNet(
        num_classes=num_classes,
        depth=depth,
        widen_factor=widen_factor,
        dropout_rate=dropout_rate,
        dtype=as_dtype(dtype, "dtype"),
        param_dtype=as_dtype(param_dtype, "param_dtype"),
        remat_policy=remat_policy,
    )


def _fixed_wrn(name: str, depth: int, widen_factor: int) -> Callable[..., WideResNet]:
    def constructor(
        *,
        num_classes: int,
        dropout_rate: float = 0.0,
        dtype: DTypeLike = "float32",
        param_dtype: DTypeLike = "float32",
        remat_policy: str = "",
    ) -> WideResNet:
        return wide_resnet(
            num_classes=num_classes,
            depth=depth,
            widen_factor=widen_factor,
            dropout_rate=dropout_rate,
            dtype=dtype,
            param_dtype=param_dtype,
            remat_policy=remat_policy,
        )

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = (f"WRN-{depth}-{widen_factor}; ``dtype``, ``param_dtype`` and "
                           "``remat_policy`` as in :mod:`jaxkd.models.compute`.")
    return constructor


wrn_16_1 = _fixed_wrn("wrn_16_1", 16, 1)
wrn_16_2 = _fixed_wrn("wrn_16_2", 16, 2)
wrn_40_1 = _fixed_wrn("wrn_40_1", 40, 1)
wrn_40_2 = _fixed_wrn("wrn_40_2", 40, 2)
