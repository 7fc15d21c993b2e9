"""Students initialised from the teacher's weights ("parameter distillation").

Instead of a random draw, the student starts from a slice of a trained teacher of the same
family, then is distilled as usual. Two methods (``config.init.method``), and ``copy``, which
continues the same model from a finished run (each stage of a ``jaxkd.compression`` pipeline
starts where the previous one ended), and ``pretrained``, which starts a BERT from a Hugging
Face checkpoint (``config.init.pretrained``; :func:`pretrained_variables`):

``layer_select``: a *shallower* student of the same width keeps chosen teacher layers, in
order, as DistilBERT keeps one layer out of two (Sanh, Debut, Chaumond & Wolf, "DistilBERT,
a distilled version of BERT", 2019). ``config.init.keep_layers`` lists the kept teacher
layers, 0-based (``()`` = every other one, ``0, 2, 4, ...``):

- ``mlp``: student ``hidden{j+1}`` <- teacher ``hidden{keep[j]+1}``; the first kept layer is
  layer 0 (it reads the input) and the widths must chain; ``head`` is copied.
- ``bert``: student ``layer{j}`` <- teacher ``layer{keep[j]}`` (any increasing choice; the
  teacher's layer 0 need not be kept: every layer reads and writes the same hidden size);
  the embeddings, pooler and ``head`` are copied (DistilBERT's initialisation, and
  TinyBERT's / MiniLM's students taken from their teachers' layers).
- CIFAR ResNets and WRNs: in every stage, student block ``j`` <- teacher block ``keep[j]``
  (``keep[0]`` is 0: the first block of a stage holds the stride and projection); the stem,
  ``final_bn`` and ``head`` are copied, BatchNorm statistics too (e.g. ``resnet32`` from
  ``resnet56`` by default, ``keep = (0, 2, 4, 6, 8)``; ``resnet20`` with ``(0, 4, 8)``).

``prune_width``: a *narrower* student of the same depth keeps, in every layer, the neurons or
channels of largest importance, Minitron's activation-based width pruning (Muralidharan et
al., "Compact Language Models via Pruning and Knowledge Distillation", 2024; Sreenivas et al.,
"LLM Pruning and Distillation in Practice: The Minitron Approach", 2024)::

    importance_c = mean over calibration examples (and positions) of |a_c|

where ``a`` is the layer's output after its nonlinearity, on the first
``config.init.calibration_examples`` calibration images, in inference mode. The kept units
stay in the teacher's order; each layer's incoming weights are sliced on both axes (kept
inputs of the previous layer, kept outputs of this one), biases and BatchNorm parameters and
statistics on their channel axis:

- ``mlp``: the hidden neurons; the head keeps the rows of the last layer's kept neurons.
- ``cnn1d``: the channels of ``conv1..conv3``; the head's input is the position-major
  flattened ``[L, C]`` map, so it keeps rows ``l * C + c`` for every position ``l`` and kept
  channel ``c``.
- ``bert``: per layer, whole attention heads (``mean |A V|`` of the head over real tokens)
  and FFN neurons (``mean |GELU(x W_1 + b_1)|``; :func:`bert_importance`), to the student's
  ``layer_heads`` / ``layer_intermediate`` (or a narrower ``intermediate_size``); the hidden
  size, embeddings, LayerNorms, pooler and head are kept whole. Head pruning as in Michel,
  Levy & Neubig, "Are Sixteen Heads Really Better than One?" (2019), ranked by activation
  as Minitron ranks heads and neurons, or, with ``config.init.importance='gradient'``, by
  Michel et al.'s ``mean |dL/d xi|`` of a gate on each head (and neuron) on the labelled
  calibration examples (:func:`bert_gradient_importance`); the pruned model computes the
  teacher's function with those heads and neurons removed, exactly.
- CIFAR ResNets: a block's inner channels (after ``bn1``) per block; the residual stream per
  stage, the same channels for every block of the stage (they add into one another), ranked
  by the mean importance over the stage's block outputs. Where the first stage has no
  projection shortcut the stem writes into the stage-1 stream and shares its channels.

A pruned layer computes the teacher's kept units exactly when all of its inputs are kept (the
first layer, or a layer whose predecessor kept its full width); otherwise it misses the dropped
inputs' contributions, which the distillation that follows recovers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxkd import schema, surgery
from jaxkd.config import Init
from jaxkd.models.bert import BertEncoder
from jaxkd.models.cnn1d import CNN1D
from jaxkd.models.gemma import Gemma3
from jaxkd.models.lenet import LeNet5
from jaxkd.models.mlp import MLP
from jaxkd.models.resnet import BasicBlock, CifarResNet
from jaxkd.models.wrn import WideResNet
from jaxkd.schema import ConfigError

_FAMILIES = {MLP: "mlp", CNN1D: "cnn1d", LeNet5: "lenet5", CifarResNet: "CIFAR ResNet",
             WideResNet: "WRN", BertEncoder: "bert", Gemma3: "gemma3"}
_SUPPORTED = {"layer_select": (MLP, CifarResNet, WideResNet, BertEncoder),
              "prune_width": (MLP, CNN1D, CifarResNet, BertEncoder),
              "minitron": (Gemma3,)}

Plan = surgery.Plan  # module path -> (kept inputs, kept outputs)


def init_from_teacher(
    init: Init | Mapping[str, Any],
    *,
    teacher_model: nn.Module,
    teacher_variables: Mapping[str, Any],
    student_model: nn.Module,
    student_variables: Mapping[str, Any],
    calibration_images: np.ndarray | jax.Array | None,
    calibration_labels: np.ndarray | jax.Array | None = None,
) -> dict[str, Any]:
    """The student's variables filled from the teacher's, by ``init.method``.

    Args:
      init: ``config.init`` (:class:`jaxkd.config.Init`, or its fields).
      teacher_model, teacher_variables: the trained teacher (``{'params', ['batch_stats']}``).
      student_model, student_variables: the student and its freshly initialised variables
        (arrays or ``jax.ShapeDtypeStruct``s); only their tree, shapes and dtypes are used.
      calibration_images: ``[N, *input_shape]`` inputs for ``prune_width`` (the first
        ``init.calibration_examples`` are used; a tuple for several inputs); ignored by the
        other methods.
      calibration_labels: ``[N]`` their labels, for ``init.importance='gradient'``.

    Returns:
      A dict with ``student_variables``' tree, shapes and dtypes (host numpy arrays; put
      them on devices with ``jax.device_put``), or ``dict(student_variables)`` when
      ``init.method`` is ``''``.

    Raises:
      ValueError: in one line naming the ``config.init`` field, for an unknown method, a
        family the method does not support or a student of another family than the
        teacher's, bad ``keep_layers``, a student wider than the teacher or of another
        depth for ``prune_width``, missing calibration images, or a student whose layers
        do not fit the teacher's slices.
    """
    init = schema.parse(Init, init, "config.init")
    method = init.method
    if not method:
        return dict(student_variables)
    if method == "copy":
        return copy_variables(teacher_variables, student_variables)
    _check_families(method, teacher_model, student_model)
    if method == "minitron":
        return _minitron(init, teacher_model, teacher_variables, student_model,
                         student_variables, calibration_images)
    teacher_flat = traverse_util.flatten_dict(jax.device_get(dict(teacher_variables)))
    if method == "layer_select":
        depth_t, depth_s = _depth(teacher_model), _depth(student_model)
        unit = ("hidden layers" if isinstance(teacher_model, MLP) else "encoder layers"
                if isinstance(teacher_model, BertEncoder) else "blocks per stage")
        keep, field = _keep_layers(init.keep_layers, depth_t, depth_s, unit)
        renamed = _layer_select_names(teacher_model, keep)
        flat = {(key[0], renamed[key[1]], *key[2:]): value
                for key, value in teacher_flat.items() if key[1] in renamed}
        return _fit(flat, student_variables, field)

    field = "config.init.method='prune_width'"
    if init.keep_layers:
        raise ConfigError(f"config.init.keep_layers={init.keep_layers!r} is only for "
                          f"layer_select; prune_width keeps every layer (set it to ())")
    if _depth(teacher_model) != _depth(student_model):
        raise ConfigError(f"{field} keeps the teacher's depth, but the teacher has "
                          f"{_depth(teacher_model)} and the student {_depth(student_model)} "
                          f"layers (or blocks per stage); drop layers with layer_select")
    if init.importance == "gradient" and not isinstance(teacher_model, BertEncoder):
        raise ConfigError("config.init.importance='gradient' ranks BERT heads and FFN "
                          f"neurons; for {_FAMILIES[type(teacher_model)]} use 'activation'")
    if isinstance(teacher_model, BertEncoder):
        ids, mask = (_calibration_batch(init, x) for x in (
            calibration_images if calibration_images is not None else (None, None)))
        if init.importance == "gradient":
            if calibration_labels is None:
                raise ConfigError("config.init.importance='gradient' needs the calibration "
                                  "examples' labels")
            importance = bert_gradient_importance(
                teacher_model, teacher_variables, ids, mask,
                np.asarray(calibration_labels)[:len(ids)])
        else:
            importance = bert_importance(teacher_model, teacher_variables, ids, mask)
        return _fit(_bert_slices(teacher_flat, importance, teacher_model, student_model),
                    student_variables, field)
    images = _calibration_batch(init, calibration_images)
    importance = mean_abs_activations(teacher_model, teacher_variables, images)
    student_params = student_variables["params"]
    if isinstance(teacher_model, MLP):
        plan = _mlp_plan(importance, student_params)
    elif isinstance(teacher_model, CNN1D):
        plan = _cnn1d_plan(importance, student_params, teacher_variables["params"])
    else:
        plan = _resnet_plan(importance, student_params, teacher_variables["params"])
    return _fit(surgery.slice_variables(teacher_flat, plan), student_variables, field)


def mean_abs_activations(model: nn.Module, variables: Mapping[str, Any], images: Any, *,
                         batch_size: int = 256) -> dict[str, np.ndarray]:
    """Minitron's activation importance: ``mean |a|`` per unit (last axis), inference mode.

    The mean runs over the examples of ``images`` (in chunks of ``batch_size``) and every
    position, on this process's default device (host copies of ``variables``, so replicated
    multi-process arrays are fine). Sites: ``hidden{i}`` (MLP) and ``conv{i}`` (cnn1d), the
    post-ReLU features; for CIFAR ResNets ``stem_bn`` (after its ReLU), ``stage{s}_block{b}``
    (block outputs) and ``stage{s}_block{b}/bn1`` (a block's inner channels, after the ReLU).

    Returns:
      ``{site: float64 [units]}``.
    """
    if isinstance(model, CifarResNet):
        def capture(module: nn.Module, method_name: str) -> bool:
            return method_name == "__call__" and isinstance(module, BasicBlock | nn.BatchNorm)
    else:
        capture = False

    @jax.jit
    def chunk_means(variables: Any, x: jax.Array) -> dict[str, jax.Array]:
        (_, features), state = model.apply(variables, x, train=False, return_features=True,
                                           capture_intermediates=capture,
                                           mutable=["intermediates"])
        if capture:
            sites = {}
            for path, (value,) in traverse_util.flatten_dict(state["intermediates"]).items():
                name = "/".join(path[:-1])  # drop '__call__'
                bn_site = name == "stem_bn" or name.endswith("/bn1")
                if bn_site or "/" not in name:
                    sites[name] = nn.relu(value) if bn_site else value
        else:
            sites = {k: v for k, v in features.items() if k != "embedding"}
        return {k: jnp.mean(jnp.abs(v).reshape(-1, v.shape[-1]), axis=0)
                for k, v in sites.items()}

    host_variables = jax.device_get(dict(variables))  # run on this process's default device
    total: dict[str, np.ndarray] = {}
    n = len(images)
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        for site, value in jax.device_get(chunk_means(host_variables, jnp.asarray(chunk))).items():
            total[site] = total.get(site, 0.0) + np.asarray(value, np.float64) * len(chunk) / n
    return total


def bert_importance(model: BertEncoder, variables: Mapping[str, Any], input_ids: Any,
                    attention_mask: Any, *, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Activation importance of a BERT's heads and FFN neurons over the real tokens of a
    calibration batch (Minitron's criterion; inference mode)::

        heads{i}[h] = mean over tokens and the head's d dims of |context_h|   (A V of head h)
        ffn{i}[n]   = mean over tokens of |GELU(x W_1 + b_1)_n|

    ``i`` counts layers from 0 (``layer{i}``); padding tokens do not count. Returns float64
    arrays ``[heads]`` and ``[FFN width]``.
    """
    from jaxkd import quant

    head_dim = model.head_dim or model.hidden_size // model.num_heads

    @jax.jit
    def sums(v: Any, ids: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
        captured = quant.capture_inputs(model, v, (ids, mask))
        m = mask.astype(jnp.float32)[..., None]
        out = {}
        for i in range(model.num_layers):
            if model.heads_of(i):
                context = jnp.abs(captured[f"layer{i}/attention/output"]) * m
                out[f"heads{i}"] = context.reshape(*context.shape[:2], -1, head_dim).sum(
                    axis=(0, 1, 3)) / head_dim
            if model.intermediate_of(i):
                out[f"ffn{i}"] = (jnp.abs(captured[f"layer{i}/output"]) * m).sum(axis=(0, 1))
        return out

    host = jax.device_get(dict(variables))
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    total: dict[str, np.ndarray] = {}
    for start in range(0, len(ids), batch_size):
        chunk = slice(start, start + batch_size)
        for site, value in jax.device_get(sums(host, ids[chunk], mask[chunk])).items():
            total[site] = total.get(site, 0.0) + np.asarray(value, np.float64)
    tokens = max(float(mask.sum()), 1.0)
    return {site: value / tokens for site, value in total.items()}


def bert_gradient_importance(model: BertEncoder, variables: Mapping[str, Any],
                             input_ids: Any, attention_mask: Any, labels: Any, *,
                             batch_size: int = 32) -> dict[str, np.ndarray]:
    """Michel, Levy & Neubig's head importance (2019) and its FFN analogue::

        heads{i}[h] = mean over examples x of |dL(x)/d xi_h|,   ffn{i}[n] alike

    where ``xi_h`` gates head ``h``'s context (``A V``) before the attention output
    projection, ``xi_n`` FFN neuron ``n``'s activation before ``W_2``, both 1 in the model,
    and ``L(x)`` is the model's cross-entropy on example ``x``'s label (inference mode).
    Same keys and shapes as :func:`bert_importance`."""
    head_dim = model.head_dim or model.hidden_size // model.num_heads

    def per_example_loss_sum(gates, v, ids, mask, y):
        def gated(next_fun, args, kwargs, context):
            path = context.module.path
            if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
                x = args[0]
                if path[1:] == ("attention", "output") and f"heads{path[0][5:]}" in gates:
                    g = gates[f"heads{path[0][5:]}"]  # [B, heads]
                    x = (x.reshape(*x.shape[:2], -1, head_dim) * g[:, None, :, None]
                         ).reshape(x.shape)
                elif path[1:] == ("output",) and f"ffn{path[0][5:]}" in gates:
                    x = x * gates[f"ffn{path[0][5:]}"][:, None, :]  # [B, F]
                return next_fun(x, *args[1:], **kwargs)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(gated):
            logits = model.apply(v, ids, mask, train=False)
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(log_p, y[:, None], axis=-1).sum()

    grad = jax.jit(jax.grad(per_example_loss_sum))
    host = jax.device_get(dict(variables))
    ids, mask, y = np.asarray(input_ids), np.asarray(attention_mask), np.asarray(labels)
    total: dict[str, np.ndarray] = {}
    for start in range(0, len(ids), batch_size):
        chunk = slice(start, start + batch_size)
        b = len(ids[chunk])
        gates = {}
        for i in range(model.num_layers):
            if model.heads_of(i):
                gates[f"heads{i}"] = jnp.ones((b, model.heads_of(i)), jnp.float32)
            if model.intermediate_of(i):
                gates[f"ffn{i}"] = jnp.ones((b, model.intermediate_of(i)), jnp.float32)
        g = jax.device_get(grad(gates, host, ids[chunk], mask[chunk], y[chunk]))
        for site, value in g.items():  # |per-example gradient|, summed over examples
            total[site] = total.get(site, 0.0) + np.abs(np.asarray(value, np.float64)).sum(0)
    return {site: value / len(ids) for site, value in total.items()}


def _bert_slices(flat: Mapping[tuple[str, ...], Any], importance: Mapping[str, np.ndarray],
                 teacher: BertEncoder, student: BertEncoder) -> dict[tuple[str, ...], Any]:
    """The teacher's parameters with each layer's most important heads and FFN neurons
    kept (the student's ``heads_of(i)`` / ``intermediate_of(i)``): Q, K, V columns and the
    attention output's rows of the kept heads, the FFN's columns and rows of the kept
    neurons; everything else copied."""
    head_dim = teacher.head_dim or teacher.hidden_size // teacher.num_heads
    if (student.head_dim or student.hidden_size // student.num_heads) != head_dim:
        raise ConfigError("config.init.method='prune_width' keeps whole heads: the student's "
                          f"head width must be the teacher's ({head_dim}); keep num_heads and "
                          "hidden_size, and set config.model.kwargs.layer_heads")
    out = dict(flat)
    for i in range(teacher.num_layers):
        p = ("params", f"layer{i}")
        heads, ffn = student.heads_of(i), student.intermediate_of(i)
        if teacher.heads_of(i):
            kept = _top_units(importance[f"heads{i}"], heads, f"layer{i} (heads)")
            cols = (kept[:, None] * head_dim + np.arange(head_dim)).reshape(-1)
            for name in ("query", "key", "value"):
                out[(*p, "attention", name, "kernel")] = flat[(*p, "attention", name,
                                                               "kernel")][:, cols]
                out[(*p, "attention", name, "bias")] = flat[(*p, "attention", name, "bias")][cols]
            out[(*p, "attention", "output", "kernel")] = flat[(*p, "attention", "output",
                                                               "kernel")][cols]
        if teacher.intermediate_of(i):
            kept = _top_units(importance[f"ffn{i}"], ffn, f"layer{i} (FFN)")
            out[(*p, "intermediate", "kernel")] = flat[(*p, "intermediate", "kernel")][:, kept]
            out[(*p, "intermediate", "bias")] = flat[(*p, "intermediate", "bias")][kept]
            out[(*p, "output", "kernel")] = flat[(*p, "output", "kernel")][kept]
    return out


STRUCTURE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
             "max_position", "type_vocab_size")  # BERT fields a checkpoint fixes


def check_pretrained(directory: str, student_model: nn.Module) -> None:
    """That the HF directory ``directory`` can seed ``student_model`` (reads its
    ``config.json`` only).

    Raises:
      ConfigError (MissingError for absent files): one line, for a student that is not a
        BERT, or whose structure (``config.model.kwargs``: sizes, layers, heads, vocabulary)
        is not the checkpoint's.
    """
    from jaxkd.models import pretrained

    if not isinstance(student_model, BertEncoder):
        raise ConfigError(f"config.init.method='pretrained' reads Hugging Face BERT "
                          f"directories; the student is {type(student_model).__name__}, not "
                          "bert")
    path = os.path.join(directory, "config.json")
    hf = pretrained.model_kwargs(pretrained.read_config(directory), path)
    for field in STRUCTURE:
        if hf[field] != getattr(student_model, field):
            raise ConfigError(f"config.model.kwargs.{field}={getattr(student_model, field)!r}"
                              f", but config.init.pretrained={directory!r} holds "
                              f"{field}={hf[field]!r} (its config.json)")
    if student_model.layer_heads or student_model.layer_intermediate or student_model.head_dim:
        raise ConfigError("config.init.method='pretrained' needs the checkpoint's shape: "
                          "leave config.model.kwargs layer_heads, layer_intermediate and "
                          "head_dim at their defaults")


def pretrained_variables(directory: str, student_model: nn.Module,
                         student_variables: Mapping[str, Any]) -> dict[str, Any]:
    """``config.init.method='pretrained'``: the BERT student's variables from the Hugging
    Face directory ``directory`` (:func:`jaxkd.models.pretrained.from_pretrained`, with the
    student's pooling and classes: the encoder's weights, the pooler's when the student
    pools with it, the classifier as head when it has as many classes, else a new head).
    Refused in one line as by :func:`check_pretrained`."""
    from jaxkd.models.pretrained import from_pretrained

    check_pretrained(directory, student_model)
    _, variables = from_pretrained(directory, num_classes=student_model.num_classes,
                                   pooling=student_model.pooling)
    return copy_variables(variables, student_variables, method="pretrained")


def copy_variables(source: Mapping[str, Any], target: Mapping[str, Any], *,
                   method: str = "copy") -> dict[str, Any]:
    """``source``'s variables as host arrays, checked to have ``target``'s tree, shapes and
    dtypes: the same model continued (a compression stage starting where the previous one
    ended, ``jaxkd.compression``)."""
    got = traverse_util.flatten_dict(jax.device_get(dict(source)))
    want = traverse_util.flatten_dict(dict(target))
    if set(got) != set(want):
        missing = sorted("/".join(k) for k in set(want) - set(got))
        extra = sorted("/".join(k) for k in set(got) - set(want))
        raise ConfigError(f"config.init.method={method!r} needs the same model: the source "
                          f"lacks {missing or 'nothing'} and has extra {extra or 'nothing'}")
    for key, leaf in want.items():
        if tuple(np.shape(got[key])) != tuple(leaf.shape):
            raise ConfigError(f"config.init.method={method!r} needs the same model: "
                              f"{'/'.join(key)} has shape {tuple(np.shape(got[key]))} in the "
                              f"source and {tuple(leaf.shape)} here")
    return traverse_util.unflatten_dict(
        {k: np.asarray(v, want[k].dtype) for k, v in got.items()})


def _minitron(init: Init, teacher: Gemma3, teacher_variables: Mapping[str, Any],
              student: Gemma3, student_variables: Mapping[str, Any], calibration: Any
              ) -> dict[str, Any]:
    """``config.init.method='minitron'`` (:mod:`jaxkd.minitron`): the student's depth and
    FFN width cut out of the teacher by importance on the calibration windows."""
    from jaxkd import minitron

    field = "config.init.method='minitron'"
    if calibration is None:
        raise ConfigError(f"{field} needs calibration token windows")
    ids, mask = (_calibration_batch(init, x) for x in calibration)
    structure = ("vocab_size", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                 "global_every", "sliding_window")
    for name in structure:
        if getattr(student, name) != getattr(teacher, name):
            raise ConfigError(f"{field} cuts layers and FFN neurons only: "
                              f"config.model.kwargs.{name}={getattr(student, name)!r} but the "
                              f"teacher's is {getattr(teacher, name)!r}")
    if student.num_layers > teacher.num_layers:
        raise ConfigError(f"{field}: the student has {student.num_layers} layers, the teacher "
                          f"only {teacher.num_layers}")
    scores = minitron.importance(teacher, teacher_variables, [(ids, mask)])
    layers = ([int(i) for i in init.keep_layers] if init.keep_layers else
              minitron.select_layers(scores["blocks"], student.num_layers,
                                     teacher.global_every))
    if len(layers) != student.num_layers:
        raise ConfigError(f"config.init.keep_layers={list(layers)} keeps {len(layers)} layers "
                          f"but the student has {student.num_layers}")
    widths = list(student.layer_intermediate or (student.intermediate_size,)
                  * student.num_layers)
    _, variables = minitron.prune(teacher, teacher_variables, layers, scores["ffn"], widths)
    return _fit(traverse_util.flatten_dict(jax.device_get(variables)), student_variables,
                field)


def _check_families(method: str, teacher_model: nn.Module, student_model: nn.Module) -> None:
    supported = _SUPPORTED[method]
    names = ", ".join(_FAMILIES[m] for m in supported)
    for role, model in (("teacher", teacher_model), ("student", student_model)):
        if not isinstance(model, supported):
            family = _FAMILIES.get(type(model), type(model).__name__)
            raise ConfigError(f"config.init.method={method!r} supports {names} models, "
                              f"but the {role} is {family}")
    if type(teacher_model) is not type(student_model):
        raise ConfigError(f"config.init.method={method!r} needs a student of the teacher's "
                          f"family, but the teacher is {_FAMILIES[type(teacher_model)]} and the "
                          f"student {_FAMILIES[type(student_model)]}")


def _depth(model: nn.Module) -> int:
    """Hidden layers (MLP), convolutions (cnn1d), encoder layers (BERT) or blocks per stage
    (ResNets)."""
    if isinstance(model, MLP):
        return len(model.widths)
    if isinstance(model, BertEncoder):
        return model.num_layers
    if isinstance(model, CNN1D):
        return 3
    if isinstance(model, WideResNet):
        return (model.depth - 4) // 6
    return (model.depth - 2) // 6


def _keep_layers(value: Any, depth_t: int, depth_s: int, unit: str
                 ) -> tuple[tuple[int, ...], str]:
    """The validated ``keep_layers`` and the config field to name in errors."""
    if isinstance(value, str):
        try:
            value = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
        except ValueError:
            raise ConfigError(f"config.init.keep_layers={value!r} must be integers, "
                              f"e.g. (0, 2)") from None
    if not value:
        keep = tuple(range(0, depth_t, 2))
        field = f"config.init.keep_layers=() (every other one of the teacher's {unit}: {keep})"
    else:
        if any(isinstance(k, bool) or not isinstance(k, int | np.integer) for k in value):
            raise ConfigError(f"config.init.keep_layers={value!r} must be integers, e.g. (0, 2)")
        keep = tuple(int(k) for k in value)
        field = f"config.init.keep_layers={keep}"
    if any(k < 0 or k >= depth_t for k in keep):
        raise ConfigError(f"{field} is out of range: the teacher has {depth_t} {unit} "
                          f"(0..{depth_t - 1})")
    if any(a >= b for a, b in zip(keep, keep[1:], strict=False)):
        raise ConfigError(f"{field} must be strictly increasing (kept layers stay in order)")
    if len(keep) != depth_s:
        raise ConfigError(f"{field} keeps {len(keep)} teacher {unit} but the student has "
                          f"{depth_s}; list exactly {depth_s}")
    if keep and keep[0] != 0 and unit != "encoder layers":
        first = ("the first hidden layer reads the input" if unit == "hidden layers"
                 else "a stage's first block holds its stride and projection")
        raise ConfigError(f"{field} must start with 0: {first}")
    return keep, field


def _layer_select_names(model: nn.Module, keep: Sequence[int]) -> dict[str, str]:
    """Teacher top-level module name -> student name, for every module the student keeps."""
    if isinstance(model, MLP):
        names = {f"hidden{t + 1}": f"hidden{j + 1}" for j, t in enumerate(keep)}
        return {**names, "head": "head"}
    if isinstance(model, BertEncoder):
        names = {f"layer{t}": f"layer{j}" for j, t in enumerate(keep)}
        return {**names, "embeddings": "embeddings", "pooler": "pooler", "head": "head"}
    names = {f"stage{s}_block{t}": f"stage{s}_block{j}"
             for s in (1, 2, 3) for j, t in enumerate(keep)}
    return {**names, "stem_conv": "stem_conv", "stem_bn": "stem_bn", "final_bn": "final_bn",
            "head": "head"}


def _calibration_batch(init: Init, images: Any) -> Any:
    wanted = init.calibration_examples
    if images is None or len(images) == 0:
        raise ConfigError(f"config.init.method='prune_width' ranks units on calibration images "
                          f"but none were given (config.init.calibration_examples={wanted})")
    if len(images) < wanted:
        raise ConfigError(f"config.init.calibration_examples={wanted} but only {len(images)} "
                          f"calibration images were given; lower it or pass more")
    return images[:wanted]


def _top_units(importance: np.ndarray, k: int, layer: str) -> np.ndarray:
    """Indices of the ``k`` most important units, in the teacher's order (ties: lower first)."""
    if k > len(importance):
        raise ConfigError(f"config.init.method='prune_width' only narrows, but the student's "
                          f"{layer} has {k} units and the teacher's {len(importance)}")
    return np.sort(np.argsort(-importance, kind="stable")[:k])


def _width(params: Mapping[str, Any], *path: str) -> int:
    """Output units of the layer at ``path`` (its kernel's last axis)."""
    node = params
    for name in path:
        node = node[name]
    return int(node["kernel"].shape[-1])


def _mlp_plan(importance: dict[str, np.ndarray], student_params: Mapping[str, Any]) -> Plan:
    plan: Plan = {}
    kept_in = None
    for i in range(1, len(importance) + 1):
        layer = f"hidden{i}"
        kept = _top_units(importance[layer], _width(student_params, layer), layer)
        plan[(layer,)] = (kept_in, kept)
        kept_in = kept
    plan[("head",)] = (kept_in, None)
    return plan


def _cnn1d_plan(importance: dict[str, np.ndarray], student_params: Mapping[str, Any],
                teacher_params: Mapping[str, Any]) -> Plan:
    plan: Plan = {}
    kept_in = None
    for i in (1, 2, 3):
        layer = f"conv{i}"
        kept = _top_units(importance[layer], _width(student_params, layer), layer)
        plan[(layer,)] = (kept_in, kept)
        kept_in = kept
    rows = surgery.input_rows(kept_in, len(importance["conv3"]),
                              teacher_params["head"]["kernel"].shape[0])
    plan[("head",)] = (rows, None)
    return plan


def _resnet_plan(importance: dict[str, np.ndarray], student_params: Mapping[str, Any],
                 teacher_params: Mapping[str, Any]) -> Plan:
    per_stage = sum(name.startswith("stage1_") for name in teacher_params)
    blocks = [f"stage{s}_block{b}" for s in (1, 2, 3) for b in range(per_stage)]
    projects = "shortcut_conv" in teacher_params["stage1_block0"]
    if projects != ("shortcut_conv" in student_params["stage1_block0"]):
        raise ConfigError("config.init.method='prune_width' keeps the teacher's block structure, "
                          "but stage1_block0 has a projection shortcut in only one of teacher "
                          "and student (stem width != stage-1 width in one of them)")
    stream: dict[int, np.ndarray] = {}
    for s in (1, 2, 3):
        sites = [importance[b] for b in blocks if b.startswith(f"stage{s}_")]
        if s == 1 and not projects:  # the stem's output is the first block's identity input
            sites.append(importance["stem_bn"])
        width = _width(student_params, f"stage{s}_block0", "conv2")
        stream[s] = _top_units(np.mean(sites, axis=0), width, f"stage{s} width")
    stem = stream[1]
    if projects:
        stem = _top_units(importance["stem_bn"], _width(student_params, "stem_conv"),
                          "stem_conv")
    plan: Plan = {("stem_conv",): (None, stem), ("stem_bn",): (None, stem)}
    kept_in = stem
    for block in blocks:
        s = int(block[len("stage")])
        inner = _top_units(importance[f"{block}/bn1"], _width(student_params, block, "conv1"),
                           f"{block}/conv1")
        plan.update({
            (block, "conv1"): (kept_in, inner), (block, "bn1"): (None, inner),
            (block, "conv2"): (inner, stream[s]), (block, "bn2"): (None, stream[s]),
            (block, "shortcut_conv"): (kept_in, stream[s]),
            (block, "shortcut_bn"): (None, stream[s]),
        })
        kept_in = stream[s]
    plan[("head",)] = (kept_in, None)
    return plan


def _fit(flat: dict[tuple[str, ...], Any], student_variables: Mapping[str, Any], field: str
         ) -> dict[str, Any]:
    """``flat`` as a tree shaped like ``student_variables``, or a one-line error naming
    ``field`` for the first layer that does not fit."""
    student_flat = traverse_util.flatten_dict(dict(student_variables))
    only_student = sorted("/".join(k) for k in set(student_flat) - set(flat))
    only_teacher = sorted("/".join(k) for k in set(flat) - set(student_flat))
    if only_student or only_teacher:
        raise ConfigError(f"{field}: the student's layers do not match the teacher's; only in "
                          f"the student: {', '.join(only_student[:3]) or '-'}; only in the "
                          f"teacher's kept layers: {', '.join(only_teacher[:3]) or '-'}")
    out = {}
    for key, target in student_flat.items():
        if tuple(flat[key].shape) != tuple(target.shape):
            raise ConfigError(f"{field}: the student's {'/'.join(key)} is {tuple(target.shape)} "
                              f"but the teacher's weights for it are {tuple(flat[key].shape)}")
        out[key] = np.asarray(flat[key], dtype=target.dtype)
    return traverse_util.unflatten_dict(out)
