"""Language-model distillation through the one trainer: the causal LM task, documents cut
into windows, the objective's chunked token terms against the whole logits, a GGUF file
as teacher and tokenizer, and a Gemma 3 cut out of a teacher (Minitron) that learns from
it on the real BBC News text."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxkd import chain, metrics, objective, on_policy, sequence_logits, tasks, train
from jaxkd.config import run_config
from jaxkd.configfile import load
from jaxkd.data import pipeline, text
from jaxkd.models import gemma, gguf_io, spm
from jaxkd.schema import ConfigError
from tests.test_gemma import write_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
            intermediate_size=32, sliding_window=4, global_every=2)


def test_next_token_targets_and_windows():
    ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0]], np.int32)
    mask = (ids != 0).astype(np.int32)
    t = tasks.CAUSAL_LM.targets({"input_ids": ids, "attention_mask": mask})
    for b in range(2):  # position i predicts token i + 1 when both are real
        for i in range(4):
            real = i + 1 < 4 and mask[b, i] and mask[b, i + 1]
            assert t.labelled[b, i] == real and t.mask[b, i] == real
            if real:
                assert t.labels[b, i] == ids[b, i + 1]
    docs = text.TokenizedText(ids=np.arange(1, 12, dtype=np.int32),  # 5 + 1 + 5 tokens
                              offsets=np.array([0, 5, 6, 11]), labels=np.zeros(3, np.int32),
                              max_length=5)
    w = text.windows(docs, 2)
    got = [list(w.ids[a:b]) for a, b in zip(w.offsets[:-1], w.offsets[1:], strict=True)]
    # no common first token: plain slices; 1-token pieces predict nothing: dropped
    assert got == [[1, 2], [3, 4], [7, 8], [9, 10]]
    assert (w.labels == -1).all() and w.max_length == 2
    docs = text.TokenizedText(ids=np.array([2, 5, 6, 7, 8, 9, 2, 4], np.int32),
                              offsets=np.array([0, 6, 8]), labels=np.zeros(2, np.int32),
                              max_length=6)
    w = text.windows(docs, 3)  # every document starts with 2: every window does
    got = [list(w.ids[a:b]) for a, b in zip(w.offsets[:-1], w.offsets[1:], strict=True)]
    assert got == [[2, 5, 6], [2, 7, 8], [2, 9], [2, 4]]


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_token_terms_equal_the_whole_logits(divergence):
    """The objective's token terms (chunked, through each model's lm_head feature) equal
    the per-token formula on the whole [B, L, V] logits, averaged over the targets."""
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 7), 1, 50)
    mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
    student, teacher = (gemma.build_gemma3(num_classes=50, **{**TINY, "num_layers": n})
                        for n in (1, 2))
    outs = [m.apply(m.init(jax.random.PRNGKey(i), ids, mask), ids, mask, return_features=True)
            for i, m in enumerate((student, teacher))]
    terms = objective.parse_terms({
        "kd": {"name": "token_kd", "weight": 0.7,
               "kwargs": {"divergence": divergence, "temperature": 2.0, "chunk_tokens": 3}},
        "ce": {"name": "token_cross_entropy", "weight": 0.3}}, has_teacher=True)
    batch = {"input_ids": ids, "attention_mask": mask}
    targets = tasks.CAUSAL_LM.targets(batch)
    total, values = objective.build_objective(terms, num_steps=1)(
        {}, outs[0], [outs[1]], batch, 0, targets)
    log_s, log_t = (np_log_softmax(np.asarray(o[0], np.float64) / 2) for o in outs)
    p_s, p_t = np.exp(log_s), np.exp(log_t)
    if divergence == "forward_kl":
        per_token = 4 * (p_t * (log_t - log_s)).sum(-1)
    else:
        m = 0.5 * (p_t + p_s)
        per_token = 4 * 0.5 * ((p_t * (log_t - np.log(m))).sum(-1)
                               + (p_s * (log_s - np.log(m))).sum(-1))
    w = np.asarray(targets.labelled)
    kd = (per_token * w).sum() / w.sum()
    log_p = np_log_softmax(np.asarray(outs[0][0], np.float64))
    nll = -np.take_along_axis(log_p, np.asarray(targets.labels)[..., None], -1)[..., 0]
    ce = (nll * w).sum() / w.sum()
    np.testing.assert_allclose(values["kd"], kd, rtol=1e-4)
    np.testing.assert_allclose(values["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(total, 0.7 * kd + 0.3 * ce, rtol=1e-4)


def test_token_terms_refuse_models_without_an_lm_head():
    terms = objective.parse_terms({"kd": {"name": "token_kd"}}, has_teacher=True)
    mlp_out = (jax.ShapeDtypeStruct((2, 10), jnp.float32),
               {"embedding": jax.ShapeDtypeStruct((2, 8), jnp.float32)})
    with pytest.raises(ConfigError) as e:
        objective.check_features(terms, mlp_out, [mlp_out])
    assert str(e.value).startswith("config.distill.losses.kd (token_kd) needs the student's "
                                   "feature 'final_hidden'") and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"kwargs.divergence='kl' is not a divergence; "
                                          r"choose one of: forward_kl, reverse_kl, jsd, tvd"):
        objective.parse_terms({"kd": {"name": "token_kd", "kwargs": {"divergence": "kl"}}},
                              has_teacher=True)


BYTES = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
VOCAB = (BYTES, [0.0] * len(BYTES), [3, 3, 3, 2] + [6] * 256)  # control, unknown, byte


def lm_config(gguf, layers, steps, **student):
    c = run_config("bbc_news", "gemma3", hidden_size=32, num_layers=layers, num_heads=4,
                   num_kv_heads=2, head_dim=16, intermediate_size=64, sliding_window=4,
                   global_every=6, rope_global_base=1e6, **student)
    c.data.task, c.data.tokenizer = "causal_lm", gguf
    c.data.max_length, c.data.bucket_lengths = 16, (16,)
    c.num_steps, c.batch_size, c.eval_batch_size = steps, 8, 64
    c.log_every_steps, c.eval_every_steps = 1, 1000
    c.optimizer.learning_rate = 3e-3
    c.distill.teacher.workdir = gguf
    c.distill.losses = {"kd": {"name": "token_kd", "weight": 1.0}}
    c.init.method, c.init.calibration_examples = "minitron", 8
    c.export.formats = ("stablehlo", "gguf")
    return c


def train_losses(workdir):
    with open(os.path.join(workdir, metrics.METRICS_FILE)) as f:
        records = [json.loads(line) for line in f]
    return [r["train/loss"] for r in records if "train/loss" in r]


def test_a_gguf_file_is_teacher_and_tokenizer(tmp_path, mock_tfds):
    """A GGUF file as teacher (dequantized weights) and as tokenizer (its SentencePiece
    vocabulary): a student cut to the teacher's whole shape starts at KL 0; cut to 3 of
    its 6 layers it starts above and distils down."""
    gguf = str(tmp_path / "teacher.gguf")
    write_gguf(gguf, vocab=VOCAB)
    with mock_tfds(num_examples=16):
        whole = train.train_and_evaluate(lm_config(gguf, 6, 1), str(tmp_path / "whole"))
        cut = train.train_and_evaluate(lm_config(gguf, 3, 12), str(tmp_path / "cut"))
    assert train_losses(str(tmp_path / "whole"))[0] < 1e-5
    losses = train_losses(str(tmp_path / "cut"))
    assert losses[0] > 1e-2 and losses[-1] < 0.7 * losses[0], losses
    assert cut["num_params"] < whole["num_params"]
    assert cut["perplexity"] > 1 and whole["perplexity"] > 1
    with open(tmp_path / "cut" / "formats" / "formats.json") as f:
        assert {"stablehlo", "gguf"} <= set(json.load(f)["formats"])
    # llama.cpp's file of the cut student: its 3 layers, the teacher's tokenizer, Q8_0
    # weights within a Q8_0 rounding of the trained ones
    model, variables, _ = gguf_io.from_gguf(str(tmp_path / "cut" / "formats" / "model.gguf"))
    assert model.num_layers == 3
    assert spm.from_gguf(str(tmp_path / "cut" / "formats" / "model.gguf")).tokens == BYTES
    trained = np.load(tmp_path / "cut" / "weights.npz")
    kernel = variables["params"]["layer0"]["ffn_up"]["kernel"]
    np.testing.assert_allclose(kernel, trained["params/layer0/ffn_up/kernel"],
                               atol=np.abs(kernel).max() / 100)
    c = lm_config(gguf, 3, 1)
    c.data.tokenizer = "bytes"  # 260 ids too, but not the teacher's: refused before training
    c.data.max_length = 16
    with mock_tfds(num_examples=16), pytest.raises(ConfigError) as e:
        train.train_and_evaluate(c, str(tmp_path / "other"))
    assert str(e.value) == (
        f"config.distill.teacher.workdir={gguf!r} reads the token ids of its own vocabulary, but "
        "config.data.tokenizer='bytes' is another: set config.data.tokenizer to the .gguf file")


def test_gemma_cut_from_its_teacher_distils_on_real_bbc_news(real_bbc_news, tmp_path):
    """configs/bbc_lm_gemma.py's smoke chain on the real articles (bytes): the 4-layer
    teacher learns English well below the uniform perplexity (260), and the 2-layer student
    cut out of it by Block Influence recovers, by token-level KD alone, to within 25 % of
    the teacher's perplexity."""
    del real_bbc_news
    c = load(os.path.join(ROOT, "configs", "bbc_lm_gemma.py") + ":smoke")
    for name, steps in (("teacher", 150), ("student", 60)):
        r = c.stages[name]
        r.num_steps, r.eval_every_steps, r.checkpoint_every_steps = steps, steps, steps
        r.data.eval_split, r.eval_batch_size, r.log_every_steps = "test[:16]", 64, 10
        r.data.max_length, r.data.bucket_lengths = 64, (64,)
    chain.run_chain(c, str(tmp_path / "run"))
    summaries = {name: metrics.read_summary(str(tmp_path / "run" / name))
                 for name in c.stage_order}
    teacher, student = summaries["teacher"], summaries["student"]
    assert teacher["perplexity"] < 40, teacher["perplexity"]
    assert student["perplexity"] < 1.25 * teacher["perplexity"], (student["perplexity"],
                                                                   teacher["perplexity"])
    assert student["num_params"] < 0.7 * teacher["num_params"]
    kd = train_losses(str(tmp_path / "run" / "student"))
    assert kd[-1] < 0.5 * kd[0], kd


def test_generated_batches_are_right_padded_with_the_generated_tokens_marked():
    """on_policy.generated_batch: each row is its prompt's real tokens, then what the
    sampler wrote (left-padded prompts in, right padding out), loss on generated ones."""
    ids = np.array([[11, 12, 13, 14, 15, 16], [21, 22, 0, 0, 0, 0]], np.int32)
    mask = (ids != 0).astype(np.int32)
    seen = {}

    def generate(prompts, prompt_mask, rng):
        seen["prompts"], seen["mask"] = np.asarray(prompts), np.asarray(prompt_mask)
        return jnp.array([[91, 92, 93], [81, 82, 0]]), jnp.array([[1, 1, 1], [1, 1, 0]])

    out = on_policy.generated_batch(generate, {"input_ids": ids, "attention_mask": mask},
                                    jax.random.PRNGKey(0), prompt_tokens=3)
    np.testing.assert_array_equal(seen["prompts"], [[11, 12, 13], [0, 21, 22]])
    np.testing.assert_array_equal(seen["mask"], [[1, 1, 1], [0, 1, 1]])
    np.testing.assert_array_equal(out["input_ids"], [[11, 12, 13, 91, 92, 93],
                                                     [21, 22, 81, 82, 0, 0]])
    np.testing.assert_array_equal(out["attention_mask"], [[1] * 6, [1, 1, 1, 1, 0, 0]])
    # position t is trained when token t + 1 was generated
    np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    t = tasks.CAUSAL_LM.targets(out)
    np.testing.assert_array_equal(t.labelled, out["loss_mask"])


def test_on_policy_distillation_trains_on_generated_continuations(tmp_path, mock_tfds):
    """GKD (the student samples) and sequence-level KD (the teacher writes, greedily): every
    step trains on exactly batch x new_tokens generated tokens; a student identical to
    the teacher has JSD 0 on its own samples, a cut one distils it down."""
    gguf = str(tmp_path / "teacher.gguf")
    write_gguf(gguf, vocab=VOCAB)
    results = {}
    for policy, layers, steps in (("student", 6, 1), ("student", 3, 6), ("teacher", 3, 2)):
        c = lm_config(gguf, layers, steps)
        c.data.max_length, c.data.bucket_lengths = 12, (12,)
        c.distill.losses.kd.kwargs = {"divergence": "jsd", "beta": 0.5}
        c.distill.on_policy = {"fraction": 1.0, "policy": policy, "prompt_tokens": 4,
                               "new_tokens": 8, "temperature": 0.0 if policy == "teacher"
                               else 1.0}
        c.export.formats = ("none",)
        workdir = str(tmp_path / f"{policy}{layers}")
        with mock_tfds(num_examples=16):
            train.train_and_evaluate(c, workdir)
        with open(os.path.join(workdir, metrics.METRICS_FILE)) as f:
            records = [json.loads(line) for line in f if "train/loss" in line]
        assert all(r["train/tokens"] == 8 * 8 for r in records), records
        results[policy, layers] = [r["train/loss"] for r in records]
    assert results["student", 6][0] < 1e-5
    cut = results["student", 3]
    assert cut[0] > 1e-3 and cut[-1] < cut[0], cut
    c = lm_config(gguf, 3, 1)
    c.distill.on_policy = {"fraction": 0.5, "prompt_tokens": 4, "new_tokens": 8}
    with mock_tfds(num_examples=16), pytest.raises(ConfigError) as e:
        train.train_and_evaluate(c, str(tmp_path / "bad"))
    assert str(e.value) == (
        "config.distill.on_policy: every batch must be windows of prompt_tokens + new_tokens "
        "= 12 tokens: set config.data.max_length=12 and config.data.bucket_lengths=(12,) "
        "(got 16 and (16,))")


def test_stored_top_k_logits_of_windows_are_the_teachers_and_train_a_student(tmp_path,
                                                                             mock_tfds):
    """python -m jaxkd.sequence_logits's records hold the teacher's top-k logits, ids and
    residual mass per token (against its whole logits); token_topk_kd trains from them; a
    manifest of other data is refused in one line."""
    gguf = str(tmp_path / "teacher.gguf")
    write_gguf(gguf, vocab=VOCAB)
    c = lm_config(gguf, 6, 2)
    out = str(tmp_path / "top8")
    with mock_tfds(num_examples=16):
        manifest = sequence_logits.write(gguf, c.data, out, top_k=8, temperature=2.0,
                                         dtype="float32", batch_size=4, chunk_size=5,
                                         log=lambda _: None)
        windows = pipeline.train_inputs(c.data).source
    assert manifest["complete"] and manifest["count"] == len(windows) > 5
    assert [ch["count"] for ch in manifest["chunks"]][:1] == [5]
    stored = sequence_logits.StoredSequenceLogits(out, manifest)
    rows = np.array([0, len(windows) - 1])
    ids, mask = windows.padded(rows, 16)
    model, variables, _ = gguf_io.from_gguf(gguf)
    z = np.asarray(model.apply(variables, ids, mask), np.float64)
    fields = stored.batch_fields(rows, ids, mask)
    for r in range(2):
        for t in np.flatnonzero(mask[r]):
            order = np.argsort(-z[r, t], kind="stable")[:8]
            np.testing.assert_array_equal(fields["teacher_topk_indices"][r, t], order)
            np.testing.assert_allclose(fields["teacher_topk_logits"][r, t], z[r, t, order],
                                       rtol=1e-4, atol=1e-4)
            p = np.exp(z[r, t] / 2 - np.logaddexp.reduce(z[r, t] / 2))
            np.testing.assert_allclose(fields["teacher_topk_residual"][r, t],
                                       1 - p[order].sum(), atol=1e-5)
    with pytest.raises(ConfigError, match="were computed for other tokens"):
        stored.batch_fields(rows, ids[::-1], mask[::-1])
    c.distill.teacher.workdir = ""
    c.distill.teacher_logits = out
    c.distill.losses = {"kd": {"name": "token_topk_kd", "weight": 1.0,
                               "kwargs": {"temperature": 2.0}}}
    c.init.method = ""  # a random student
    with mock_tfds(num_examples=16):
        train.train_and_evaluate(c, str(tmp_path / "student"))
        losses = train_losses(str(tmp_path / "student"))
        assert losses[0] > 0.1 and np.isfinite(losses).all(), losses
        c.data.max_length, c.data.bucket_lengths = 12, (12,)
        with pytest.raises(ConfigError) as e:
            train.train_and_evaluate(c, str(tmp_path / "other"))
    assert str(e.value).startswith(f"config.distill.teacher_logits={out!r} holds logits of "
                                   "other data: inputs.") and "\n" not in str(e.value)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_qat_on_llama_cpps_grid_exports_exactly_the_weights_that_trained(tmp_path, mock_tfds,
                                                                          qtype):
    """config.gguf_quantization: the student trains fake-quantized on llama.cpp's grid; the
    artifact holds its weights quantized, on the grid; the GGUF file is written in that
    qtype and dequantizes to exactly those weights; the artifact's eval is training's."""
    import gguf as gguf_package

    from jaxkd import gguf_quant
    from jaxkd.export import artifact
    from jaxkd.export.safetensors_io import float_params

    gguf = str(tmp_path / "teacher.gguf")
    write_gguf(gguf, vocab=VOCAB)
    c = lm_config(gguf, 3, 3)
    c.gguf_quantization = {"enabled": True, "qtype": qtype}
    c.export.formats = ("gguf",)
    workdir = tmp_path / "student"
    with mock_tfds(num_examples=16):
        summary = train.train_and_evaluate(c, str(workdir))
    assert summary["method"] == f"qat-{qtype.lower()}+kd"
    assert summary["artifact_eval"]["accuracy"] == summary["accuracy"]
    path = str(workdir / "formats" / "model.gguf")
    types = {t.name: t.tensor_type.name for t in gguf_package.GGUFReader(path).tensors}
    assert {v for k, v in types.items() if not k.endswith("norm.weight")} == {qtype}
    directory = str(workdir / "artifact")
    stored = float_params(directory, artifact.verify(directory))
    _, variables, _ = gguf_io.from_gguf(path)
    from_gguf = {k: np.asarray(v) for k, v in
                 traverse_util.flatten_dict(variables["params"]).items()}
    trained = np.load(workdir / "weights.npz")
    assert set(from_gguf) == set(stored)
    for key, value in stored.items():
        np.testing.assert_array_equal(from_gguf[key], value, err_msg=str(key))
        latent = trained["params/" + "/".join(key)]
        if key[-1] == "embedding":
            np.testing.assert_array_equal(
                gguf_quant.block_quantize_dequantize(latent, qtype), value)
        elif key[-1] == "kernel":
            np.testing.assert_array_equal(
                gguf_quant.block_quantize_dequantize(latent.T, qtype).T, value)
            assert not np.array_equal(latent, value)  # the grid is coarser than float32
        else:
            np.testing.assert_array_equal(latent, value)
    c.quantization.enabled = True
    with mock_tfds(num_examples=16), pytest.raises(ConfigError) as e:
        train.train_and_evaluate(c, str(tmp_path / "both"))
    assert str(e.value) == ("config.gguf_quantization and config.quantization are both "
                            "enabled: choose llama.cpp's grid or jaxkd's integer one")


def test_the_config_arg_qat_trains_on_llama_cpps_grid():
    c = load(os.path.join(ROOT, "configs", "bbc_lm_gemma.py") + ":qat=Q4_0,smoke")
    assert dict(c.stages["student"].gguf_quantization) == {"enabled": True, "qtype": "Q4_0"}
    assert not c.stages["teacher"].gguf_quantization.enabled
    with pytest.raises(ConfigError, match=r"config arg qat='Q5_0' is not one of Q8_0, Q4_0"):
        load(os.path.join(ROOT, "configs", "bbc_lm_gemma.py") + ":qat=Q5_0")
