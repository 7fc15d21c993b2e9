"""Tests for jaxkd.models.bert and jaxkd.models.pretrained: a tiny random HF-format BERT
directory, loaded and run, against bench/bert_numpy.py (float64 numpy, HF's names and
``[out, in]`` layout, nothing shared with jaxkd); features, precision, remat, the layout and
the one-line errors.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxkd import partitioning
from jaxkd.config import Mesh
from jaxkd.models import axes, get_model, takes_precision, takes_remat
from jaxkd.models.pretrained import from_pretrained, sentence_embedding
from jaxkd.schema import ConfigError, MissingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bert_numpy  # noqa: E402  (bench/bert_numpy.py)

CONFIG = {
    "architectures": ["BertModel"], "model_type": "bert", "vocab_size": 50,
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 64, "max_position_embeddings": 16, "type_vocab_size": 2,
    "layer_norm_eps": 1e-12, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "position_embedding_type": "absolute",
}
SMALL = {"vocab_size": 50, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
         "intermediate_size": 64, "max_position": 16}
# Two sequences, the second padded: [CLS]=1 ... [SEP]=2, pad 0; the first is a pair.
IDS = np.array([[1, 7, 12, 33, 2, 45, 9, 2], [1, 21, 5, 2, 0, 0, 0, 0]], np.int32)
MASK = np.array([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0]], np.int32)
TYPES = np.array([[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]], np.int32)


def hf_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under HF BertModel's names, Linear weights ``[out, in]``."""
    rng = np.random.default_rng(seed)
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    w: dict[str, np.ndarray] = {}

    def put(name, shape, scale, offset=0.0):
        w[name] = (offset + scale * rng.standard_normal(shape)).astype(np.float32)

    def linear(name, n_out, n_in):
        put(f"{name}.weight", (n_out, n_in), 0.2)
        put(f"{name}.bias", (n_out,), 0.1)

    def norm(name):
        put(f"{name}.weight", (hidden,), 0.1, 1.0)
        put(f"{name}.bias", (hidden,), 0.1)

    put("embeddings.word_embeddings.weight", (config["vocab_size"], hidden), 1.0)
    put("embeddings.position_embeddings.weight", (config["max_position_embeddings"], hidden),
        0.5)
    put("embeddings.token_type_embeddings.weight", (config["type_vocab_size"], hidden), 0.5)
    norm("embeddings.LayerNorm")
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            linear(f"{p}.attention.self.{name}", hidden, hidden)
        linear(f"{p}.attention.output.dense", hidden, hidden)
        norm(f"{p}.attention.output.LayerNorm")
        linear(f"{p}.intermediate.dense", ffn, hidden)
        linear(f"{p}.output.dense", hidden, ffn)
        norm(f"{p}.output.LayerNorm")
    linear("pooler.dense", hidden, hidden)
    return w


def write_model(directory, config: dict, weights: dict[str, np.ndarray]) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(weights, os.path.join(directory, "model.safetensors"))
    return str(directory)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A BertForSequenceClassification-style file: ``bert.`` prefix, HF's position_ids
    buffer and a ``classifier`` that jaxkd replaces with its own head."""
    weights = {f"bert.{k}": v for k, v in hf_weights(CONFIG).items()}
    weights["bert.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    weights["classifier.weight"] = np.zeros((3, 32), np.float32)
    weights["classifier.bias"] = np.zeros((3,), np.float32)
    return write_model(tmp_path_factory.mktemp("bert") / "tiny", CONFIG, weights)


def reference():
    return bert_numpy.forward(hf_weights(CONFIG), CONFIG, IDS, MASK, TYPES)


# --- the loaded model computes BERT ---------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "pooler"])
def test_loaded_bert_matches_the_numpy_reference_on_a_padded_batch(hf_dir, pooling):
    model, variables = from_pretrained(hf_dir, num_classes=3, pooling=pooling)
    assert model.pooling == pooling and model.num_layers == 2 and model.num_heads == 4
    assert model.dropout_rate == 0.1 and model.attention_dropout_rate == 0.1
    logits, features = model.apply(variables, IDS, MASK, TYPES, return_features=True)
    ref = reference()
    np.testing.assert_allclose(features["embeddings"], ref["hidden_states"][0], rtol=0, atol=1e-5)
    for i in (1, 2):
        np.testing.assert_allclose(features[f"hidden{i}"], ref["hidden_states"][i], rtol=0,
                                   atol=1e-5, err_msg=f"hidden{i}")
        np.testing.assert_allclose(features[f"attention_probs{i}"], ref["attentions"][i - 1],
                                   rtol=0, atol=1e-5, err_msg=f"attention_probs{i}")
    assert ref["attentions"][0][1, :, :, 4:].max() == 0  # the reference masks padded keys
    assert np.abs(np.asarray(features["attention_probs1"])[1, :, :, 4:]).max() == 0
    # The pooled vector and the head, against the same reference.
    last = ref["hidden_states"][-1]
    if pooling == "mean":
        pooled = bert_numpy.mean_pool(last, MASK)
    else:
        w = hf_weights(CONFIG)
        pooled = np.tanh(last[:, 0] @ w["pooler.dense.weight"].T.astype(np.float64)
                         + w["pooler.dense.bias"])
    np.testing.assert_allclose(features["embedding"], pooled, rtol=0, atol=1e-5)
    head = variables["params"]["head"]
    np.testing.assert_allclose(logits, pooled @ np.asarray(head["kernel"], np.float64)
                               + np.asarray(head["bias"]), rtol=0, atol=1e-5)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 3)
    embedding = sentence_embedding(model, variables, IDS, MASK)  # token types 0, as ST
    plain = bert_numpy.forward(hf_weights(CONFIG), CONFIG, IDS, MASK)["hidden_states"][-1]
    np.testing.assert_allclose(embedding, bert_numpy.normalize(bert_numpy.mean_pool(plain, MASK)),
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=-1), 1.0, rtol=0, atol=1e-6)


def test_loading_is_a_rename_with_linear_weights_transposed(hf_dir):
    _, variables = from_pretrained(hf_dir, pooling="cls")
    params, w = variables["params"], hf_weights(CONFIG)
    np.testing.assert_array_equal(params["layer1"]["attention"]["key"]["kernel"],
                                  w["encoder.layer.1.attention.self.key.weight"].T)
    np.testing.assert_array_equal(params["layer0"]["output"]["kernel"],
                                  w["encoder.layer.0.output.dense.weight"].T)
    np.testing.assert_array_equal(params["layer0"]["LayerNorm"]["scale"],
                                  w["encoder.layer.0.output.LayerNorm.weight"])
    np.testing.assert_array_equal(params["embeddings"]["word_embeddings"]["embedding"],
                                  w["embeddings.word_embeddings.weight"])
    assert "pooler" not in params and params["head"]["kernel"].shape == (32, 1)
    again = from_pretrained(hf_dir, pooling="cls")[1]["params"]["head"]["kernel"]
    np.testing.assert_array_equal(params["head"]["kernel"], again)  # a fixed seed


def test_pooling_follows_sentence_transformers_then_the_pooler(tmp_path):
    weights = hf_weights(CONFIG)
    directory = write_model(tmp_path / "st", CONFIG, weights)
    assert from_pretrained(directory)[0].pooling == "pooler"  # the file holds HF's pooler
    os.makedirs(os.path.join(directory, "1_Pooling"))
    pooling_config = os.path.join(directory, "1_Pooling", "config.json")
    with open(pooling_config, "w") as f:
        json.dump({"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}, f)
    model, variables = from_pretrained(directory)
    assert model.pooling == "mean" and "pooler" not in variables["params"]
    with open(pooling_config, "w") as f:
        json.dump({"pooling_mode_max_tokens": True}, f)
    with pytest.raises(ConfigError) as e:
        from_pretrained(directory)
    assert one_line(e).startswith(f"{pooling_config}: pooling modes ['pooling_mode_max_tokens']")
    del weights["pooler.dense.weight"], weights["pooler.dense.bias"]
    directory = write_model(tmp_path / "plain", CONFIG, weights)
    assert from_pretrained(directory)[0].pooling == "cls"
    with pytest.raises(ConfigError, match=r"tensor pooler\.dense\.bias is missing"):
        from_pretrained(directory, pooling="pooler")


def test_padding_does_not_change_the_tokens(hf_dir):
    model, variables = from_pretrained(hf_dir, pooling="mean")
    alone_ids, alone_mask = IDS[1:, :4], MASK[1:, :4]
    logits, features = model.apply(variables, alone_ids, alone_mask, return_features=True)
    padded_logits, padded = model.apply(variables, IDS, MASK, return_features=True)
    for key in ("hidden1", "hidden2", "attention_probs2"):
        a, b = np.asarray(features[key]), np.asarray(padded[key])[1:]
        b = b[:, :4] if key.startswith("hidden") else b[:, :, :4, :4]
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(logits, padded_logits[1:], rtol=0, atol=1e-6)
    no_mask = model.apply(variables, alone_ids)  # attention_mask=None: all tokens
    np.testing.assert_allclose(no_mask, logits, rtol=0, atol=1e-6)


# --- the zoo model: features, per-layer shapes, precision, remat ----------------------------


def test_features_have_the_documented_shapes_and_dtypes():
    assert takes_precision("bert") and takes_remat("bert")
    model = get_model("bert", num_classes=3, **SMALL, head_dim=6, layer_heads=(4, 2),
                      layer_intermediate=(64, 0), pooling="pooler")
    variables = model.init(jax.random.key(0), IDS)
    logits, features = model.apply(variables, IDS, MASK, TYPES, return_features=True)
    b, length, hidden = 2, 8, 32
    expected = {"embeddings": (b, length, hidden), "embedding": (b, hidden), "mask": (b, length)}
    for i, heads in ((1, 4), (2, 2)):
        expected[f"hidden{i}"] = (b, length, hidden)
        for key in ("query", "key", "value"):
            expected[f"{key}{i}"] = (b, heads, length, 6)
        for key in ("attention_scores", "attention_probs"):
            expected[f"{key}{i}"] = (b, heads, length, length)
    assert {k: v.shape for k, v in features.items()} == expected
    assert all(v.dtype == jnp.float32 for v in features.values())
    assert logits.shape == (b, 3) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(features["mask"], MASK)
    # Scores are Q K^T / sqrt(d) with -10000 on padded keys; probabilities their softmax.
    q, k = np.asarray(features["query1"]), np.asarray(features["key1"])
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(6) - 10000 * (1 - MASK[:, None, None, :])
    np.testing.assert_allclose(features["attention_scores1"], scores, rtol=1e-5, atol=1e-3)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(features["attention_probs1"], e / e.sum(-1, keepdims=True),
                               rtol=0, atol=1e-6)
    # HF's names, layer numbers from 0, per-layer widths; an FFN of width 0 keeps its bias.
    p = jax.tree.map(jnp.shape, variables["params"])
    assert set(p) == {"embeddings", "layer0", "layer1", "pooler", "head"}
    assert set(p["layer1"]) == {"attention", "intermediate", "output", "LayerNorm"}
    assert p["layer0"]["attention"]["query"]["kernel"] == (32, 24)
    assert p["layer1"]["attention"]["value"]["kernel"] == (32, 12)
    assert p["layer1"]["attention"]["output"]["kernel"] == (12, 32)
    assert p["layer1"]["intermediate"]["kernel"] == (32, 0)
    assert p["layer0"]["output"]["kernel"] == (64, 32)
    assert p["embeddings"]["word_embeddings"]["embedding"] == (50, 32)
    assert p["embeddings"]["LayerNorm"] == {"scale": (32,), "bias": (32,)}
    np.testing.assert_allclose(features["embedding"], np.tanh(
        np.asarray(features["hidden2"])[:, 0] @ variables["params"]["pooler"]["kernel"]
        + variables["params"]["pooler"]["bias"]), rtol=0, atol=1e-6)


def test_bfloat16_gives_float32_logits_close_to_float32():
    kwargs = dict(num_classes=3, **SMALL, pooling="mean")
    model = get_model("bert", **kwargs)
    variables = model.init(jax.random.key(0), IDS)
    logits, features = model.apply(variables, IDS, MASK, return_features=True)
    bf_model = get_model("bert", **kwargs, dtype="bfloat16")
    bf_logits, bf_features = bf_model.apply(variables, IDS, MASK, return_features=True)
    assert bf_logits.dtype == jnp.float32 and bf_features["hidden2"].dtype == jnp.bfloat16
    assert bf_features["attention_probs2"].dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(bf_model.init(jax.random.key(0), IDS))} == {
        jnp.dtype("float32")}
    np.testing.assert_allclose(bf_features["hidden2"].astype(jnp.float32), features["hidden2"],
                               rtol=0, atol=0.1)
    np.testing.assert_allclose(bf_logits, logits, rtol=0, atol=0.02 * np.abs(logits).max())


@functools.cache
def loss_and_grads(remat_policy: str):
    """Variables, (loss, gradients) of a train-mode step (dropout on), and its jaxpr."""
    model = get_model("bert", num_classes=3, **SMALL, remat_policy=remat_policy)
    variables = model.init(jax.random.key(0), IDS)

    def loss(params):
        logits = model.apply({"params": params}, IDS, MASK, train=True,
                             rngs={"dropout": jax.random.key(1)})
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

    step = jax.value_and_grad(loss)
    jaxpr = str(jax.make_jaxpr(step)(variables["params"]))
    return variables, step(variables["params"]), jaxpr  # eagerly: no compile


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_params_and_gradients(policy):
    variables, (value, grads), jaxpr = loss_and_grads("")
    r_variables, (r_value, r_grads), r_jaxpr = loss_and_grads(policy)
    for x, y in zip(jax.tree.leaves(variables), jax.tree.leaves(r_variables), strict=True):
        np.testing.assert_array_equal(x, y)  # the same names and initial values
    assert "remat" not in jaxpr and "remat" in r_jaxpr
    np.testing.assert_allclose(r_value, value, rtol=0, atol=1e-6)
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(r_grads), strict=True):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)
    assert float(jnp.abs(grads["layer0"]["attention"]["query"]["kernel"]).max()) > 0


def test_layout_puts_heads_on_the_tensor_axis():
    model = get_model("bert", num_classes=3, **SMALL)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    mesh = jax.sharding.AbstractMesh((1, 2, 2), ("data", "fsdp", "tensor"))
    layout = partitioning.Layout(mesh=mesh, settings=Mesh(), rules=axes.rules_of("bert"))
    P = jax.sharding.PartitionSpec
    for name in ("query", "key", "value"):
        assert layout.spec(f"layer0/attention/{name}/kernel", (32, 32)) == P("fsdp", "tensor")
        assert layout.spec(f"layer1/attention/{name}/bias", (32,)) == P("tensor")
    assert layout.spec("layer0/attention/output/kernel", (32, 32)) == P("tensor", "fsdp")
    assert layout.spec("layer0/attention/output/bias", (32,)) == P("fsdp")
    assert layout.spec("layer0/intermediate/kernel", (32, 64)) == P("fsdp", "tensor")
    assert layout.spec("layer0/output/kernel", (64, 32)) == P("tensor", "fsdp")
    assert layout.spec("layer0/LayerNorm/scale", (32,)) == P("fsdp")
    assert layout.spec("embeddings/word_embeddings/embedding", (50, 32)) == P("tensor", "fsdp")
    assert layout.spec("embeddings/position_embeddings/embedding", (16, 32)) == P(None, "fsdp")
    shardings = layout.params(shapes["params"])  # every parameter has a layout
    assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(shapes["params"]))
    assert sorted(layout.uneven) == ["head/bias dim 0 (3) over tensor",  # 3 classes over 2
                                     "head/kernel dim 1 (3) over tensor"]


# --- one-line errors ------------------------------------------------------------------------


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("change, field", [
    ({"model_type": "roberta"}, "model_type='roberta'"),
    ({"hidden_act": "relu"}, "hidden_act='relu'"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
    ({"num_attention_heads": 5}, "hidden_size=32 is not divisible by num_attention_heads=5"),
    ({"num_hidden_layers": 0}, "num_hidden_layers=0"),
])
def test_a_config_it_cannot_build_is_one_line(tmp_path, change, field):
    directory = write_model(tmp_path / "m", {**CONFIG, **change}, hf_weights(CONFIG))
    with pytest.raises(ConfigError) as e:
        from_pretrained(directory)
    assert one_line(e).startswith(os.path.join(directory, "config.json") + ": " + field)


@pytest.mark.parametrize("edit, message", [
    (lambda w: w.pop("encoder.layer.1.attention.self.key.bias"),
     "tensor encoder.layer.1.attention.self.key.bias is missing"),
    (lambda w: w.update({"encoder.layer.0.intermediate.dense.weight": np.zeros((32, 64),
                                                                               np.float32)}),
     "tensor encoder.layer.0.intermediate.dense.weight has shape (32, 64), but config.json "
     "implies (64, 32)"),
    (lambda w: w.update({"encoder.layer.2.output.dense.bias": np.zeros(32, np.float32)}),
     "tensor(s) encoder.layer.2.output.dense.bias are not part of a BERT encoder"),
])
def test_a_file_that_does_not_fit_is_one_line(tmp_path, edit, message):
    weights = hf_weights(CONFIG)
    edit(weights)
    directory = write_model(tmp_path / "m", CONFIG, weights)
    with pytest.raises(ConfigError) as e:
        from_pretrained(directory)
    assert one_line(e).startswith(os.path.join(directory, "model.safetensors") + ": " + message)


def test_missing_files_and_bad_arguments_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json: no such file"):
        from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"model\.safetensors: no such file \(found "
                                          r"pytorch_model\.bin; only safetensors"):
        from_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^num_classes=0 must be a positive integer$"):
        from_pretrained(str(tmp_path), num_classes=0)
    with pytest.raises(ConfigError, match=r"^pooling='max' is not a pooling"):
        from_pretrained(str(tmp_path), pooling="max")


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden_size": 30}, "config.model.kwargs.hidden_size=30 is not divisible by num_heads=4"),
    ({"layer_heads": (4,)}, "config.model.kwargs.layer_heads has 1 entries, but num_layers=2"),
    ({"layer_intermediate": (64, -1)}, "config.model.kwargs.layer_intermediate=(64, -1)"),
    ({"pooling": "max"}, "config.model.kwargs.pooling='max' is not a pooling"),
    ({"dropout_rate": 1.0}, "config.model.kwargs.dropout_rate=1.0 must be in [0, 1)"),
    ({"remat_policy": "all"}, "config.remat='all' is not a remat policy"),
])
def test_the_builder_refuses_in_one_line(kwargs, message):
    with pytest.raises(ConfigError) as e:
        get_model("bert", num_classes=2, **{**SMALL, **kwargs})
    assert one_line(e).startswith(message)


def test_fetched_weights_are_verified_and_missing_ones_name_the_command(tmp_path):
    from jaxkd.models import fetch

    with pytest.raises(MissingError, match=r"all-MiniLM-L6-v2/model.safetensors does not "
                                           r"exist: run python -m jaxkd.models.fetch "
                                           r"all-MiniLM-L6-v2 --dir "):
        fetch.verified("all-MiniLM-L6-v2", str(tmp_path))
    target = tmp_path / "all-MiniLM-L6-v2"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(ConfigError, match=r"has sha256 .* not all-MiniLM-L6-v2's 53aa5117"):
        fetch.verified("all-MiniLM-L6-v2", str(tmp_path))
    with pytest.raises(ConfigError, match="'bert-base' is not a model this fetches"):
        fetch.pretrained_dir("bert-base")
    from jaxkd.config import PRETRAINED

    assert {*fetch.MODELS, *fetch.GGUF_MODELS} == set(PRETRAINED)  # what the fetcher knows
