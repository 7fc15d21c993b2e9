"""Per-layer sensitivity to weight quantization: which layers can take fewer bits.

For every Dense/Conv layer of a trained model and every bit width, only that layer's kernel
is quantized (post-training, min/max range, per channel and symmetric unless told
otherwise) while the rest stays float, and the accuracy on ``batches`` is measured; the
drop from the float accuracy ranks the layers (as Distiller's and NNI's sensitivity
analyses do; Han et al. 2016, "Deep Compression", Fig. 5 for the pruning analogue)::

    drop(layer, b) = accuracy(float) - accuracy(layer's kernel at b bits, rest float)

``sweep`` returns the rows; ``write`` renders ``sensitivity.md`` (accuracy drop in points,
one row per layer, one column per bit width) and ``sensitivity.png`` (grouped bars).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxkd import evaluation, quant, tasks

TABLE_FILE = "sensitivity.md"
PLOT_FILE = "sensitivity.png"


def _accuracy(eval_fn, params: Any, batches: Sequence[Mapping[str, Any]]) -> float:
    return evaluation.evaluate(lambda b: eval_fn(params, b), batches)["accuracy"]


def sweep(model: nn.Module, variables: Mapping[str, Any], batches: Iterable[Mapping[str, Any]],
          *, bits: Sequence[int] = (8, 4, 2), per_channel: bool = True, symmetric: bool = True,
          layers: Sequence[str] | None = None,
          task: tasks.Task = tasks.CLASSIFICATION) -> dict[str, Any]:
    """Accuracy with one layer at a time weight-quantized to each of ``bits``.

    ``batches`` yields ``image``, ``label`` and optionally ``mask`` (it is read into memory
    once). Returns ``{'float_accuracy': a, 'rows': [{'layer', 'bits', 'accuracy', 'drop'}]}``
    with layers in call order (``layers`` restricts them).
    """
    batches = [dict(b) for b in batches]
    if not batches:
        raise ValueError("sensitivity.sweep got no batches")
    bits = [quant.check_bits(b) for b in bits]
    found = [p for p, _ in quant.find_layers(model, variables,
                                             task.model_inputs(batches[0]))]
    if layers is not None:
        unknown = sorted(set(layers) - set(found))
        if unknown:
            raise ValueError(f"no layer {', '.join(unknown)}; layers: {', '.join(found)}")
        found = [p for p in found if p in layers]
    others = {k: v for k, v in dict(variables).items() if k != "params"}

    @jax.jit
    def eval_fn(params, batch):
        logits = model.apply({**others, "params": params}, *task.model_inputs(batch),
                             train=False)
        return task.eval_metrics(logits, batch)

    params = quant.strip_steps(variables["params"])
    flat = traverse_util.flatten_dict(params)
    base = _accuracy(eval_fn, params, batches)
    rows = []
    for path in found:
        key = (*path.split("/"), "kernel")
        for b in bits:
            qk = quant.quantize_kernel(flat[key], bits=b, per_channel=per_channel,
                                       symmetric=symmetric)
            dequantized = qk.scale * (qk.values.astype(np.float32) - qk.zero_point)
            trial = traverse_util.unflatten_dict({**flat, key: jnp.asarray(dequantized)})
            acc = _accuracy(eval_fn, trial, batches)
            rows.append({"layer": path, "bits": b, "accuracy": acc, "drop": base - acc})
    return {"float_accuracy": base, "rows": rows}


def markdown_table(result: Mapping[str, Any]) -> str:
    """Accuracy drop (points) per layer (rows) and bit width (columns)."""
    rows = result["rows"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    widths = sorted({r["bits"] for r in rows}, reverse=True)
    drop = {(r["layer"], r["bits"]): r["drop"] for r in rows}
    lines = [f"Float accuracy {100 * result['float_accuracy']:.2f} %; accuracy drop in points "
             "with only that layer's weights quantized.\n",
             "| layer | " + " | ".join(f"int{b}" for b in widths) + " |",
             "|---|" + "---:|" * len(widths)]
    for layer in layers:
        cells = [f"{100 * drop[(layer, b)]:+.2f}" for b in widths]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(result: Mapping[str, Any], out_dir: str) -> tuple[str, str]:
    """Writes ``sensitivity.md`` and ``sensitivity.png`` into ``out_dir``; returns paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    md_path, png_path = os.path.join(out_dir, TABLE_FILE), os.path.join(out_dir, PLOT_FILE)
    with open(md_path, "w") as f:
        f.write("# Per-layer sensitivity to weight quantization\n\n" + markdown_table(result))
    rows = result["rows"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    widths = sorted({r["bits"] for r in rows}, reverse=True)
    drop = {(r["layer"], r["bits"]): 100 * r["drop"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(layers) + 2), 4.5), dpi=130)
    bar = 0.8 / len(widths)
    for i, b in enumerate(widths):
        xs = np.arange(len(layers)) + (i - (len(widths) - 1) / 2) * bar
        ax.bar(xs, [drop[(layer, b)] for layer in layers], bar, label=f"int{b}")
    ax.axhline(0.0, color="0.3", lw=0.8)
    ax.set_xticks(np.arange(len(layers)), layers, rotation=30 if len(layers) > 6 else 0,
                  ha="right" if len(layers) > 6 else "center")
    ax.set_ylabel("accuracy drop (points)")
    ax.set_title(f"Only one layer quantized (float accuracy "
                 f"{100 * result['float_accuracy']:.2f} %)")
    ax.legend(title="weights")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return md_path, png_path
