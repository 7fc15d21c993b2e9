"""The objective built from config terms: weights, schedules, features, adapters, ensembles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import objective, train
from jaxkd.config import hinton_losses, run_config


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def outputs(rng, b=6, c=5, d=4):
    logits = rng.normal(size=(b, c)).astype(np.float32)
    return jnp.asarray(logits), {"embedding": jnp.asarray(rng.normal(size=(b, d)), jnp.float32),
                                 "hidden1": jnp.asarray(rng.normal(size=(b, 3)), jnp.float32)}


def build(spec, **kwargs):
    terms = objective.parse_terms(spec, has_teacher=True)
    return terms, objective.build_objective(terms, num_steps=100, **kwargs)


def test_hinton_terms_match_the_formula():
    rng = np.random.default_rng(0)
    s, t = outputs(rng), outputs(rng)
    labels = jnp.array([0, 1, -1, 3, -1, 2])
    _, fn = build(hinton_losses(alpha=0.7, temperature=3.0))
    loss, values = fn({}, s, [t], {"label": labels}, jnp.int32(0))
    ps, pt = log_softmax(np.asarray(s[0]) / 3), log_softmax(np.asarray(t[0]) / 3)
    kd = 9 * (np.exp(pt) * (pt - ps)).sum(-1).mean()  # over all six examples
    ls = log_softmax(np.asarray(s[0]))
    ce = -np.mean([ls[i, y] for i, y in enumerate(np.asarray(labels)) if y >= 0])
    np.testing.assert_allclose(values["kd"], kd, rtol=1e-5)
    np.testing.assert_allclose(values["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.7 * kd + 0.3 * ce, rtol=1e-5)


def test_weight_and_temperature_schedules():
    rng = np.random.default_rng(1)
    s, t = outputs(rng), outputs(rng)
    spec = {"kd": {"name": "soft_target_kl", "weight": 1.0, "weight_end": 0.0,
                   "schedule": "linear", "kwargs": {"temperature": 1.0},
                   "temperature_end": 5.0}}
    _, fn = build(spec)
    batch = {"label": jnp.zeros(6, jnp.int32)}
    for step, w, temp in [(0, 1.0, 1.0), (50, 0.5, 3.0), (100, 0.0, 5.0), (200, 0.0, 5.0)]:
        loss, values = fn({}, s, [t], batch, jnp.int32(step))
        ps, pt = log_softmax(np.asarray(s[0]) / temp), log_softmax(np.asarray(t[0]) / temp)
        kd = temp**2 * (np.exp(pt) * (pt - ps)).sum(-1).mean()
        np.testing.assert_allclose(values["kd"], kd, rtol=1e-5)
        np.testing.assert_allclose(loss, w * kd, rtol=1e-5, atol=1e-7)
    cosine = objective.scheduled(2.0, 0.0, "cosine", jnp.int32(25), num_steps=100)
    np.testing.assert_allclose(cosine, 2.0 - 2.0 * 0.5 * (1 - np.cos(np.pi / 4)), rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_probability_ensemble_and_sum_of_losses(temperature):
    """Both modes normalise the teacher weights; the ensemble mixes the teachers'
    distributions at the term's temperature: sum_i w_i softmax(t_i / T)."""
    rng = np.random.default_rng(2)
    s, t1, t2 = outputs(rng), outputs(rng), outputs(rng)
    batch = {"label": jnp.zeros(6, jnp.int32)}
    spec = {"kd": {"name": "soft_target_kl", "kwargs": {"temperature": temperature}}}
    _, mixed = build(spec, teacher_weights=(3.0, 1.0), ensemble="probabilities")
    _, summed = build(spec, teacher_weights=(3.0, 1.0), ensemble="sum_losses")
    T = temperature
    p_ens = 0.75 * np.exp(log_softmax(np.asarray(t1[0]) / T)) + 0.25 * np.exp(
        log_softmax(np.asarray(t2[0]) / T))
    ls = log_softmax(np.asarray(s[0]) / T)
    expected = T**2 * (p_ens * (np.log(p_ens) - ls)).sum(-1).mean()
    np.testing.assert_allclose(mixed({}, s, [t1, t2], batch, jnp.int32(0))[0], expected,
                               rtol=1e-5)

    def kl(t):
        lt = log_softmax(np.asarray(t[0]) / T)
        return T**2 * (np.exp(lt) * (lt - ls)).sum(-1).mean()

    np.testing.assert_allclose(summed({}, s, [t1, t2], batch, jnp.int32(0))[0],
                               0.75 * kl(t1) + 0.25 * kl(t2), rtol=1e-5)


def test_hint_adapter_and_relational_terms():
    rng = np.random.default_rng(3)
    s, t = outputs(rng), outputs(rng)
    spec = {"hint": {"name": "hint_mse", "student_feature": "hidden1",
                     "teacher_feature": "embedding"},
            "rkd": {"name": "rkd_distance"}}
    terms, fn = build(spec)
    shapes = jax.eval_shape(lambda: (s, [t]))
    objective.check_features(terms, shapes[0], shapes[1])
    adapters = objective.init_adapters(terms, shapes[0], shapes[1], jax.random.PRNGKey(0))
    assert adapters["hint_0"]["kernel"].shape == (3, 4)
    _, values = fn(adapters, s, [t], {"label": jnp.zeros(6, jnp.int32)}, jnp.int32(0))
    mapped = np.asarray(s[1]["hidden1"]) @ np.asarray(adapters["hint_0"]["kernel"])
    np.testing.assert_allclose(values["hint"],
                               ((mapped - np.asarray(t[1]["embedding"])) ** 2).mean(), rtol=1e-5)
    assert values["rkd"] > 0
    # The gradient reaches the adapter.
    grad = jax.grad(lambda a: fn(a, s, [t], {"label": jnp.zeros(6, jnp.int32)},
                                 jnp.int32(0))[0])(adapters)
    assert np.abs(grad["hint_0"]["kernel"]).sum() > 0


@pytest.mark.parametrize("spec, has_teacher, message", [
    ({"x": {"name": "soft_targets"}}, True, "is not a loss; choose one of"),
    ({"x": {"name": "soft_target_kl"}}, False, "needs a teacher"),
    ({"x": {"name": "cross_entropy", "weight": 0.0}}, False, "every term has weight 0"),
    ({"x": {"name": "soft_target_kl", "kwargs": {"temperature": 0.0}}}, True,
     "kwargs.temperature must be > 0"),
    ({"x": {"name": "soft_target_kl", "schedule": "exp"}}, True, "is not a schedule"),
    ({"x": {"name": "hint_mse"}}, True, "needs student_feature and teacher_feature"),
    ({"x": {"name": "cross_entropy", "wieght": 1.0}}, False,
     "has unknown field(s) wieght; fields: name, weight"),
])
def test_bad_terms_are_one_line_errors(spec, has_teacher, message):
    with pytest.raises(ValueError, match=None) as e:
        objective.parse_terms(spec, has_teacher=has_teacher)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert "config.distill.losses" in str(e.value)


def test_unknown_feature_name_lists_the_available_ones():
    rng = np.random.default_rng(4)
    s, t = outputs(rng), outputs(rng)
    terms = objective.parse_terms({"at": {"name": "attention_transfer",
                                          "student_feature": "stage9",
                                          "teacher_feature": "embedding"}}, has_teacher=True)
    with pytest.raises(ValueError, match="student_feature='stage9' is not a feature"):
        objective.check_features(terms, *jax.eval_shape(lambda: (s, [t])))


def test_feature_kd_with_two_teachers_trains_and_drops_the_adapter(data_dir, tmp_path):
    teacher_dirs = []
    for i, model in enumerate(["cnn1d", "mlp"]):
        c = run_config("mnist1d", model)
        c.data.data_dir = str(data_dir)
        c.num_steps, c.batch_size, c.eval_batch_size = 60, 32, 200
        c.optimizer.learning_rate = 1e-2
        c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 60
        if model == "mlp":
            c.model.kwargs = {"widths": (48,)}
        teacher_dirs.append(str(tmp_path / f"t{i}"))
        train.train_and_evaluate(c, teacher_dirs[-1])
    c = run_config("mnist1d", "mlp", widths=(16, 16))
    c.data.data_dir = str(data_dir)
    c.num_steps, c.batch_size, c.eval_batch_size = 60, 32, 200
    c.optimizer.learning_rate = 1e-2
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 20
    c.distill.teachers = ({"workdir": teacher_dirs[0], "weight": 0.5},
                          {"workdir": teacher_dirs[1], "weight": 0.5})
    c.distill.ensemble = "probabilities"
    c.distill.losses = {
        "kd": {"name": "soft_target_kl", "weight": 0.5, "kwargs": {"temperature": 2.0}},
        "ce": {"name": "cross_entropy", "weight": 0.5},
        "hint": {"name": "hint_mse", "weight": 0.1, "student_feature": "embedding",
                 "teacher_feature": "embedding"},
    }
    summary = train.train_and_evaluate(c, str(tmp_path / "student"))
    assert summary["accuracy"] > 0.2 and "teacher_1" in summary  # chance is 0.1
    with np.load(tmp_path / "student" / "weights.npz") as w:
        assert not any("hint" in k or "adapter" in k for k in w.files)
        assert summary["num_params"] == sum(w[k].size for k in w.files)
