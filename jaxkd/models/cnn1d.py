"""The small 1-D CNN of the MNIST-1D benchmark (Greydanus, "Scaling down deep learning", 2020).

Architecture (``ConvBase`` in github.com/greydanus/mnist1d), for a length-40 signal::

    [B, 40] -> [B, 40, 1]
    conv1: Conv1d(channels, kernel_size, stride 2, pad 1) -> ReLU   [B, 19, 25]
    conv2: Conv1d(channels, 3,           stride 2, pad 1) -> ReLU   [B, 10, 25]
    conv3: Conv1d(channels, 3,           stride 2, pad 1) -> ReLU   [B,  5, 25]
    flatten                                                         [B, 125]
    head:  Dense(num_classes)

5,210 parameters for 10 classes; about 94% test accuracy on MNIST-1D in the paper. As in the
reference only the first convolution has kernel 5 (``kernel_size``); the other two have kernel 3.
Convolutions have biases and no normalisation. The flatten is position-major (``[L, C]``,
JAX's layout) where PyTorch's is channel-major; this permutes the head's rows only.

``channels`` may also give each convolution its own width, ``(c1, c2, c3)``: the shape a
channel-pruned or neuron-merged CNN keeps once it is physically shrunk. ``tie_convs=True``
shares one set of parameters between ``conv2`` and ``conv3`` (cross-layer sharing as in
ALBERT, Lan et al. 2020; stored under ``conv2``; needs equal widths).

Named layers: ``conv1``, ``conv2``, ``conv3``, ``head``.
Features: ``conv1``, ``conv2``, ``conv3`` (``[B, L_i, channels]`` after the ReLU) and
``embedding`` (the flattened ``conv3`` output that feeds the head).

Mixed precision (:mod:`jaxkd.models.compute`): layers compute in ``dtype`` and keep their
parameters in ``param_dtype``; features are in ``dtype``, logits in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxkd.schema import ConfigError


class CNN1D(nn.Module):
    """Three strided 1-D convolutions and a linear classifier.

    Attributes:
      num_classes: number of logits.
      channels: channels of every convolution, or one per convolution ``(c1, c2, c3)``.
      kernel_size: kernel of the first convolution (the later two use 3, as in the reference).
      tie_convs: ``conv3`` reuses ``conv2``'s parameters.
      dtype: dtype of the activations and of the convolutions and matmuls.
      param_dtype: dtype in which the parameters are stored.
    """

    num_classes: int
    channels: int | Sequence[int] = 25
    kernel_size: int = 5
    tie_convs: bool = False
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def widths(self) -> tuple[int, int, int]:
        """The output channels of ``conv1``, ``conv2``, ``conv3``."""
        if isinstance(self.channels, int):
            return (self.channels,) * 3
        widths = tuple(int(c) for c in self.channels)
        if len(widths) != 3:
            raise ValueError(f"cnn1d: channels must be an int or 3 ints, got {self.channels!r}")
        return widths

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Logits ``[B, num_classes]`` for signals ``[B, L]`` or ``[B, L, C]``."""
        del train  # no dropout or normalisation
        x = jnp.asarray(x, self.dtype)
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim != 3:
            raise ConfigError(f"cnn1d expects signals [B, L] or [B, L, C], got shape {x.shape}")
        widths = self.widths()
        if self.tie_convs and len(set(widths)) > 1:
            raise ValueError(f"cnn1d: tie_convs=True needs equal channels, got {widths}")
        features: dict[str, jax.Array] = {}
        kernels = (self.kernel_size, 3, 3)
        precision = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        convs = [nn.Conv(c, (k,), strides=(2,), padding=[(1, 1)], name=f"conv{i}", **precision)
                 for i, (c, k) in enumerate(zip(widths, kernels, strict=True), start=1)
                 if not (self.tie_convs and i == 3)]
        if self.tie_convs:
            convs.append(convs[1])
        for i, conv in enumerate(convs, start=1):
            x = nn.relu(conv(x))
            features[f"conv{i}"] = x
        embedding = x.reshape(x.shape[0], -1)
        features["embedding"] = embedding
        logits = nn.Dense(self.num_classes, name="head", **precision)(embedding)
        logits = logits.astype(jnp.float32)
        return (logits, features) if return_features else logits
