"""jaxkd.evaluation and the classification task's metrics, against numpy."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import evaluation, tasks


def test_means_over_batches_honour_masks_and_uneven_batches():
    rng = np.random.default_rng(0)
    task = tasks.CLASSIFICATION
    batches, logits = [], []
    for n, real in ((8, 8), (8, 3)):  # a full batch, then one padded to 8 rows
        z = rng.normal(size=(n, 5)).astype(np.float32)
        labels = rng.integers(0, 5, n)
        batches.append({"image": z, "label": labels, "mask": (np.arange(n) < real) * 1.0})
        logits.append(z)
    result = evaluation.evaluate(jax.jit(lambda b: task.eval_metrics(b["image"], b)), batches)
    z = np.concatenate([logits[0], logits[1][:3]])
    y = np.concatenate([batches[0]["label"], batches[1]["label"][:3]])
    log_p = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(
        1, keepdims=True)
    np.testing.assert_allclose(result["loss"], -log_p[np.arange(11), y].mean(), rtol=1e-5)
    assert result["accuracy"] == np.mean(z.argmax(1) == y)
    assert set(result) == {"loss", "accuracy"}


def test_classification_targets_skip_unlabelled_examples_in_training_metrics():
    task = tasks.CLASSIFICATION
    batch = {"image": jnp.zeros((4, 3)), "label": jnp.array([2, -1, 0, 1])}
    t = task.targets(batch)
    np.testing.assert_array_equal(t.labelled, [1, 0, 1, 1])
    assert t.mask is None
    logits = jnp.array([[0, 0, 9.0], [9.0, 0, 0], [0, 9.0, 0], [0, 9.0, 0]])
    m = task.train_metrics(logits, t)
    assert float(m["accuracy_sum"]) == 2 and float(m["accuracy_count"]) == 3
    (x,) = task.example_inputs((8, 8, 1), 2)
    assert x.shape == (2, 8, 8, 1) and x.dtype == jnp.float32
    assert tasks.get("classification") is task
