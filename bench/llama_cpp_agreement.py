"""jaxkd's Gemma 3 against llama.cpp on the same GGUF file: token ids, then next-token logits.

    pip install llama-cpp-python            # compiles llama.cpp (about 15 min on 2 cores)
    python -m jaxkd.models.fetch gemma-3-270m
    python -m jaxkd.data.fetch bbc_news
    python bench/llama_cpp_agreement.py [--articles 200] [--logit_articles 12] [--docs]

llama.cpp is the reference implementation of the file format and of the architecture, run
through ``llama-cpp-python``. On the BBC News test articles:

- tokenization: :mod:`jaxkd.models.spm` against ``Llama.tokenize`` (``<bos>`` added,
  special tokens not parsed), article by article;
- an exported student (``--student RUN``, a float one for now): llama.cpp runs the run's
  ``formats/model.gguf`` (Q8_0) and is compared with jaxkd's own forward of the run's
  trained weights, the same way;
- logits: the first ``--tokens`` tokens of ``--logit_articles`` articles, every position's
  next-token logits from ``Llama.eval`` (``logits_all``) against jaxkd's float32 forward of
  the dequantized weights: top-1 agreement, mean Pearson correlation of the logit vectors,
  mean KL(llama.cpp || jaxkd) and the largest |difference| relative to the logit range.

On a virtual machine whose CPU reports AMX (Sapphire Rapids and later) but whose kernel
does not grant it, the default native build dies with a general-protection fault in
``libggml-cpu`` at the first ``eval``; build it for AVX2 instead::

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
      -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" \
      pip install --no-cache-dir llama-cpp-python

They are not expected to be equal: llama.cpp multiplies the quantized weights by
activations it quantizes to 8 bits per block (``Q8_0``/``Q8_K``) and accumulates in its own
order, jaxkd by the dequantized float32 weights.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from common import publish


def agreement(llm, forward, tokenizer, texts, max_tokens):
    """``(top-1 agreement, mean Pearson r, mean KL(llama.cpp || jaxkd), max |dz| / range,
    positions)`` of next-token logits over the first ``max_tokens`` tokens of ``texts``."""
    top1, corr, kl, rel, n = [], [], [], [], 0
    for text in texts:
        ids = tokenizer.encode(text)[:max_tokens]
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[:len(ids)], np.float64)
        mine = np.asarray(forward(jnp.asarray([ids]))[0], np.float64)
        top1.append(np.mean(theirs.argmax(-1) == mine.argmax(-1)))
        a, b = theirs - theirs.mean(-1, keepdims=True), mine - mine.mean(-1, keepdims=True)
        corr.append(np.mean((a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))))
        lp = theirs - np.logaddexp.reduce(theirs, -1, keepdims=True)
        lq = mine - np.logaddexp.reduce(mine, -1, keepdims=True)
        kl.append(np.mean((np.exp(lp) * (lp - lq)).sum(-1)))
        rel.append(np.abs(theirs - mine).max() / (theirs.max() - theirs.min()))
        n += len(ids)
    return float(np.mean(top1)), float(np.mean(corr)), float(np.mean(kl)), float(max(rel)), n


def artifact_kind(manifest):
    bits = sorted({e["weight_bits"] for e in manifest["layers"]})
    return "float" if not bits else "int" + "/".join(map(str, bits)) + " weights"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=200)
    parser.add_argument("--logit_articles", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--models_dir", default=None)
    parser.add_argument("--student", default="", help="a finished run of "
                        "configs/bbc_lm_gemma.py (its artifact and formats/model.gguf)")
    parser.add_argument("--docs", action="store_true")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python")
    import tensorflow_datasets as tfds
    from flax import traverse_util

    from jaxkd import models
    from jaxkd.data import bbc_news  # noqa: F401  (registers the builder)
    from jaxkd.models import fetch, gguf_io, spm

    path = fetch.verified_gguf("gemma-3-270m", args.models_dir)
    source = tfds.builder("bbc_news").as_data_source("test")
    texts = [e["text"].decode() for e in source.__getitems__(list(range(args.articles)))]
    ours = spm.from_gguf(path)
    llm = llama_cpp.Llama(model_path=path, n_ctx=args.tokens, logits_all=True, verbose=False,
                          n_threads=2, seed=0)
    same = tokens = 0
    first_difference = None
    for text in texts:
        a = ours.encode(text)
        b = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        tokens += len(b)
        same += a == b
        if a != b and first_difference is None:
            k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                     min(len(a), len(b)))
            first_difference = (text[:60], a[k:k + 5], b[k:k + 5])
    print(f"tokenization: {same}/{len(texts)} articles identical ({tokens:,} tokens)",
          flush=True)
    if first_difference:
        print(f"first difference: {first_difference}", flush=True)

    model, variables, _ = gguf_io.from_gguf(path)
    forward = jax.jit(model.apply)  # the weights an argument, not compiled-in constants
    logit_texts = texts[:args.logit_articles]
    rows = [("teacher: gemma-3-270m-q4_k_m.gguf, jaxkd float32 on its dequantized weights",
             agreement(llm, lambda ids: forward(variables, ids), ours, logit_texts,
                       args.tokens))]
    if args.student:
        from jaxkd.export import artifact

        student_file = os.path.join(args.student, "formats", "model.gguf")
        manifest = artifact.verify(os.path.join(args.student, "artifact"))
        if manifest["layers"]:
            sys.exit("--student: a quantized student's integer forward is not compared yet")
        # A float artifact holds the run's trained weights (weights.npz): jaxkd's forward
        # of them, the weights as arguments of the compiled function.
        spec = manifest["model"]
        student = models.get_model(spec["name"], num_classes=spec["num_classes"],
                                   **spec["kwargs"])
        with np.load(os.path.join(args.student, "weights.npz")) as f:
            student_variables = traverse_util.unflatten_dict(
                {tuple(k.split("/")): f[k] for k in f.files})
        student_forward = jax.jit(student.apply)
        student_llm = llama_cpp.Llama(model_path=student_file, n_ctx=args.tokens,
                                      logits_all=True, verbose=False, n_threads=2, seed=0)
        layers = manifest["model"]["kwargs"]["num_layers"]
        size = os.path.getsize(student_file)
        rows.append((f"student ({layers} layers, {artifact_kind(manifest)}): its "
                     f"model.gguf ({size:,} bytes) against jaxkd's forward of its weights",
                     agreement(student_llm, lambda ids: student_forward(student_variables, ids),
                               ours, logit_texts, args.tokens)))
    lines = ["| check | result |", "|---|---|",
             f"| token ids, {len(texts)} BBC test articles ({tokens:,} tokens) | "
             f"{same}/{len(texts)} articles identical |"]
    for name, (top1, corr, kl, rel, n) in rows:
        lines += [f"| **{name}** | |",
                  f"| next-token top-1 agreement ({n:,} positions, {len(logit_texts)} articles)"
                  f" | {100 * top1:.2f} % |",
                  f"| logit correlation (Pearson, mean over positions) | {corr:.5f} |",
                  f"| KL(llama.cpp ‖ jaxkd), mean per position | {kl:.2e} nats |",
                  f"| max \\|Δlogit\\| / logit range | {rel:.2e} |"]
    lines += ["", f"llama-cpp-python {llama_cpp.__version__} (llama.cpp built for AVX2), CPU, "
              "2 threads."]
    publish("llama_cpp_agreement", "\n".join(lines), docs=args.docs)


if __name__ == "__main__":
    main()
