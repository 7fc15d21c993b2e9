"""The sentence_embedding task: its metrics against numpy formulas, a pretrained Hugging Face
encoder as the teacher, and configs/bbc_news_embedding.py's smoke run end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxkd import configfile, sentence_embedding, train
from jaxkd.config import parse_run, run_config
from jaxkd.schema import ConfigError
from tests.test_bert import hf_weights, write_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_HF = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 260,
           "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 64, "max_position_embeddings": 128, "type_vocab_size": 2,
           "layer_norm_eps": 1e-12, "hidden_act": "gelu"}


def test_mean_cosine_is_the_formula():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 5)), rng.standard_normal((7, 5))
    expected = np.mean([x @ y / np.sqrt((x @ x) * (y @ y)) for x, y in zip(a, b, strict=True)])
    assert sentence_embedding.mean_cosine(a, b) == pytest.approx(expected, abs=1e-12)
    assert sentence_embedding.mean_cosine(a, 3 * a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one shape"):
        sentence_embedding.mean_cosine(a, b[:, :4])


def test_logistic_fit_is_a_stationary_point_of_the_objective():
    """The gradient of L(W, b) = mean CE + l2/2 ||W||^2, written here in numpy, vanishes at
    the L-BFGS solution."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((120, 6))
    y = np.argmax(x[:, :3] + 0.7 * rng.standard_normal((120, 3)), axis=1)
    l2 = 0.05
    w, b = sentence_embedding.fit_logistic(x, y, 3, l2=l2)
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = p - np.eye(3)[y]
    grad_w = x.T @ residual / len(x) + l2 * w
    grad_b = residual.mean(0)
    assert np.abs(grad_w).max() < 1e-4 and np.abs(grad_b).max() < 1e-4
    assert np.abs(w).max() > 0.1  # it did fit something


def test_linear_probe_separates_separable_classes_and_skips_unlabelled_rows():
    rng = np.random.default_rng(2)
    centres = 6 * rng.standard_normal((4, 8))
    y = np.repeat(np.arange(4), 30)
    x = centres[y] + rng.standard_normal((120, 8))
    test_y = np.repeat(np.arange(4), 10)
    test_x = centres[test_y] + rng.standard_normal((40, 8))
    assert sentence_embedding.linear_probe(x, y, test_x, test_y) == 1.0
    # Unlabelled rows (-1) with misleading features do not enter the fit.
    noise = np.concatenate([x, 50 * rng.standard_normal((60, 8))])
    labels = np.concatenate([y, -np.ones(60, int)])
    assert sentence_embedding.linear_probe(noise, labels, test_x, test_y) == 1.0
    # Random labels: near chance on new data.
    shuffled = rng.permutation(y)
    assert sentence_embedding.linear_probe(x, shuffled, test_x, test_y) < 0.6


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A random 2-layer Hugging Face BERT of the byte tokenizer's vocabulary (260), mean
    pooling as sentence-transformers says it (``1_Pooling/config.json``)."""
    directory = write_model(tmp_path_factory.mktemp("encoder") / "tiny", TINY_HF,
                            hf_weights(TINY_HF, seed=3))
    os.makedirs(os.path.join(directory, "1_Pooling"))
    with open(os.path.join(directory, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}, f)
    return directory


def smoke(teacher, extra=""):
    return configfile.load(os.path.join(ROOT, "configs", "bbc_news_embedding.py")
                           + f":smoke,teacher={teacher}{extra}")


def test_a_student_copied_from_the_encoder_has_its_embeddings(tiny_encoder, tmp_path,
                                                               mock_tfds):
    """All the teacher's layers copied and a learning rate of 1e-12: the student's
    embeddings are the teacher's (cosine 1), so are their probes; a random student's are not,
    and its loss is the embedding MSE alone (no label term)."""
    c = smoke(tiny_encoder, ",layers=2,lr=1e-12")
    assert c.data.task == "sentence_embedding" and list(c.distill.losses) == ["embedding"]
    assert c.distill.losses.embedding.adapter is False  # the student's own embedding learns
    with mock_tfds(num_examples=24):
        copied = train.train_and_evaluate(c, str(tmp_path / "copied"))
        scratch = train.train_and_evaluate(smoke(tiny_encoder, ",init=scratch,layers=1"),
                                           str(tmp_path / "scratch"))
    e = copied["embedding"]
    assert e["cosine_to_teacher"] == pytest.approx(1.0, abs=1e-5)
    assert e["linear_probe_accuracy"] == e["teacher_linear_probe_accuracy"]
    assert copied["accuracy"] == e["linear_probe_accuracy"]
    assert copied["teacher"]["pretrained"] and "eval" not in copied["teacher"]
    assert scratch["embedding"]["cosine_to_teacher"] < 0.99
    assert scratch["embedding"]["teacher_linear_probe_accuracy"] == \
        e["teacher_linear_probe_accuracy"]
    assert scratch["num_params"] < copied["num_params"]


def test_a_pretrained_encoder_teaches_no_logits(tiny_encoder, tmp_path, mock_tfds):
    c = smoke(tiny_encoder)
    c.distill.losses = {"kd": {"name": "soft_target_kl", "weight": 1.0}}
    with mock_tfds(num_examples=8), pytest.raises(ConfigError) as e:
        train.train_and_evaluate(c, str(tmp_path / "kd"))
    message = str(e.value)
    assert "without a trained head" in message and "losses.kd" in message
    assert "\n" not in message


def test_the_task_needs_text():
    c = run_config("mnist1d", "mlp")
    c.data.task = "sentence_embedding"
    with pytest.raises(ConfigError, match="needs a text dataset") as e:
        parse_run(c)
    assert "config.data.task" in str(e.value)


def test_an_encoder_with_its_own_tokenizer_refuses_another(tiny_encoder, tmp_path, mock_tfds):
    """A Hugging Face teacher that ships tokenizer.json reads its own token ids: a run
    tokenising with anything else is refused in one line, before anything is written."""
    import shutil

    directory = shutil.copytree(tiny_encoder, tmp_path / "with_tokenizer")
    (directory / "tokenizer.json").write_text("{}")
    with mock_tfds(num_examples=8), pytest.raises(ConfigError) as e:
        train.train_and_evaluate(smoke(str(directory)), str(tmp_path / "run"))
    assert "tokenizer.json" in str(e.value) and "config.data.tokenizer='bytes'" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()
