"""Gemma 3 270M into a 6-layer Gemma 3 cut out of it: prune, then distil, then quantize.

    python -m jaxkd.data.fetch bbc_news              # once
    python -m jaxkd.models.fetch gemma-3-270m        # once (Gemma Terms of Use)
    python bench/llm_table.py [--steps=40] [--articles=40] [--rows=...] [--docs]

Every trained row is a run of ``configs/bbc_lm_gemma.py`` (the one launcher's trainer) in
``--root`` (default ``runs/llm_table``); finished runs are reused, so rows can be added over
several sessions. All of them start from the same student: the teacher's ``--layers`` layers
of highest Block Influence (Minitron; Muralidharan et al. 2024), ranked on the trainer's
first 64 training windows, and train ``--steps`` steps of ``--batch`` windows of
``--length`` tokens from the first ``--articles`` BBC training articles (the token budget
column), AdamW at the config's learning rate (not tuned on validation here: one value for
every row).

Rows: the teacher; the cut students before any training (depth only, and depth + FFN
width ``--ffn``); KD with forward KL, reverse KL, on-policy GKD (Agarwal et al. 2024: half
the batches' second halves sampled by the student, generalized JSD beta 0.5), top-k offline
(the teacher's 64 largest logits per token stored by ``jaxkd.sequence_logits``, forward KL
with the residual mass); and QAT + forward-KL KD on llama.cpp's own Q8_0 and Q4_0 grids
(``config.gguf_quantization``), whose GGUF file holds exactly the weights that trained.

Columns, on the first ``--eval_articles`` BBC test articles (windows of ``--length``
tokens, each starting with ``<bos>``; never trained on): perplexity, mean per-token
KL(teacher || student) in nats (:func:`jaxkd.lm_eval.evaluate`), parameters, bytes of the
GGUF file the run exported (the teacher: its Q4_K_M file), and tokens/s of one forward of
``--batch`` x ``--length`` tokens relative to the teacher: jaxkd's float32 forward (XLA
on this CPU) and llama.cpp's (its integer kernels on the GGUF files, if llama-cpp-python is
installed; see ``bench/llama_cpp_agreement.py`` for the build), interleaved rounds in this
one process.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import ROOT, add_output_args, publish, run
from timing import interleaved, ratio

from jaxkd import configfile, files

ROWS = ("cut", "cut_ffn", "forward_kl", "reverse_kl", "gkd", "topk", "q8_0", "q4_0")
WHAT = {
    "cut": "{L} layers cut from the teacher, no training",
    "cut_ffn": "{L} layers, FFN {F} of 2,048 neurons, no training",
    "forward_kl": "{L} layers + KD, forward KL",
    "reverse_kl": "{L} layers + KD, reverse KL",
    "gkd": "{L} layers + on-policy GKD (JSD 0.5, half the batches)",
    "topk": "{L} layers + KD from stored top-64 logits",
    "q8_0": "{L} layers + QAT Q8_0 + KD (forward KL)",
    "q4_0": "{L} layers + QAT Q4_0 + KD (forward KL)",
}
TOP_K = 64
QAT = ("q8_0", "q4_0")


def student_config(row: str, a: argparse.Namespace, logits_dir: str):
    """The chain of ``configs/bbc_lm_gemma.py`` for a trained ``row``."""
    divergence = {"reverse_kl": "reverse_kl", "gkd": "jsd"}.get(row, "forward_kl")
    arg = (f"layers={a.layers},divergence={divergence},steps={a.steps},batch={a.batch},"
           f"length={a.length},lr={a.lr}" + (f",qat={row.upper()}" if row in QAT else ""))
    c = configfile.load(os.path.join(ROOT, "configs", "bbc_lm_gemma.py") + ":" + arg)
    s = c.stages["student"]
    s.data.train_split = f"train[:{a.articles}]"
    s.data.eval_split = "validation[:4]"  # the trainer's own eval; the table's is below
    s.eval_every_steps = s.checkpoint_every_steps = a.steps
    s.export.formats = ("gguf",)
    if row == "gkd":
        half = a.length // 2
        s.distill.on_policy = {"fraction": 0.5, "policy": "student", "prompt_tokens": half,
                               "new_tokens": a.length - half}
    if row == "topk":
        s.distill.teacher.workdir = ""
        s.distill.teacher_logits = logits_dir
        s.distill.losses = {"kd": {"name": "token_topk_kd", "weight": 1.0}}
    return c


def cut_student(a: argparse.Namespace, teacher, teacher_variables, ffn: int):
    """The student the trainer starts from (``config.init``, the trainer's calibration
    batch), untrained: ``(model, variables)``."""
    from jaxkd import models, student_init, tasks
    from jaxkd.config import parse_run
    from jaxkd.data import datasets, pipeline

    c = student_config("forward_kl", a, "")
    s = c.stages["student"]
    s.model.kwargs.intermediate_size = ffn
    r = parse_run(s)
    model = models.get_model("gemma3", num_classes=teacher.vocab_size, **dict(r.model.kwargs))
    batch = next(pipeline.train_batches(r.data, batch_size=r.init.calibration_examples,
                                        seed=r.seed))
    task = tasks.get(datasets.task_of(r.data))
    ids = jnp.zeros((1, a.length), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids))
    inputs = task.model_inputs(batch)
    variables = student_init.init_from_teacher(
        r.init, teacher_model=teacher, teacher_variables=teacher_variables,
        student_model=model, student_variables=shapes,
        calibration_images=inputs[0] if len(inputs) == 1 else inputs,
        calibration_labels=batch["label"])
    return model, variables


def artifact_model(run_dir: str):
    """``(model, variables)`` of a run's exported artifact (the float model of what it
    holds: a QAT student's quantized weights)."""
    from flax import traverse_util

    from jaxkd import models
    from jaxkd.export import artifact
    from jaxkd.export.safetensors_io import float_params

    directory = os.path.join(run_dir, "artifact")
    manifest = artifact.verify(directory)
    spec = manifest["model"]
    model = models.get_model(spec["name"], num_classes=spec["num_classes"], **spec["kwargs"])
    params = traverse_util.unflatten_dict(float_params(directory, manifest))
    return model, {"params": jax.tree.map(jnp.asarray, params)}


def count(variables) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(variables)))


def llama_seconds(path: str, ids: np.ndarray):
    """A function timing llama.cpp's forward of the rows ``ids`` (one context each)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=ids.shape[1], n_batch=ids.shape[1],
                          verbose=False, n_threads=os.cpu_count(), seed=0)

    def forward():
        for row in ids:
            llm.reset()
            llm.eval([int(t) for t in row])

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--articles", type=int, default=40)
    parser.add_argument("--eval_articles", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models_dir", default=None)
    add_output_args(parser, "llm_table")
    a = parser.parse_args()
    rows = [r for r in a.rows.split(",") if r]
    if unknown := sorted(set(rows) - set(ROWS)):
        parser.error(f"--rows: {', '.join(unknown)} not in {', '.join(ROWS)}")
    if a.models_dir:
        os.environ["JAXKD_MODELS"] = a.models_dir
    import tensorflow_datasets as tfds

    from jaxkd import lm_eval, sequence_logits
    from jaxkd.data import bbc_news  # noqa: F401  (registers the builder)
    from jaxkd.models import fetch, gguf_io, spm

    path = fetch.verified_gguf("gemma-3-270m", a.models_dir)
    teacher, teacher_variables, _ = gguf_io.from_gguf(path)
    source = tfds.builder("bbc_news").as_data_source("test")
    texts = [e["text"].decode() for e in source.__getitems__(list(range(a.eval_articles)))]
    ids, mask = lm_eval.token_rows(texts, spm.from_gguf(path).encode, a.length)
    logits_dir = os.path.join(a.root, f"top{TOP_K}_logits")
    tag = f"L{a.layers}_s{a.steps}_b{a.batch}_n{a.length}_a{a.articles}_lr{a.lr:g}"
    budget = a.steps * a.batch * a.length

    def measure(name, model, variables, gguf_file, tokens, directory):
        """The row's scores (kept in ``directory`` for these eval rows: reruns reuse them)."""
        started = time.perf_counter()
        saved = os.path.join(directory, f"llm_eval_{a.eval_articles}x{a.length}.json")
        if os.path.exists(saved):
            with open(saved) as f:
                scores = json.load(f)
        else:
            teacher_pair = None if name == "teacher" else (teacher, teacher_variables)
            scores = lm_eval.evaluate(model, variables, ids, mask, teacher=teacher_pair,
                                      batch_size=a.batch)
            files.makedirs(directory)
            files.write_json(saved, scores)
        print(f"{name}: {scores} ({time.perf_counter() - started:.0f} s)", flush=True)
        return {"scores": scores, "params": count(variables), "model": model,
                "variables": variables, "gguf": gguf_file, "tokens": tokens}

    results = {"teacher": measure("teacher", teacher, teacher_variables, path, 0,
                                  os.path.join(a.root, "teacher"))}
    for row in rows:
        if row in ("cut", "cut_ffn"):
            ffn = 2048 if row == "cut" else a.ffn
            model, variables = cut_student(a, teacher, teacher_variables, ffn)
            results[row] = measure(row, model, variables, None, 0,
                                   os.path.join(a.root, f"{row}_{tag}_f{ffn}"))
            continue
        if row == "topk" and not sequence_logits.is_sequence_logits(logits_dir):
            data = student_config("topk", a, logits_dir).stages["student"].data
            sequence_logits.write(path, data, logits_dir, top_k=TOP_K, batch_size=a.batch)
        directory = os.path.join(a.root, f"{row}_{tag}")
        run(student_config(row, a, logits_dir), directory)
        run_dir = os.path.join(directory, "student")
        model, variables = artifact_model(run_dir)
        results[row] = measure(row, model, variables,
                               os.path.join(run_dir, "formats", "model.gguf"), budget, run_dir)

    # Speed: one forward of batch x length tokens, every distinct architecture.
    x = jnp.asarray(ids[:a.batch]), jnp.asarray(mask[:a.batch])
    jaxkd_fns, llama_fns = {}, {}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        llama_cpp = None
    for name, r in results.items():
        arch = repr(r["model"])
        # Prefill, as llama.cpp's eval: every position's hidden state, the next-token
        # logits of the last one.
        forward = jax.jit(lambda v, i, k, m=r["model"]: m.apply(v, i, k, return_logits=False)
                          ["final_hidden"][:, -1] @ v["params"]["embed"]["embedding"].T)
        if arch not in jaxkd_fns:
            jaxkd_fns[arch] = (lambda f=forward, v=r["variables"]: f(v, *x))
        r["arch"] = arch
        if llama_cpp is not None and r["gguf"] is not None:
            llama_fns[name] = llama_seconds(r["gguf"], ids[:a.batch])
    jaxkd_times = interleaved(jaxkd_fns, rounds=a.rounds, calls=2)
    llama_times = interleaved(llama_fns, rounds=a.rounds, calls=1) if llama_fns else {}
    t_arch = results["teacher"]["arch"]

    teacher_gguf = os.path.getsize(path)
    lines = [
        f"Gemma 3 270M (teacher) into {a.layers}-layer students cut out of it, on BBC News: "
        f"perplexity and KL on the first {a.eval_articles} test articles "
        f"({int(mask[:, 1:].sum()):,} target tokens in windows of {a.length}); training "
        f"budget {a.steps} steps x {a.batch} x {a.length} tokens from the first "
        f"{a.articles} training articles, AdamW lr {a.lr:g}. Speed: one forward of "
        f"{a.batch} x {a.length} tokens, relative to the teacher's "
        f"(median of {a.rounds} interleaved rounds).",
        "",
        "| model | perplexity | KL(teacher ‖ student) | parameters | GGUF bytes "
        "| training tokens | jaxkd tokens/s × | llama.cpp tokens/s × |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s = r["scores"]
        what = ("Gemma 3 270M, Q4_K_M dequantized" if name == "teacher" else
                WHAT[name].format(L=a.layers, F=f"{a.ffn:,}"))
        kl = "0" if name == "teacher" else f"{s['kl_to_teacher']:.3f}"
        size = (f"{teacher_gguf / 1e6:.1f} MB (Q4_K_M)" if name == "teacher" else
                f"{os.path.getsize(r['gguf']) / 1e6:.1f} MB" if r["gguf"] else "")
        speed = ratio(jaxkd_times[t_arch], jaxkd_times[r["arch"]]).median
        llama = (f"{ratio(llama_times['teacher'], llama_times[name]).median:.2f}"
                 if name in llama_times and "teacher" in llama_times else "")
        lines.append(f"| {what} | {s['perplexity']:.2f} | {kl} | {r['params'] / 1e6:.1f} M "
                     f"| {size} | {r['tokens']:,} | {speed:.2f} | {llama} |")
    absolute = (f"Teacher: jaxkd {a.batch * a.length / np.median(jaxkd_times[t_arch]):,.0f} "
                "tokens/s")
    if "teacher" in llama_times:
        absolute += (f", llama.cpp {a.batch * a.length / np.median(llama_times['teacher']):,.0f}"
                     " tokens/s")
    lines += ["", absolute + " on this machine."]
    publish("llm_table", "\n".join(lines), docs=a.docs)


if __name__ == "__main__":
    main()
