"""Every config in configs/ loads and runs two steps of each of its stages (smoke variant)."""

import ast
import glob
import importlib.util
import json
import os
import re

import pytest

from jaxkd import chain, stages, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
# Configs that run elsewhere already, whole, in smoke: README's commands
# (tests/test_readme.py runs every one as written) and the LM chain, on real text
# (tests/test_causal_lm.py). The others run here.
with open(os.path.join(ROOT, "README.md")) as f:
    RUN_ELSEWHERE = set(re.findall(r"python launch\.py --config=configs/(\w+\.py)", f.read()))
RUN_ELSEWHERE |= {"default.py", "bbc_lm_gemma.py"}  # README's quickstart runs default.py
# Real tfds datasets cannot be downloaded here: these configs run on tfds mock data.
MOCKED = {"mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet2012", "bbc_news"}


def load(path, arg="smoke"):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def runs_of(config):
    if chain.is_chain(config):
        return [config.stages[name] for name in config.stage_order]
    return [config]


def test_every_config_has_a_docstring_with_its_command_figures_and_args():
    assert len(CONFIGS) >= 7
    for path in CONFIGS:
        text = open(path).read()
        doc = ast.get_docstring(ast.parse(text))
        assert "python launch.py" in doc, path
        assert "Measured: README" in doc or "Not measured here" in doc, path
        declared = re.search(r"parse_arg\(arg, ([^)]*)\)", text).group(1)
        for name in re.findall(r"(\w+)=", declared):  # each arg it takes is documented
            assert f"``{name}" in doc.split("Args (after the colon)")[1], (path, name)


SMOKED = [p for p in CONFIGS if os.path.basename(p) not in RUN_ELSEWHERE]


def test_readme_still_runs_the_configs_left_out_here():
    assert RUN_ELSEWHERE >= {"mnist_hinton.py", "mnist1d_compress.py", "bbc_news_bert.py",
                             "mnist1d_teacher.py", "mnist1d_student.py"}


@pytest.mark.parametrize("path", SMOKED, ids=[os.path.basename(p) for p in SMOKED])
def test_config_smoke_runs(path, tmp_path, mock_tfds):
    config = load(path)
    full = load(path, arg=None)
    assert all(r.num_steps == 2 for r in runs_of(config))
    assert any(r.num_steps != 2 for r in runs_of(full))  # smoke really is a variant
    # A separate student config points at its teacher's default workdir: train that first.
    for run in runs_of(config):
        teacher = run.distill.teacher.workdir
        if teacher and not teacher.startswith(stages.PREFIX):
            teacher_config = load(os.path.join(ROOT, "configs", os.path.basename(teacher) + ".py"))
            run.distill.teacher.workdir = str(tmp_path / "teacher")
            train.train_and_evaluate(teacher_config, run.distill.teacher.workdir)
    datasets = {r.data.name for r in runs_of(config)}
    if datasets & MOCKED:
        with mock_tfds(num_examples=16):
            summary = run_config(config, str(tmp_path / "run"))
    else:
        summary = run_config(config, str(tmp_path / "run"))
    rows = summary["stages"].values() if "stages" in summary else [summary]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["num_params"] > 0


def run_config(config, workdir):
    if chain.is_chain(config):
        return chain.run_chain(config, workdir)
    return train.train_and_evaluate(config, workdir)


def test_bbc_bert_compression_pipeline_runs(tmp_path, mock_tfds):
    """The BERT table's pipeline row: teacher layers -> half the heads/FFN (Michel
    importance) -> int8 with int8 embedding tables, KD throughout (its stages are the
    table's 'init', 'pruned' and 'qat' rows)."""
    config = load(os.path.join(ROOT, "configs", "bbc_news_bert.py"), "smoke,student=pipeline")
    with mock_tfds(num_examples=16):
        summary = run_config(config, str(tmp_path / "run"))
    rows = summary["stages"]
    assert list(rows) == list(config.stage_order) == ["teacher", "init", "pruned", "student"]
    assert rows["student"]["method"].startswith("qat-w8a8e8")
    assert rows["pruned"]["num_params"] < rows["init"]["num_params"] < rows["teacher"][
        "num_params"]


def test_bbc_bert_tinybert_learns_the_layers_first(tmp_path, mock_tfds):
    """TinyBERT's two-step task distillation: a stage of layer losses alone (embedding and
    hidden MSE, attention-score MSE; no labels, no logits), teacher layer 2j for student layer
    j, then KD continuing that student. The layer losses fall in the first stage."""
    config = load(os.path.join(ROOT, "configs", "bbc_news_bert.py"), "smoke,student=tinybert")
    assert list(config.stage_order) == ["teacher", "intermediate", "student"]
    intermediate = config.stages["intermediate"]
    terms = intermediate.distill.losses
    assert {k: (v.name, v.teacher_feature) for k, v in terms.items()} == {
        "embeddings": ("tinybert_hidden_mse", "embeddings"),
        "hidden1": ("tinybert_hidden_mse", "hidden2"),
        "attention_scores1": ("tinybert_attention_mse", "attention_scores2")}
    student = config.stages["student"]
    assert (student.init.method, student.init.teacher_workdir) == ("copy", "stage:intermediate")
    assert set(student.distill.losses) == {"kd", "ce"}
    # Long enough to see it learn: 30 steps, no warm-up, a seed of its own (the smoke
    # teacher is random too: the same seed would give the same embedding table).
    intermediate.num_steps, intermediate.log_every_steps, intermediate.seed = 30, 5, 1
    intermediate.schedule.warmup_steps, intermediate.optimizer.learning_rate = 0, 3e-3
    with mock_tfds(num_examples=16):
        run_config(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "intermediate" / "metrics.jsonl") as f:
        logged = [row for row in map(json.loads, f) if "train/loss" in row]
    assert not any("train/loss_ce" in row or "train/loss_kd" in row for row in logged)
    for term in terms:
        assert logged[-1][f"train/loss_{term}"] < 0.5 * logged[0][f"train/loss_{term}"], term
