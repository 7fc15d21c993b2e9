"""The exported formats per model: bytes on disk, ONNX Runtime against jaxkd, latency.

    python bench/deploy.py [--rounds 7] [--models mlp,bert] [--docs]

For each model of ``MODELS`` (random weights: sizes and speed do not depend on their
values; activation ranges calibrated on one batch) it exports a w8a8 artifact (BERT's
embedding tables int8 too) and a float32 one, writes every format
(``jaxkd.export.formats``: StableHLO, ONNX, safetensors, and the HF directory for BERT)
and prints:

- bytes on disk of the artifact and of each format;
- ONNX Runtime (CPUExecutionProvider) against jaxkd's integer artifact on 512 random
  inputs: max |Δlogit| relative to the logit scale, and argmax agreement;
- latency at batch 1 and 256 (BERT: 1 and 32 sequences of 128 tokens), in this one
  process, interleaved rounds (``bench/timing.py``), the input already in place: ONNX
  Runtime's int8 graph against its own fp32 graph, and jaxkd's int8 artifact against both.

With ``--docs`` the tables go to ``docs/tables/deploy.md``. About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime
from common import publish
from timing import Ratio

from jaxkd import export, models, quant
from jaxkd.export import formats

MODELS = {
    "mlp 784-800-800": ("mlp", {"widths": (800, 800)}, (784,)),
    "mnist1d cnn": ("cnn1d", {}, (40,)),
    "lenet5 28x28": ("lenet5", {}, (28, 28, 1)),
    "resnet8 32x32": ("resnet8", {}, (32, 32, 3)),
    "wrn_16_1 32x32": ("wrn_16_1", {}, (32, 32, 3)),
    "bert 4x256, 128 tokens": ("bert", {"num_layers": 4, "hidden_size": 256, "num_heads": 4,
                                        "intermediate_size": 1024, "max_position": 128},
                               (128,)),
}
BATCHES = (1, 256)
BATCHES_OF = {"bert": (1, 32)}  # 32 x 128 tokens: a batch of 4,096 tokens


def random_inputs(model, shape: tuple[int, ...], n: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, ...]:
    """``n`` random examples as the model's inputs: images / signals, or token ids (every
    position a token) and their attention mask."""
    if models.input_names(model) == ("input",):
        return (rng.normal(size=(n, *shape)).astype(np.float32),)
    ids = rng.integers(1, model.vocab_size, size=(n, *shape)).astype(np.int32)
    return ids, np.ones_like(ids)


def ort_feed(session: onnxruntime.InferenceSession, inputs: tuple[np.ndarray, ...]) -> dict:
    return {i.name: x.astype(np.int64 if i.type == "tensor(int64)" else np.float32)
            for i, x in zip(session.get_inputs(), inputs, strict=True)}
MIN_SECONDS = 0.05


def per_call(fn, calls: int = 5) -> float:
    """Milliseconds per call over at least ``calls`` calls and ``MIN_SECONDS``."""
    fn()
    done, start = 0, time.perf_counter()
    while True:
        for _ in range(calls):
            out = fn()
        jax.block_until_ready(out)
        done += calls
        if time.perf_counter() - start >= MIN_SECONDS:
            return (time.perf_counter() - start) / done * 1e3


def session(path: str) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--docs", action="store_true")
    parser.add_argument("--models", default="",
                        help="comma-separated zoo names to run (default: all of MODELS)")
    args = parser.parse_args()
    chosen = {k: v for k, v in MODELS.items()
              if not args.models or v[0] in args.models.split(",")}
    rng = np.random.default_rng(0)
    sizes = ["| model | artifact | StableHLO | ONNX | safetensors | HF (float) | ONNX Runtime "
             "vs jaxkd: max abs diff / logit scale | argmax agreement |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    speed = ["| model | batch | ORT int8 ms | ORT fp32 ms | ORT int8 / ORT fp32 | jaxkd int8 "
             "ms | jaxkd int8 / ORT int8 | jaxkd int8 / ORT fp32 |",
             "|---|---:|---:|---:|---|---:|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for n, (label, (name, kwargs, shape)) in enumerate(chosen.items()):
            model = models.get_model(name, num_classes=10, **kwargs)
            calib = random_inputs(model, shape, 64, rng)
            variables = jax.jit(model.init)(jax.random.PRNGKey(0), *(x[:1] for x in calib))
            ranges = quant.calibrate(model, variables, [tuple(map(jnp.asarray, calib))])
            dirs = {}
            tables = {"embedding_bits": 8} if models.input_names(model) != ("input",) else {}
            for kind, q in (("int8", {"weight_bits": 8, "activation_bits": 8, **tables}),
                            ("fp32", None)):
                d = os.path.join(tmp, f"{n}-{kind}")
                export.export(os.path.join(d, "artifact"), name, kwargs, 10, variables, q,
                              ranges if q else None, {}, input_shape=shape)
                probe = random_inputs(model, shape, 512, rng)
                index = formats.write(os.path.join(d, "artifact"), os.path.join(d, "formats"),
                                      inputs=probe if len(probe) > 1 else probe[0])
                dirs[kind] = (d, index)
            d, index = dirs["int8"]
            f, check = index["formats"], index["formats"]["onnx"]["check"]
            hf = f"{f['hf']['bytes']:,}" if "hf" in f else "—"
            sizes.append(f"| {label} | {export.artifact_bytes(os.path.join(d, 'artifact')):,} "
                         f"| {f['stablehlo']['bytes']:,} | {f['onnx']['bytes']:,} | "
                         f"{f['safetensors']['bytes']:,} | {hf} | "
                         f"{check['relative_diff']:.1e} | "
                         f"{100 * check['argmax_agreement']:.2f} % |")
            print(sizes[-1], flush=True)
            ort = {k: session(os.path.join(dirs[k][0], "formats", "model.onnx"))
                   for k in dirs}
            predict = export.load(os.path.join(d, "artifact"))[0]
            for batch in BATCHES_OF.get(name, BATCHES):
                x = random_inputs(model, shape, batch, rng)
                xd = jax.device_put(x)
                feeds = {k: ort_feed(ort[k], x) for k in ort}
                fns = {"ort_int8": lambda s=ort["int8"], f=feeds["int8"]: s.run(None, f)[0],
                       "ort_fp32": lambda s=ort["fp32"], f=feeds["fp32"]: s.run(None, f)[0],
                       "jaxkd_int8": lambda x=xd, p=predict: p(*x)}
                times = {k: [] for k in fns}
                for r in range(args.rounds + 1):
                    for k, fn in fns.items():
                        t = per_call(fn)
                        if r:  # round 0 warms up
                            times[k].append(t)
                t = {k: np.asarray(v) for k, v in times.items()}
                speed.append(
                    f"| {label} | {batch} | {np.median(t['ort_int8']):.3f} | "
                    f"{np.median(t['ort_fp32']):.3f} | "
                    f"{Ratio(t['ort_int8'] / t['ort_fp32']).text(digits=2)} | "
                    f"{np.median(t['jaxkd_int8']):.3f} | "
                    f"{Ratio(t['jaxkd_int8'] / t['ort_int8']).text(digits=2)} | "
                    f"{Ratio(t['jaxkd_int8'] / t['ort_fp32']).text(digits=2)} |")
                print(speed[-1], flush=True)
    table = "\n".join(sizes + ["", "Bytes on disk of the w8a8 model in each format (BERT: "
                               "int8 embedding tables too; HF: the float weights and "
                               "config.json, BERT only); ONNX Runtime "
                               "against the jaxkd artifact on 512 random inputs.", ""] + speed
                      + ["", f"Milliseconds per call, median (min-max) of {args.rounds} "
                         "interleaved rounds (after a warm-up round) of at least 5 calls and "
                         f"{1e3 * MIN_SECONDS:.0f} ms; ONNX Runtime "
                         f"{onnxruntime.__version__}, CPUExecutionProvider, its default "
                         "threads."])
    publish("deploy", table, docs=args.docs)


if __name__ == "__main__":
    main()
