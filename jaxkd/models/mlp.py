"""Multilayer perceptron: the fully connected teachers and students of Hinton et al. (2015).

Architecture::

    flatten -> [input dropout] -> (Dense(w_i) -> ReLU -> [dropout]) for w_i in widths -> head

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015), use on MNIST a
784-1200-1200-10 teacher trained with dropout 0.5 on hidden units and 0.2 on the input
(2,395,210 parameters) and a 784-800-800-10 student (1,276,810 parameters). The MNIST-1D paper
(Greydanus, "Scaling down deep learning", 2020) uses a 40-100-100-10 MLP.

Named layers: ``hidden1`` ... ``hiddenN`` and ``head``.

Cross-layer parameter sharing (ALBERT, Lan et al. 2020, "ALBERT: A Lite BERT"): with
``tie_hidden=True`` the layers ``hidden2`` ... ``hiddenN`` are one ``Dense`` applied ``N - 1``
times (its parameters live under ``hidden2``), so the model has ``(N - 2) (w^2 + w)`` fewer
parameters; every hidden width must then be equal.
Features (``return_features=True``): ``hidden1`` ... ``hiddenN`` ``[B, w_i]`` after the ReLU and
before dropout, and ``embedding``, the last hidden layer (the flattened input when ``widths`` is
empty). In eval mode ``head(embedding)`` are the logits; in train mode the head sees
``dropout(embedding)``.

Mixed precision (:mod:`jaxkd.models.compute`): layers compute in ``dtype`` and keep their
parameters in ``param_dtype``; features are in ``dtype``, logits in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike


class MLP(nn.Module):
    """ReLU MLP classifier on the flattened input.

    Attributes:
      num_classes: number of logits.
      widths: hidden layer widths, input side first; ``()`` gives logistic regression.
      dropout_rate: dropout on every hidden layer's output (rng stream ``'dropout'``).
      input_dropout_rate: dropout on the flattened input.
      tie_hidden: share one set of parameters between ``hidden2`` ... ``hiddenN``.
      dtype: dtype of the activations and of the matmuls.
      param_dtype: dtype in which the parameters are stored.
    """

    num_classes: int
    widths: Sequence[int] = (1200, 1200)
    dropout_rate: float = 0.0
    input_dropout_rate: float = 0.0
    tie_hidden: bool = False
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Logits ``[B, num_classes]`` (and the feature dict) for inputs ``[B, ...]``."""
        precision = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = jnp.asarray(x, self.dtype).reshape(x.shape[0], -1)
        features: dict[str, jax.Array] = {}
        h = nn.Dropout(self.input_dropout_rate, deterministic=not train)(x)
        embedding = x
        if self.tie_hidden and len(set(self.widths)) > 1:
            raise ValueError(f"mlp: tie_hidden=True needs equal widths, got {tuple(self.widths)}")
        shared = nn.Dense(self.widths[0], name="hidden2", **precision) if self.tie_hidden else None
        for i, width in enumerate(self.widths, start=1):
            tied = shared is not None and i >= 2
            layer = shared if tied else nn.Dense(width, name=f"hidden{i}", **precision)
            embedding = nn.relu(layer(h))
            features[f"hidden{i}"] = embedding
            h = nn.Dropout(self.dropout_rate, deterministic=not train)(embedding)
        features["embedding"] = embedding
        logits = nn.Dense(self.num_classes, name="head", **precision)(h).astype(jnp.float32)
        return (logits, features) if return_features else logits
