"""LeNet-5 (LeCun, Bottou, Bengio & Haffner, "Gradient-based learning applied to document
recognition", 1998), in its common modern form.

Architecture::

    conv1: Conv(6, 5x5) -> ReLU -> max pool 2x2
    conv2: Conv(16, 5x5) -> ReLU -> max pool 2x2
    flatten
    fc1: Dense(120) -> ReLU      (the paper's C5)
    fc2: Dense(84) -> ReLU       (F6)
    head: Dense(num_classes)

Modern choices instead of the paper's: ReLU instead of the scaled tanh, max pooling instead of
trainable subsampling, a fully connected C3 instead of its partial connection table, and a
linear head instead of the RBF output layer. C5 is a dense layer on the flattened map (for a
32x32 input, where the map is 5x5, this is exactly the paper's 5x5 convolution).

Padding: ``'VALID'`` keeps the paper's geometry (32x32 -> 5x5x16, 61,706 parameters for
32x32x1 and 10 classes; 28x28 -> 4x4x16, 44,426 parameters). Inputs smaller than 16x16 do not
survive two unpadded 5x5 convolutions and two poolings, so ``'SAME'`` pads both convolutions
(8x8 digits -> 2x2x16). The default, ``padding=None``, picks ``'VALID'`` for inputs of at
least 16x16 and ``'SAME'`` below.

``channels`` (default ``(6, 16)``) and ``widths`` (default ``(120, 84)``) change the widths;
``channels=(20, 50), widths=(500,)`` is Caffe's LeNet (431,080 parameters on 28x28), the
"LeNet-5" of Han, Mao & Dally's Deep Compression (2016).

Named layers: ``conv1``, ``conv2``, ``fc1``, ``fc2`` (one per width), ``head``.
Features: ``conv1``, ``conv2`` (NHWC, after ReLU and pooling), ``fc1`` ``[B, 120]`` and
``embedding`` ``[B, 84]`` (the last hidden layer's output, which feeds the head; with one
width, ``fc1``'s output is the embedding).

Mixed precision (:mod:`jaxkd.models.compute`): layers compute in ``dtype`` and keep their
parameters in ``param_dtype``; features are in ``dtype``, logits in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxkd.schema import ConfigError

_MIN_VALID_SIZE = 16  # smallest side that leaves a 1x1 map after the two unpadded stages


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling.

    Attributes:
      num_classes: number of logits.
      padding: ``'VALID'``, ``'SAME'`` or ``None`` (``'VALID'`` for inputs of at least 16x16,
        else ``'SAME'``).
      channels: output channels of ``conv1``, ``conv2``.
      widths: widths of the hidden dense layers ``fc1``, ``fc2``, ...
      dtype: dtype of the activations and of the convolutions and matmuls.
      param_dtype: dtype in which the parameters are stored.
    """

    num_classes: int
    padding: str | None = None
    channels: tuple[int, ...] = (6, 16)
    widths: tuple[int, ...] = (120, 84)
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Logits ``[B, num_classes]`` for images ``[B, H, W, C]`` (or ``[B, H, W]``)."""
        del train  # no dropout or normalisation
        x = jnp.asarray(x, self.dtype)
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ConfigError(f"lenet5 expects images [B, H, W, C], got shape {x.shape}")
        padding = self._padding(x.shape[1:3])
        precision = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        features: dict[str, jax.Array] = {}
        for i, channels in enumerate(self.channels, start=1):
            x = nn.Conv(channels, (5, 5), padding=padding, name=f"conv{i}", **precision)(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
            features[f"conv{i}"] = x
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.widths, start=1):
            x = nn.relu(nn.Dense(width, name=f"fc{i}", **precision)(x))
            # The last hidden layer's output feeds the head: the embedding.
            features["embedding" if i == len(self.widths) else f"fc{i}"] = x
        logits = nn.Dense(self.num_classes, name="head", **precision)(x).astype(jnp.float32)
        return (logits, features) if return_features else logits

    def _padding(self, spatial: tuple[int, int]) -> str:
        if self.padding is None:
            return "VALID" if min(spatial) >= _MIN_VALID_SIZE else "SAME"
        if self.padding not in ("VALID", "SAME"):
            raise ValueError(
                f"lenet5 padding must be 'VALID', 'SAME' or None, got {self.padding!r}"
            )
        if self.padding == "VALID" and min(spatial) < _MIN_VALID_SIZE:
            raise ValueError(
                f"lenet5 with padding='VALID' needs images of at least {_MIN_VALID_SIZE}x"
                f"{_MIN_VALID_SIZE}, got {spatial[0]}x{spatial[1]}; use padding='SAME'"
            )
        return self.padding
