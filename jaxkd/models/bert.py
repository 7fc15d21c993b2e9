"""BERT encoder (Devlin, Chang, Lee & Toutanova, "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding", NAACL 2019), with a classifier head.

Architecture (post-LayerNorm, Vaswani et al. 2017), for token ids ``[B, L]``::

    embeddings: LN(word[ids] + position[0..L-1] + token_type[types])      [B, L, H]
    layer{i}, i = 0 .. num_layers - 1:
      attention: Q, K, V = x W_q + b_q, x W_k + b_k, x W_v + b_v, split into heads [B, h, L, d]
                 S = Q K^T / sqrt(d) + M,  M = -10000 (1 - mask) on the padded keys
                 A = softmax(S),  x <- LN(x + (A V) W_o + b_o)
      FFN:       x <- LN(x + GELU(x W_1 + b_1) W_2 + b_2)
    pooled: x[:, 0] ('cls'), the mean over non-pad tokens ('mean'), tanh(x[:, 0] W_p + b_p)
            ('pooler', HF's BertPooler)
    head: Dense(num_classes) on dropout(pooled)

GELU is the exact one, ``x Phi(x)`` with the normal CDF through ``erf`` (HF's ``"gelu"``);
LayerNorm has epsilon ``layer_norm_eps`` (1e-12). Dropout (rng stream ``'dropout'``, train
only) acts on the embeddings, the attention probabilities, both residual branches and the
pooled vector, as in HF's BertForSequenceClassification. The masked keys get -10000 added,
as in Google's BERT (HF adds the dtype's minimum); either way their probability is exactly 0
in float32. Weights are initialised N(0, 0.02), biases 0, LayerNorm 1 and 0, as in BERT.

Parameter names mirror HF's ``BertModel``, so loading its weights is a rename
(:mod:`jaxkd.models.pretrained`): ``embeddings/{word,position,token_type}_embeddings/
embedding``, ``embeddings/LayerNorm``; ``layer{i}/attention/{query,key,value}`` (Dense
``[H, heads * d]``), ``layer{i}/attention/output`` (Dense ``[heads * d, H]``),
``layer{i}/attention/LayerNorm``, ``layer{i}/intermediate`` (Dense ``[H, FFN]``),
``layer{i}/output`` (Dense ``[FFN, H]``), ``layer{i}/LayerNorm``; ``pooler`` (only for
``pooling='pooler'``) and ``head``. **Layers are numbered from 0 in parameter names**
(``layer0`` is HF's ``encoder.layer.0``) **and from 1 in feature names** (``hidden1`` is the
output of ``layer0``). Every projection is a plain ``nn.Dense``, so quantization, pruning and
surgery, which act on Dense kernels, cover all of them.

Per-layer shapes for physically pruned students: ``layer_heads`` and ``layer_intermediate``
give each layer its number of heads (of width ``head_dim``) and FFN width (``()``: all equal
to ``num_heads``, ``intermediate_size``). A layer with 0 heads (or 0 FFN units) keeps only
its output bias on that branch (Michel, Levy & Neubig 2019 prune whole layers' heads).

Features (``return_features=True``): ``embeddings`` ``[B, L, H]`` (after the embedding
LayerNorm), ``hidden{i}`` ``[B, L, H]`` (output of layer ``i - 1``), ``query{i}``,
``key{i}``, ``value{i}`` ``[B, heads, L, d]``, ``attention_scores{i}`` ``[B, heads, L, L]``
(S above: scaled, mask added), ``attention_probs{i}`` (A), ``embedding`` ``[B, H]`` (the
pooled vector that feeds the head) and ``mask`` ``[B, L]`` float32. Scores, probabilities
and the mask are float32; the rest are in ``dtype``.

Mixed precision and rematerialisation (:mod:`jaxkd.models.compute`): matmuls in ``dtype``,
parameters in ``param_dtype``, LayerNorm, the attention scores and softmax in float32, logits
in float32; ``remat_policy`` wraps every layer in ``nn.remat``, names unchanged.

Logical axes (:mod:`jaxkd.models.axes`, registered as ``'bert'``, :data:`AXES`): the vocab
dimension of the word embeddings and the head's classes are ``vocab``, the hidden size is
``embed``, the flattened ``heads * d`` of Q/K/V and of the attention output's input is
``heads``, the FFN width is ``mlp``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxkd.models import axes
from jaxkd.models.compute import as_dtype, checkpoint_policy, remat_block
from jaxkd.schema import ConfigError

POOLINGS = ("cls", "mean", "pooler")
MASK_BIAS = -10000.0  # added to the attention scores of padded keys (Google's BERT)
INIT = nn.initializers.normal(0.02)  # BERT's initializer_range

AXES: tuple[axes.Rule, ...] = (
    (r"(.*/)?embeddings/word_embeddings/embedding", ("vocab", "embed")),
    (r"(.*/)?embeddings/.*_embeddings/embedding", (None, "embed")),
    (r"(.*/)?LayerNorm/(scale|bias)", ("embed",)),
    (r"(.*/)?attention/(query|key|value)/kernel", ("embed", "heads")),
    (r"(.*/)?attention/(query|key|value)/(bias|.*step.*)", ("heads",)),
    (r"(.*/)?attention/output/kernel", ("heads", "embed")),
    (r"(.*/)?intermediate/kernel", ("embed", "mlp")),
    (r"(.*/)?intermediate/(bias|.*step.*)", ("mlp",)),
    (r"(.*/)?layer\d+/output/kernel", ("mlp", "embed")),
    (r"(.*/)?(attention/output|layer\d+/output)/(bias|.*step.*)", ("embed",)),
    (r"(.*/)?head/kernel", ("embed", "vocab")),
    (r"(.*/)?head/(bias|.*step.*)", ("vocab",)),
    (r".*kernel", ("embed", "mlp")),  # the pooler
    (r".*", ("mlp",)),
)
axes.register("bert", AXES)


def layer_norm(eps: float, param_dtype: DTypeLike, name: str) -> nn.LayerNorm:
    """LayerNorm (Ba, Kiros & Hinton 2016) computed and returned in float32, two-pass
    variance."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                        use_fast_variance=False, name=name)


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum_t m_t h_t / max(sum_t m_t, 1e-9)`` over tokens, in float32: sentence-transformers'
    mean pooling (Reimers & Gurevych 2019). ``hidden`` ``[B, L, H]``, ``mask`` ``[B, L]``
    (1 = token, 0 = padding); returns ``[B, H]`` float32."""
    mask = mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
    return total / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)


class BertEmbeddings(nn.Module):
    """``LN(word[ids] + position[0..L-1] + token_type[types])`` ``[B, L, H]`` float32."""

    vocab_size: int
    hidden_size: int
    max_position: int
    type_vocab_size: int
    layer_norm_eps: float
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        embed = functools.partial(nn.Embed, features=self.hidden_size, embedding_init=INIT,
                                  dtype=jnp.float32, param_dtype=self.param_dtype)
        positions = jnp.arange(input_ids.shape[1])[None]
        x = (embed(self.vocab_size, name="word_embeddings")(input_ids)
             + embed(self.max_position, name="position_embeddings")(positions)
             + embed(self.type_vocab_size, name="token_type_embeddings")(token_type_ids))
        return layer_norm(self.layer_norm_eps, self.param_dtype, "LayerNorm")(x)


class BertAttention(nn.Module):
    """Multi-head self-attention with its residual and LayerNorm (HF's BertAttention):
    ``LN(x + concat_h(softmax(Q_h K_h^T / sqrt(d) + M) V_h) W_o + b_o)``."""

    hidden_size: int
    num_heads: int
    head_dim: int
    layer_norm_eps: float
    dropout_rate: float
    attention_dropout_rate: float
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask_bias: jax.Array, train: bool
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        dense = functools.partial(nn.Dense, kernel_init=INIT, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        batch, length, _ = x.shape
        h, d = self.num_heads, self.head_dim

        def split_heads(name: str) -> jax.Array:  # [B, L, h d] -> [B, h, L, d]
            y = dense(h * d, name=name)(x)
            return y.reshape(batch, length, h, d).transpose(0, 2, 1, 3)

        q, k, v = split_heads("query"), split_heads("key"), split_heads("value")
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(d) + mask_bias[:, None, None, :]
        probs = jax.nn.softmax(scores, axis=-1)
        dropped = nn.Dropout(self.attention_dropout_rate, deterministic=not train)(probs)
        context = jnp.einsum("bhqk,bhkd->bhqd", dropped.astype(self.dtype), v)
        context = context.transpose(0, 2, 1, 3).reshape(batch, length, h * d)
        out = dense(self.hidden_size, name="output")(context)
        out = nn.Dropout(self.dropout_rate, deterministic=not train)(out)
        y = layer_norm(self.layer_norm_eps, self.param_dtype, "LayerNorm")(
            x.astype(jnp.float32) + out.astype(jnp.float32))
        features = {"query": q, "key": k, "value": v, "attention_scores": scores,
                    "attention_probs": probs}
        return y.astype(self.dtype), features


class BertLayer(nn.Module):
    """One encoder layer (HF's BertLayer): attention, then
    ``LN(x + GELU(x W_1 + b_1) W_2 + b_2)``. Called as ``layer(x, train, mask_bias)``:
    ``train`` is argument 2 (counting ``self``), static under :func:`remat_block`."""

    hidden_size: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    layer_norm_eps: float
    dropout_rate: float
    attention_dropout_rate: float
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask_bias: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        dense = functools.partial(nn.Dense, kernel_init=INIT, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        x, features = BertAttention(
            self.hidden_size, self.num_heads, self.head_dim, self.layer_norm_eps,
            self.dropout_rate, self.attention_dropout_rate, self.dtype, self.param_dtype,
            name="attention")(x, mask_bias, train)
        y = nn.gelu(dense(self.intermediate_size, name="intermediate")(x), approximate=False)
        y = dense(self.hidden_size, name="output")(y)
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = layer_norm(self.layer_norm_eps, self.param_dtype, "LayerNorm")(
            x.astype(jnp.float32) + y.astype(jnp.float32))
        return y.astype(self.dtype), features


class BertEncoder(nn.Module):
    """BERT encoder with a classifier ``head`` on the pooled vector (module docstring).

    Attributes:
      num_classes: number of logits.
      vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_position,
        type_vocab_size, layer_norm_eps: as HF's BertConfig (``num_hidden_layers``,
        ``num_attention_heads``, ``max_position_embeddings``); the defaults are
        all-MiniLM-L6-v2's (Wang et al. 2020, "MiniLM").
      dropout_rate: HF's ``hidden_dropout_prob``; attention_dropout_rate:
        ``attention_probs_dropout_prob``.
      pooling: what feeds the head: ``'cls'``, ``'mean'`` or ``'pooler'`` (:data:`POOLINGS`).
      head_dim: width of one head; 0 = ``hidden_size // num_heads``.
      layer_heads: heads of each layer (``()`` = ``num_heads`` everywhere).
      layer_intermediate: FFN width of each layer (``()`` = ``intermediate_size``).
      dtype: dtype of the activations and of the matmuls.
      param_dtype: dtype in which the parameters are stored.
      remat_policy: rematerialise every layer with this policy
        (:data:`jaxkd.models.compute.REMAT_POLICIES`); ``''`` keeps all activations.
    """

    num_classes: int
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    pooling: str = "cls"
    head_dim: int = 0
    layer_heads: tuple = ()
    layer_intermediate: tuple = ()
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    remat_policy: str = ""

    def heads_of(self, i: int) -> int:
        """Number of heads of ``layer{i}`` (from 0)."""
        return self.layer_heads[i] if self.layer_heads else self.num_heads

    def intermediate_of(self, i: int) -> int:
        """FFN width of ``layer{i}`` (from 0)."""
        return self.layer_intermediate[i] if self.layer_intermediate else self.intermediate_size

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        train: bool = False,
        return_features: bool = False,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Logits ``[B, num_classes]`` float32 for token ids ``[B, L]``; ``attention_mask``
        ``[B, L]`` is 1 on tokens and 0 on padding (None: all tokens), ``token_type_ids``
        ``[B, L]`` the segments (None: all 0)."""
        if input_ids.ndim != 2:
            raise ValueError(f"bert expects token ids [B, L], got shape {input_ids.shape}")
        if input_ids.shape[1] > self.max_position:
            raise ValueError(f"bert: sequence length {input_ids.shape[1]} exceeds "
                             f"max_position={self.max_position}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"bert: pooling={self.pooling!r} is not one of {POOLINGS}")
        input_ids = jnp.asarray(input_ids).astype(jnp.int32)
        mask = (jnp.ones(input_ids.shape, jnp.float32) if attention_mask is None
                else jnp.asarray(attention_mask).astype(jnp.float32))
        types = (jnp.zeros_like(input_ids) if token_type_ids is None
                 else jnp.asarray(token_type_ids).astype(jnp.int32))
        head_dim = self.head_dim or self.hidden_size // self.num_heads
        precision = {"dtype": self.dtype, "param_dtype": self.param_dtype}

        x = BertEmbeddings(self.vocab_size, self.hidden_size, self.max_position,
                           self.type_vocab_size, self.layer_norm_eps, self.param_dtype,
                           name="embeddings")(input_ids, types).astype(self.dtype)
        features: dict[str, jax.Array] = {"embeddings": x}
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        mask_bias = MASK_BIAS * (1.0 - mask)
        layer = remat_block(BertLayer, self.remat_policy)
        for i in range(self.num_layers):
            x, attention = layer(
                self.hidden_size, self.heads_of(i), head_dim, self.intermediate_of(i),
                self.layer_norm_eps, self.dropout_rate, self.attention_dropout_rate,
                name=f"layer{i}", **precision)(x, train, mask_bias)
            features[f"hidden{i + 1}"] = x
            features.update({f"{key}{i + 1}": value for key, value in attention.items()})

        if self.pooling == "cls":
            pooled = x[:, 0]
        elif self.pooling == "mean":
            pooled = mean_pool(x, mask).astype(self.dtype)
        else:
            pooled = jnp.tanh(nn.Dense(self.hidden_size, kernel_init=INIT, name="pooler",
                                       **precision)(x[:, 0]))
        features["embedding"] = pooled
        features["mask"] = mask
        pooled = nn.Dropout(self.dropout_rate, deterministic=not train)(pooled)
        logits = nn.Dense(self.num_classes, kernel_init=INIT, name="head", **precision)(pooled)
        logits = logits.astype(jnp.float32)
        return (logits, features) if return_features else logits


def _field(name: str) -> str:
    return f"config.model.kwargs.{name}"


def _positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{_field(name)}={value!r} must be an integer >= {minimum}")
    return value


def _per_layer(name: str, values: Sequence[int], num_layers: int) -> tuple[int, ...]:
    values = tuple(values)
    if values and len(values) != num_layers:
        raise ConfigError(f"{_field(name)} has {len(values)} entries, but num_layers="
                          f"{num_layers} (give one per layer, or () for all equal)")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{_field(name)}={values!r} must hold integers >= 0")
    return values


def build_bert(
    *,
    num_classes: int,
    vocab_size: int = 30522,
    hidden_size: int = 384,
    num_layers: int = 6,
    num_heads: int = 12,
    intermediate_size: int = 1536,
    max_position: int = 512,
    type_vocab_size: int = 2,
    layer_norm_eps: float = 1e-12,
    dropout_rate: float = 0.1,
    attention_dropout_rate: float = 0.1,
    pooling: str = "cls",
    head_dim: int = 0,
    layer_heads: Sequence[int] = (),
    layer_intermediate: Sequence[int] = (),
    dtype: DTypeLike = "float32",
    param_dtype: DTypeLike = "float32",
    remat_policy: str = "",
) -> BertEncoder:
    """BERT encoder (:class:`BertEncoder`; defaults: all-MiniLM-L6-v2's shape, 6 layers,
    hidden 384, 12 heads, FFN 1536). Input: token ids ``[B, L]``, L <= ``max_position``.

    Raises:
      ConfigError: one line naming ``config.model.kwargs.<field>``.
    """
    for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                        ("num_layers", num_layers), ("num_heads", num_heads),
                        ("intermediate_size", intermediate_size),
                        ("max_position", max_position), ("type_vocab_size", type_vocab_size)):
        _positive_int(name, value)
    _positive_int("head_dim", head_dim, minimum=0)
    if head_dim == 0 and hidden_size % num_heads:
        raise ConfigError(f"{_field('hidden_size')}={hidden_size} is not divisible by "
                          f"num_heads={num_heads} (or set head_dim)")
    layer_heads = _per_layer("layer_heads", layer_heads, num_layers)
    layer_intermediate = _per_layer("layer_intermediate", layer_intermediate, num_layers)
    for name, rate in (("dropout_rate", dropout_rate),
                       ("attention_dropout_rate", attention_dropout_rate)):
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate < 1:
            raise ConfigError(f"{_field(name)}={rate!r} must be in [0, 1)")
    if isinstance(layer_norm_eps, bool) or not isinstance(layer_norm_eps, int | float) or \
            not layer_norm_eps > 0:
        raise ConfigError(f"{_field('layer_norm_eps')}={layer_norm_eps!r} must be > 0")
    if pooling not in POOLINGS:
        raise ConfigError(f"{_field('pooling')}={pooling!r} is not a pooling; allowed: "
                          f"{', '.join(POOLINGS)}")
    checkpoint_policy(remat_policy)  # refuses an unknown name early
    return BertEncoder(
        num_classes=num_classes, vocab_size=vocab_size, hidden_size=hidden_size,
        num_layers=num_layers, num_heads=num_heads, intermediate_size=intermediate_size,
        max_position=max_position, type_vocab_size=type_vocab_size,
        layer_norm_eps=float(layer_norm_eps), dropout_rate=float(dropout_rate),
        attention_dropout_rate=float(attention_dropout_rate), pooling=pooling,
        head_dim=head_dim, layer_heads=layer_heads, layer_intermediate=layer_intermediate,
        dtype=as_dtype(dtype, "dtype"), param_dtype=as_dtype(param_dtype, "param_dtype"),
        remat_policy=remat_policy)
