"""jaxkd's Gemma 3 against llama.cpp on the same GGUF file: token ids, then next-token logits.

    pip install llama-cpp-python            # compiles llama.cpp (about 15 min on 2 cores)
    python -m jaxkd.models.fetch gemma-3-270m
    python -m jaxkd.data.fetch bbc_news
    python bench/llama_cpp_agreement.py [--articles 200] [--logit_articles 12] [--docs]

llama.cpp is the reference implementation of the file format and of the architecture, run
through ``llama-cpp-python``. On the BBC News test articles:

- tokenization: :mod:`jaxkd.models.spm` against ``Llama.tokenize`` (``<bos>`` added,
  special tokens not parsed), article by article;
- exported students (``--student RUN,...``): llama.cpp runs each run's
  ``formats/model.gguf`` (Q8_0 or Q4_0) and is compared, the same way, with jaxkd's float32
  forward of the weights the file holds and with jaxkd's integer forward of them
  (:func:`jaxkd.gguf_quant.integer_apply`: activations quantized to Q8_0 blocks, int8 block
  dot products summed in int32, as llama.cpp's CPU kernels compute);
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


def student_rows(run_dir, llama_cpp, tokenizer, texts, max_tokens):
    """The agreement of llama.cpp's run of a student's ``formats/model.gguf`` with jaxkd's
    forward of the weights that file holds, in float32 and, for Q8_0/Q4_0 files, as
    llama.cpp's integer kernels compute it (:func:`jaxkd.gguf_quant.integer_apply`)."""
    import gguf

    from jaxkd import gguf_quant
    from jaxkd.models import gguf_io

    path = os.path.join(run_dir, "formats", "model.gguf")
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors} - {"F32"}
    qtype = types.pop() if len(types) == 1 else None
    model, variables, _ = gguf_io.from_gguf(path)
    llm = llama_cpp.Llama(model_path=path, n_ctx=max_tokens, logits_all=True, verbose=False,
                          n_threads=2, seed=0)
    name = (f"student {os.path.basename(os.path.dirname(os.path.abspath(run_dir)))} "
            f"({model.num_layers} layers, {qtype}, {os.path.getsize(path):,} bytes)")
    forward = jax.jit(model.apply)
    rows = [(f"{name} against jaxkd's float32 forward of the file's weights",
             agreement(llm, lambda ids: forward(variables, ids), tokenizer, texts,
                       max_tokens))]
    if qtype in gguf_quant.QTYPES:
        integer = jax.jit(gguf_quant.integer_apply(model, qtype))
        rows.append((f"{name} against jaxkd's integer forward (Q8_0 activations, int8 block "
                     "dot products)",
                     agreement(llm, lambda ids: integer(variables, ids), tokenizer, texts,
                               max_tokens)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=200)
    parser.add_argument("--logit_articles", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--models_dir", default=None)
    parser.add_argument("--student", default="", help="finished runs of "
                        "configs/bbc_lm_gemma.py (their formats/model.gguf), comma-separated")
    parser.add_argument("--docs", action="store_true")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python")
    import tensorflow_datasets as tfds

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
    for run_dir in [r for r in args.student.split(",") if r]:
        rows += student_rows(run_dir, llama_cpp, ours, logit_texts, args.tokens)
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
