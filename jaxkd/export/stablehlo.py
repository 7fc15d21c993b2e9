"""An artifact as one serialized StableHLO module that runs with jax alone, at any batch size.

``export_stablehlo(artifact_dir, out_path)`` loads the artifact
(:func:`jaxkd.export.artifact.load`: the integer path, int8 x int8 -> int32 matmuls and
convolutions with the float rescale, float32 elsewhere), and exports its ``predict`` with
:func:`jax.export.export` for inputs ``float32[b, *input_shape]`` with a *symbolic* batch
dimension ``b``. The weights are closed over, so they are constants inside the module; the
file (conventionally ``model.stablehlo``) is the bytes of ``Exported.serialize()`` (a
flatbuffer: it needs the ``flatbuffers`` package, ``pip install 'jaxkd[export]'``).

One module holds a lowering for each of ``platforms``: by default ``cpu``, ``cuda`` and
``tpu``, all of which lower on a CPU-only jaxlib without the hardware (jax 0.10.2; so does
``rocm``). Where the lowering differs by platform, the module picks it at call time with a
``stablehlo.case`` on the platform index, so an op can appear once per platform in the
module text (the counts below include every copy).

Running it needs jax only, no jaxkd, no model code::

    import jax
    import numpy as np
    with open("model.stablehlo", "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    logits = exported.call(np.zeros((37, 40), np.float32))  # any batch size

``exported.in_avals`` / ``out_avals`` give the shapes (``float32[b,40]``,
``float32[b,10]``) and ``exported.mlir_module()`` the module text.

A token model (``bert``) takes its token ids and attention mask, ``int32[b, l]`` each,
with a symbolic sequence length ``l`` as well (``1 <= l <= max_position``):
``exported.call(input_ids, attention_mask)``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence
from typing import Any

import jax

from jaxkd import files, models
from jaxkd.export import artifact
from jaxkd.schema import ConfigError, FieldError, MissingError

FILE = "model.stablehlo"
PLATFORMS = ("cpu", "cuda", "tpu")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")

# One dot_general / convolution op of the module text, pretty-printed or generic, and its
# type signature: ``... : (tensor<?x40xi8>, tensor<40x32xi8>) -> tensor<?x32xi32>``.
_CONTRACTION = re.compile(
    r'"?stablehlo\.(?P<op>dot_general|convolution)\b"?[^\n]*?:\s*'
    r"\(tensor<(?P<lhs>[^>]*)>,\s*tensor<(?P<rhs>[^>]*)>\)\s*->\s*tensor<(?P<out>[^>]*)>")


def _element_type(tensor_type: str) -> str:
    """``i8`` of ``?x40xi8`` (a ``tensor<...>``'s body; an encoding after a comma ignored)."""
    return tensor_type.split(",")[0].split("x")[-1].strip()


def contractions(module_text: str) -> list[tuple[str, str, str, str]]:
    """``(op, lhs type, rhs type, result type)`` of every ``stablehlo.dot_general`` and
    ``stablehlo.convolution`` in a module's text, e.g. ``('dot_general', 'i8', 'i8',
    'i32')``; an op lowered once per platform is listed once per copy."""
    return [(m["op"], _element_type(m["lhs"]), _element_type(m["rhs"]), _element_type(m["out"]))
            for m in _CONTRACTION.finditer(module_text)]


def _check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    platforms = (platforms,) if isinstance(platforms, str) else tuple(platforms)
    unknown = [p for p in platforms if p not in KNOWN_PLATFORMS]
    if unknown or not platforms or len(set(platforms)) != len(platforms):
        raise FieldError("platforms", f"={list(platforms)!r}: each must be one of "
                                      f"{', '.join(KNOWN_PLATFORMS)}, at least one, no repeats")
    return platforms


def _check_out_path(out_path: str) -> None:
    parent = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(parent):
        raise MissingError(f"out_path={out_path!r}: its directory {parent} does not exist")
    if os.path.isdir(out_path):
        raise ConfigError(f"out_path={out_path!r} is a directory; give a file name, e.g. "
                          f"{os.path.join(out_path, FILE)}")


def _shape(aval: Any) -> list[int | str]:
    """A shape for JSON: symbolic dimensions by name (``'b'``), the others as ints."""
    return [d if isinstance(d, int) else str(d) for d in aval.shape]


def export_stablehlo(artifact_dir: str, out_path: str, *,
                     platforms: Sequence[str] = PLATFORMS) -> dict[str, Any]:
    """Writes the artifact's integer ``predict`` as serialized StableHLO to ``out_path``.

    The file is written to a temporary name beside ``out_path`` and renamed into place, so
    ``out_path`` is never half-written.

    Args:
      artifact_dir: a directory written by :func:`jaxkd.export.export` (checked against
        its manifest first).
      out_path: the file to write, conventionally ``model.stablehlo``; its directory must
        exist.
      platforms: the platforms the module is lowered for (``KNOWN_PLATFORMS``); lowering
        needs no accelerator.

    Returns:
      ``{"path", "bytes", "platforms", "inputs" (how many: 2 for a token model), "input_shape":
      ["b", 40] (of each input; ["b", "l"] for tokens), "input_dtype": "float32",
      "output_shape": ["b", 10], "output_dtype", "integer_ops", "float_ops",
      "integer_layers"}``: ``integer_ops`` counts the ``dot_general``/``convolution``
      ops of the module text with int8 operands and an int32 result, ``float_ops`` those
      with float operands (both include each platform's copy of an op, see above), and
      ``integer_layers`` is the number of layers the manifest runs on the integer path
      (quantized weights and activations; a weight-only layer multiplies in float).
    """
    platforms = _check_platforms(platforms)
    _check_out_path(out_path)
    if importlib.util.find_spec("flatbuffers") is None:
        raise ImportError("export_stablehlo needs the flatbuffers package to serialize: "
                          "pip install 'jaxkd[export]'")
    predict, manifest = artifact.load(artifact_dir)
    spec = manifest["model"]
    model = models.get_model(spec["name"], num_classes=spec["num_classes"], **spec["kwargs"])
    names = models.input_names(model)
    if len(names) == 1:
        shape = jax.export.symbolic_shape("b, ...", like=(None, *spec["input_shape"]))
    else:  # token ids and mask: batch and sequence length both symbolic
        limit = getattr(model, "max_position", None)  # learned positions; RoPE has none
        shape = jax.export.symbolic_shape(
            "b, l", constraints=(f"l <= {limit}",) if limit else ())
    dtype = models.input_dtype(model)
    exported = jax.export.export(jax.jit(predict), platforms=platforms)(  # weights inlined
        *[jax.ShapeDtypeStruct(shape, dtype)] * len(names))
    ops = contractions(exported.mlir_module())
    size = files.write_bytes(out_path, bytes(exported.serialize()))
    x, (y,) = exported.in_avals[0], exported.out_avals
    integer_layers = [e for e in manifest["layers"] if e["activation"]["bits"]]
    return {
        "path": out_path,
        "bytes": size,
        "platforms": list(exported.platforms),
        "inputs": len(names),
        "input_shape": _shape(x),
        "input_dtype": str(x.dtype),
        "output_shape": _shape(y),
        "output_dtype": str(y.dtype),
        "integer_ops": sum((lhs, rhs, out) == ("i8", "i8", "i32") for _, lhs, rhs, out in ops),
        "float_ops": sum(lhs.startswith(("f", "bf")) for _, lhs, _, _ in ops),
        "integer_layers": len(integer_layers),
    }
