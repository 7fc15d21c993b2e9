"""BERT's forward pass in float64 numpy, straight from an HF state dict: the independent
reference that tests/test_bert.py and bench/bert_reference.py compare jaxkd's
:class:`~jaxkd.models.bert.BertEncoder` (and its weight loader) against.

It reads HF's tensor names (``encoder.layer.{i}.attention.self.query.weight``, with or
without a ``bert.`` prefix) and their ``[out, in]`` layout as PyTorch's ``nn.Linear`` does
(``y = x W^T + b``), so nothing of jaxkd's renaming or transposing is shared. Formulas
(Devlin et al. 2019; HF's ``modeling_bert.py``): embeddings ``LN(word + position + type)``;
per layer ``A = softmax(Q K^T / sqrt(d))`` over the unpadded keys only,
``x = LN(x + (A V) W_o^T + b_o)``, ``x = LN(x + GELU(x W_1^T + b_1) W_2^T + b_2)`` with the
exact ``GELU(x) = x (1 + erf(x / sqrt 2)) / 2``; sentence-transformers' embedding is the mean
of the last hidden states over the unpadded tokens.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf


def _linear(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def _layer_norm(x: np.ndarray, w: dict, name: str, eps: float) -> np.ndarray:
    gamma = w.get(f"{name}.weight", w.get(f"{name}.gamma"))
    beta = w.get(f"{name}.bias", w.get(f"{name}.beta"))
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def forward(weights: dict[str, np.ndarray], config: dict, input_ids: np.ndarray,
            attention_mask: np.ndarray | None = None,
            token_type_ids: np.ndarray | None = None) -> dict[str, list[np.ndarray]]:
    """``{'hidden_states': [embeddings, layer 1 .. N outputs] [B, L, H], 'attentions':
    [layer 1 .. N probabilities] [B, heads, L, L]}`` in float64, as HF's
    ``output_hidden_states`` / ``output_attentions``. ``config``: HF's config.json."""
    w = {k.removeprefix("bert."): np.asarray(v, np.float64) for k, v in weights.items()}
    ids = np.asarray(input_ids)
    b, length = ids.shape
    mask = np.ones((b, length)) if attention_mask is None else np.asarray(attention_mask)
    types = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids)
    eps = config.get("layer_norm_eps", 1e-12)
    heads = config["num_attention_heads"]

    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][np.arange(length)][None]
         + w["embeddings.token_type_embeddings.weight"][types])
    x = _layer_norm(x, w, "embeddings.LayerNorm", eps)
    hidden, attentions = [x], []
    keep = mask[:, None, None, :] > 0  # [B, 1, 1, L]: which keys a query may see
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"

        def split(y):
            return y.reshape(b, length, heads, -1).transpose(0, 2, 1, 3)

        q = split(_linear(x, w, f"{p}.attention.self.query"))
        k = split(_linear(x, w, f"{p}.attention.self.key"))
        v = split(_linear(x, w, f"{p}.attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        scores = np.where(keep, scores, -np.inf)
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.where(keep, np.exp(scores), 0.0)
        probs = probs / probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, length, -1)
        x = _layer_norm(x + _linear(context, w, f"{p}.attention.output.dense"), w,
                        f"{p}.attention.output.LayerNorm", eps)
        y = _linear(gelu(_linear(x, w, f"{p}.intermediate.dense")), w, f"{p}.output.dense")
        x = _layer_norm(x + y, w, f"{p}.output.LayerNorm", eps)
        hidden.append(x)
        attentions.append(probs)
    return {"hidden_states": hidden, "attentions": attentions}


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling: the average over unpadded tokens, ``[B, H]``."""
    m = np.asarray(attention_mask, np.float64)[..., None]
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (sentence-transformers' Normalize module)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
