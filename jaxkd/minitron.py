"""Prune, then distil (Minitron: Muralidharan et al. 2024, "Compact Language Models via
Pruning and Knowledge Distillation"): a smaller Gemma 3 cut out of the teacher.

Importance on a calibration set of token batches (real tokens only, by ``mask``):

- **depth**: Block Influence (Men et al. 2024, "ShortGPT"),
  ``BI_i = 1 - mean_t cos(x_t^(i-1), x_t^(i))`` between the hidden state entering layer
  ``i`` and leaving it: a layer that barely turns its input scores near 0;
- **FFN width**: Minitron's activation importance of each FFN neuron,
  ``mean_t |gelu(x W_gate) * (x W_up)|_n`` at the input of ``ffn_down``.

:func:`select_layers` keeps ``k`` layers of highest total influence, in order, such that
kept layer ``j`` has the type (sliding-window or global) that position ``j`` has in a
``k``-layer Gemma 3 (every ``global_every``-th global): the student runs each kept block
exactly as the teacher ran it (same RoPE base, same window). :func:`prune` builds the
student: those layers, each keeping its ``ffn_width`` most important FFN neurons (the
columns of ``ffn_gate`` and ``ffn_up``, the rows of ``ffn_down``); embeddings, norms and
attention are copied. Distillation then recovers what was cut (``jaxkd.token_kd``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxkd.models.gemma import Gemma3
from jaxkd.schema import ConfigError


def importance(model: Gemma3, variables: Mapping[str, Any],
               batches: Iterable[tuple[Any, Any]]) -> dict[str, np.ndarray]:
    """``{'blocks': [N] Block Influence, 'ffn': [N] arrays of per-neuron mean |activation|}``
    over ``batches`` of ``(ids [B, L], mask [B, L])`` (module docstring)."""

    def capture(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, nn.Dense) and \
                module.name == "ffn_down":
            module.sow("intermediates", "ffn_input", args[0])
        return next_fun(*args, **kwargs)

    @jax.jit  # the weights are an argument, not constants baked into the compiled function
    def stats(v, ids, mask):
        with nn.intercept_methods(capture):
            feats, state = model.apply(v, ids, mask, return_logits=False,
                                       mutable=["intermediates"])
        keep = mask.astype(jnp.float32)
        xs = [feats["embeddings"]] + [feats[f"hidden{i + 1}"] for i in range(model.num_layers)]
        cos = []
        for a, b in zip(xs[:-1], xs[1:], strict=True):
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
            c = jnp.sum(a * b, -1) / jnp.maximum(
                jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
            cos.append(jnp.sum(c * keep))
        inter = state["intermediates"]
        ffn = [jnp.einsum("bln,bl->n", jnp.abs(inter[f"layer{i}"]["ffn_down"]["ffn_input"][0]
                                               .astype(jnp.float32)), keep)
               if f"layer{i}" in inter else jnp.zeros((0,))
               for i in range(model.num_layers)]
        return jnp.stack(cos), ffn, jnp.sum(keep)

    cos_sum, ffn_sum, tokens = None, None, 0.0
    for ids, mask in batches:
        c, f, n = jax.device_get(stats(variables, jnp.asarray(ids), jnp.asarray(mask)))
        cos_sum = c if cos_sum is None else cos_sum + c
        ffn_sum = f if ffn_sum is None else [a + b for a, b in zip(ffn_sum, f, strict=True)]
        tokens += float(n)
    if not tokens:
        raise ValueError("importance: the calibration batches hold no token (mask all 0)")
    return {"blocks": 1.0 - np.asarray(cos_sum) / tokens,
            "ffn": [np.asarray(f) / tokens for f in ffn_sum]}


def is_global(layer: int, global_every: int) -> bool:
    return (layer + 1) % global_every == 0


def select_layers(influence: Sequence[float], keep: int, global_every: int) -> list[int]:
    """The ``keep`` teacher layers, ascending, of highest total influence such that kept
    layer ``j`` is global exactly when layer ``j`` of a ``keep``-layer model is (dynamic
    programming over (student slot, teacher layer))."""
    n = len(influence)
    if not 1 <= keep <= n:
        raise ConfigError(f"keep={keep} layers: must be 1..{n}")
    neg = -np.inf
    best = np.full((keep + 1, n + 1), neg)  # best[j][i]: slots 0..j-1 from teacher 0..i-1
    best[0, :] = 0.0
    take = np.zeros((keep + 1, n + 1), bool)  # whether best[j][i] puts layer i-1 in slot j-1
    for j in range(1, keep + 1):
        want = is_global(j - 1, global_every)
        for i in range(1, n + 1):
            best[j, i] = best[j, i - 1]
            if is_global(i - 1, global_every) == want and best[j - 1, i - 1] > neg:
                candidate = best[j - 1, i - 1] + float(influence[i - 1])
                if candidate > best[j, i]:
                    best[j, i], take[j, i] = candidate, True
    if best[keep, n] == neg:
        raise ConfigError(f"keep={keep} layers cannot follow Gemma 3's pattern (a global layer "
                          f"every {global_every}) with the teacher's {n} layers")
    chosen, i = [], n
    for j in range(keep, 0, -1):
        while not take[j, i]:
            i -= 1
        chosen.append(i - 1)
        i -= 1
    return chosen[::-1]


def prune(model: Gemma3, variables: Mapping[str, Any], layers: Sequence[int],
          ffn_importance: Sequence[np.ndarray] | None = None,
          ffn_width: int | Sequence[int] | None = None) -> tuple[Gemma3, dict[str, Any]]:
    """``(student, student_variables)``: teacher ``layers`` (ascending, pattern-preserving:
    :func:`select_layers`), each with its ``ffn_width`` most important FFN neurons
    (``ffn_importance``; None keeps them all), in the teacher's order."""
    layers = [int(i) for i in layers]
    if sorted(set(layers)) != layers or not layers or layers[-1] >= model.num_layers:
        raise ConfigError(f"layers={layers}: teacher layers 0..{model.num_layers - 1}, "
                          "ascending, each once")
    for j, t in enumerate(layers):
        if is_global(j, model.global_every) != is_global(t, model.global_every):
            kinds = ("local", "global")
            raise ConfigError(f"layers={layers}: teacher layer {t} "
                              f"({kinds[is_global(t, model.global_every)]}) would run as "
                              f"{kinds[is_global(j, model.global_every)]} layer {j} of the "
                              "student")
    teacher_widths = list(model.layer_intermediate or (model.intermediate_size,)
                          * model.num_layers)
    widths = ([teacher_widths[t] for t in layers] if ffn_width is None else
              [int(ffn_width)] * len(layers) if isinstance(ffn_width, int) else
              [int(w) for w in ffn_width])
    flat = traverse_util.flatten_dict(dict(variables["params"]))
    out = {k: v for k, v in flat.items() if not k[0].startswith("layer")}
    for j, t in enumerate(layers):
        width = widths[j]
        if not 0 < width <= teacher_widths[t]:
            raise ConfigError(f"ffn_width {width} for teacher layer {t} of "
                              f"{teacher_widths[t]} neurons")
        kept = None
        if width < teacher_widths[t]:
            if ffn_importance is None:
                raise ConfigError("ffn_width below the teacher's needs ffn_importance")
            kept = np.sort(np.argsort(-np.asarray(ffn_importance[t]), kind="stable")[:width])
        for k, v in flat.items():
            if k[0] != f"layer{t}":
                continue
            if kept is not None and k[1] in ("ffn_gate", "ffn_up"):
                v = jnp.asarray(v)[:, kept]
            elif kept is not None and k[1] == "ffn_down":
                v = jnp.asarray(v)[kept, :]
            out[(f"layer{j}", *k[1:])] = v
    uniform = len(set(widths)) == 1
    student = model.clone(
        parent=None, num_layers=len(layers),
        intermediate_size=widths[0] if uniform else model.intermediate_size,
        layer_intermediate=None if uniform else tuple(widths))
    return student, {"params": traverse_util.unflatten_dict(out)}
