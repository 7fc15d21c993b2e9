"""jaxkd.data: the offline tfds builders, the batch semantics of the pipeline, augmentation."""

import os
import random
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxkd.config import data_config
from jaxkd.data import augment, datasets, pipeline
from jaxkd.data import digits as digits_builder
from jaxkd.data import mnist1d as mnist1d_builder


def config(name, **overrides):
    c = data_config(name)
    c.update(overrides)
    return c


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def stack(batches, key):
    return np.concatenate([b[key] for b in batches])


def split_arrays(name, split):
    """A prepared split read straight through tfds, in stored order."""
    builder = tfds.builder(name, data_dir=os.environ["TFDS_DATA_DIR"])  # set by conftest
    source = builder.as_data_source(split)
    examples = source.__getitems__(list(range(len(source))))
    return (np.stack([e["image"] for e in examples]),
            np.array([e["label"] for e in examples]))


@pytest.fixture(scope="module")
def paper_mnist1d():
    """The paper's dataset, made by the mnist1d package itself."""
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()
    data = make_dataset(get_dataset_args())
    np.random.set_state(state)
    return data


@pytest.fixture(scope="module")
def mnist1d_info():
    return pipeline.get_info(config("mnist1d"))


# --- builders ---------------------------------------------------------------------------

def test_mnist1d_is_the_papers_split_plus_20000_unlabelled(mnist1d_info, paper_mnist1d):
    assert mnist1d_info == pipeline.DatasetInfo(
        name="mnist1d", num_classes=10, input_shape=(40,),
        num_examples={"train": 4000, "test": 1000, "unlabelled": 20000})
    for split, key in [("train", "x"), ("test", "x_test")]:
        x, y = split_arrays("mnist1d", split)
        assert x.dtype == np.float32 and x.shape == paper_mnist1d[key].shape
        np.testing.assert_array_equal(x, paper_mnist1d[key].astype(np.float32))
        np.testing.assert_array_equal(y, paper_mnist1d["y" + key[1:]])
    x_unl, y_unl = split_arrays("mnist1d", "unlabelled")
    assert x_unl.shape == (20000, 40) and set(y_unl) == set(range(10))
    # Another seed: no unlabelled input repeats a labelled one.
    labelled = {row.tobytes() for row in paper_mnist1d["x"].astype(np.float32)}
    assert not labelled & {row.tobytes() for row in x_unl}


def test_mnist1d_generation_leaves_the_global_rngs_alone():
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    mnist1d_builder.generate(20, seed=5)
    assert (np.random.random(), random.random()) == (expected_np, expected_py)


def test_digits_is_sklearn_with_the_documented_split():
    from sklearn.datasets import load_digits

    info = pipeline.get_info(config("digits"))
    assert info == pipeline.DatasetInfo(name="digits", num_classes=10, input_shape=(8, 8, 1),
                                        num_examples={"train": 1437, "test": 360})
    reference = load_digits()
    order = np.random.default_rng(0).permutation(1797)
    for split, idx in [("train", order[:1437]), ("test", order[1437:])]:
        x, y = split_arrays("digits", split)
        assert x.dtype == np.uint8 and x.shape == (len(idx), 8, 8, 1) and x.max() == 16
        np.testing.assert_array_equal(x[..., 0], reference.images[idx])
        np.testing.assert_array_equal(y, reference.target[idx])
    batch = next(pipeline.eval_batches(config("digits"), split="test", batch_size=360))
    normalised = (reference.images[order[1437:], :, :, None] - 4.887) / 6.017
    np.testing.assert_allclose(batch["image"], normalised, rtol=1e-5, atol=1e-5)


def test_a_prepared_dataset_is_reused(mnist1d_info, data_dir):
    files = [os.path.join(root, f) for root, _, names in os.walk(data_dir / "mnist1d")
             for f in names]
    before = {f: os.stat(f).st_mtime_ns for f in files}
    assert pipeline.get_info(config("mnist1d")) == mnist1d_info
    assert {f: os.stat(f).st_mtime_ns for f in files} == before
    assert len(os.listdir(data_dir / "mnist1d" / "default")) == 1  # no second build


def test_data_dir_field_wins_over_the_environment(tmp_path, data_dir):
    pipeline.get_info(config("digits", data_dir=str(tmp_path)))
    assert (tmp_path / "digits" / "1.0.0" / "dataset_info.json").exists()


def test_normalisation_constants_are_the_train_statistics(paper_mnist1d):
    from sklearn.datasets import load_digits

    train = load_digits().images[np.random.default_rng(0).permutation(1797)[:1437]]
    assert datasets.DATASETS["digits"].mean == pytest.approx((train.mean(),), abs=1e-3)
    assert datasets.DATASETS["digits"].std == pytest.approx((train.std(),), abs=1e-3)
    assert paper_mnist1d["x"].mean() == pytest.approx(0.0, abs=0.01)
    assert paper_mnist1d["x"].std() == pytest.approx(1.0, abs=0.01)


# --- training stream --------------------------------------------------------------------

def test_same_seed_same_batches_other_seed_other_batches():
    c = config("mnist1d", augment="jitter")
    a = take(pipeline.train_batches(c, batch_size=32, seed=0), 3)
    b = take(pipeline.train_batches(c, batch_size=32, seed=0), 3)
    other = take(pipeline.train_batches(c, batch_size=32, seed=1), 3)
    for key in ("image", "label"):
        np.testing.assert_array_equal(stack(a, key), stack(b, key))
    assert not np.array_equal(stack(a, "image"), stack(other, "image"))
    assert a[0]["image"].dtype == np.float32 and a[0]["image"].shape == (32, 40)
    assert a[0]["label"].dtype == np.int32 and a[0]["label"].shape == (32,)


def test_every_epoch_is_a_new_permutation_and_batches_straddle_epochs(paper_mnist1d):
    train = paper_mnist1d["x"].astype(np.float32)
    batches = take(pipeline.train_batches(config("mnist1d"), batch_size=300, seed=0), 28)
    images = stack(batches, "image")  # 8400 rows: 2.1 epochs of 4000, no break between
    row_of = {row.tobytes(): i for i, row in enumerate(train)}
    order = np.array([row_of[row.tobytes()] for row in images])
    first, second = order[:4000], order[4000:8000]
    assert sorted(first) == sorted(second) == list(range(4000))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(stack(batches, "label"), paper_mnist1d["y"][order])


@pytest.mark.parametrize("in_memory", [True, False])
def test_start_step_equals_skipping_steps(in_memory):
    c = config("mnist1d", augment="jitter", transfer_split="unlabelled", in_memory=in_memory)
    straight = take(pipeline.train_batches(c, batch_size=50, seed=3), 500 if in_memory else 8)
    start = 490 if in_memory else 5  # 490 * 50 crosses the epoch of 24,000 examples
    resumed = take(pipeline.train_batches(c, batch_size=50, seed=3, start_step=start), 3)
    for s, r in zip(straight[start:start + 3], resumed, strict=True):
        np.testing.assert_array_equal(s["image"], r["image"])
        np.testing.assert_array_equal(s["label"], r["label"])


def test_in_memory_and_read_per_batch_give_the_same_batches():
    c = config("mnist1d", augment="jitter", transfer_split="unlabelled")
    a = take(pipeline.train_batches(c, batch_size=64, seed=0), 4)
    c.in_memory = False
    b = take(pipeline.train_batches(c, batch_size=64, seed=0), 4)
    for key in ("image", "label"):
        np.testing.assert_array_equal(stack(a, key), stack(b, key))


@pytest.mark.parametrize("name,augmentation", [("mnist1d", "jitter"), ("digits", "crop_flip")])
def test_processes_rows_make_up_the_global_batch(name, augmentation):
    c = config(name, augment=augmentation,
               transfer_split="unlabelled" if name == "mnist1d" else "")
    whole = take(pipeline.train_batches(c, batch_size=48, seed=7), 3)
    parts = [take(pipeline.train_batches(c, batch_size=48, seed=7, process_index=p,
                                         process_count=3), 3) for p in range(3)]
    for step in range(3):
        for key in ("image", "label"):
            assert parts[0][step][key].shape[0] == 16
            np.testing.assert_array_equal(
                np.concatenate([part[step][key] for part in parts]), whole[step][key])


def test_transfer_examples_and_only_they_are_labelled_minus_one():
    unlabelled, _ = split_arrays("mnist1d", "unlabelled")
    from_transfer = {row.tobytes() for row in unlabelled}
    c = config("mnist1d", transfer_split="unlabelled")
    batches = take(pipeline.train_batches(c, batch_size=1000, seed=0), 24)  # one epoch
    images, labels = stack(batches, "image"), stack(batches, "label")
    is_transfer = np.array([row.tobytes() in from_transfer for row in images])
    assert is_transfer.sum() == 20000
    np.testing.assert_array_equal(labels == -1, is_transfer)
    assert set(labels[~is_transfer]) == set(range(10))


def test_dropped_labels_never_reach_the_training_stream():
    """Hinton et al.'s transfer set without any 3."""
    pipeline.get_info(config("digits"))  # prepared
    images, labels = split_arrays("digits", "train")
    c = config("digits", drop_labels=(3,))
    inputs = pipeline.train_inputs(c)
    assert len(inputs.source) == int((labels != 3).sum()) < 1437
    assert inputs.spec["drop_labels"] == [3]
    assert "drop_labels" not in pipeline.train_inputs(config("digits")).spec
    epoch = len(inputs.source) // 7
    batches = take(pipeline.train_batches(c, batch_size=7, seed=0), epoch)
    seen = stack(batches, "label")
    assert 3 not in seen and len(seen) == 7 * epoch
    kept = {row.tobytes() for row in images[labels != 3]}
    raw = (stack(batches, "image") * 6.017 + 4.887).round().astype(np.uint8)
    assert {row.tobytes() for row in raw} <= kept


def shifted(signal, s):
    """Independent reference: ``signal`` moved right by ``s`` samples, zeros shifted in."""
    out = np.zeros_like(signal)
    if s >= 0:
        out[s:] = signal[:len(signal) - s]
    else:
        out[:s] = signal[-s:]
    return out


def test_jitter_translates_each_example_by_at_most_jitter_pixels():
    plain = take(pipeline.train_batches(config("mnist1d"), batch_size=200, seed=0), 2)
    c = config("mnist1d", augment="jitter", jitter_pixels=3)
    jittered = take(pipeline.train_batches(c, batch_size=200, seed=0), 2)
    again = take(pipeline.train_batches(c, batch_size=200, seed=0), 2)
    np.testing.assert_array_equal(stack(jittered, "image"), stack(again, "image"))
    np.testing.assert_array_equal(stack(jittered, "label"), stack(plain, "label"))
    shifts = []  # per step, the shift of each row
    for p, j in zip(plain, jittered, strict=True):
        shifts.append([])
        for x, y in zip(p["image"], j["image"], strict=True):
            matches = [s for s in range(-3, 4) if np.array_equal(shifted(x, s), y)]
            assert matches, "a jittered example is not a translation of the original"
            shifts[-1].append(matches[0])
    assert set(shifts[0]) == set(range(-3, 4))  # every shift occurs in 200 draws
    assert shifts[0] != shifts[1]  # drawn afresh at every step


def test_translate_matches_a_loop_in_two_dimensions():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 255, size=(6, 5, 7, 2)).astype(np.uint8)
    shifts = rng.integers(-3, 4, size=(6, 2))
    out = augment.translate(images, shifts)
    assert out.dtype == np.uint8
    for b in range(6):
        expected = np.zeros_like(images[b])
        for i in range(5):
            for j in range(7):
                si, sj = i - shifts[b, 0], j - shifts[b, 1]
                if 0 <= si < 5 and 0 <= sj < 7:
                    expected[i, j] = images[b, si, sj]
        np.testing.assert_array_equal(out[b], expected)


def test_crop_flip_keeps_the_shape_and_only_moves_and_mirrors_pixels():
    c = config("digits", augment="crop_flip")
    plain = take(pipeline.train_batches(config("digits"), batch_size=64, seed=0), 1)[0]
    out = take(pipeline.train_batches(c, batch_size=64, seed=0), 1)[0]
    assert out["image"].shape == plain["image"].shape == (64, 8, 8, 1)
    background = (0 - datasets.DATASETS["digits"].mean[0]) / datasets.DATASETS["digits"].std[0]
    raw = plain["image"] - np.float32(background)  # translate's zero fill is the background
    flipped = 0
    for x, y in zip(raw, out["image"] - np.float32(background), strict=True):
        candidates = [(s, f) for s in np.ndindex(9, 9) for f in (False, True)
                      if np.allclose(augment.flip_left_right(augment.translate(
                          x[None], np.array([s]) - 4), np.array([f]))[0], y, atol=1e-5)]
        assert candidates
        flipped += all(f for _, f in candidates)
    assert 0 < flipped < 64


def test_crop_flip_needs_images():
    with pytest.raises(ValueError, match="crop_flip"):
        next(pipeline.train_batches(config("mnist1d", augment="crop_flip"),
                                    batch_size=8, seed=0))


# --- evaluation -------------------------------------------------------------------------

@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_the_split_once_in_order(paper_mnist1d, process_count):
    c = config("mnist1d")
    per_process = [list(pipeline.eval_batches(c, split="test", batch_size=300,
                                              process_index=p, process_count=process_count))
                   for p in range(process_count)]
    assert all(len(batches) == 4 for batches in per_process)  # ceil(1000 / 300)
    batches = [{k: np.concatenate([batches[i][k] for batches in per_process])
                for k in ("image", "label", "mask")} for i in range(4)]
    mask = stack(batches, "mask")
    assert mask.dtype == np.float32
    np.testing.assert_array_equal(mask, np.arange(1200) < 1000)
    np.testing.assert_array_equal(stack(batches, "image")[:1000],
                                  paper_mnist1d["x_test"].astype(np.float32))
    np.testing.assert_array_equal(stack(batches, "label")[:1000], paper_mnist1d["y_test"])
    assert not stack(batches, "image")[1000:].any()


# --- real tfds datasets, through tfds' mock data ------------------------------------------

@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3)),
                                        ("imagenet2012", (64, 64, 3))])
def test_tfds_datasets_go_through_the_same_functions(mock_tfds, name, shape):
    c = config(name, image_size=64, augment="crop_flip" if name == "cifar10" else "none")
    with mock_tfds(num_examples=10):
        info = pipeline.get_info(c)
        train = take(pipeline.train_batches(c, batch_size=4, seed=0), 3)
        evals = list(pipeline.eval_batches(c, split=c.eval_split, batch_size=4))
    assert info.input_shape == shape and info.num_examples[c.train_split] == 10
    assert info.num_classes == (1000 if name == "imagenet2012" else 10)
    for batch in train + evals:
        assert batch["image"].shape == (4, *shape) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        assert ((0 <= batch["label"]) & (batch["label"] < info.num_classes)).all()
    assert np.abs(train[0]["image"]).max() < 5  # normalised, not raw 0..255
    assert len(evals) == 3 and stack(evals, "mask").sum() == 10


def test_an_unprepared_tfds_dataset_is_one_line_naming_the_field(monkeypatch, tmp_path):
    def no_download(self, *args, **kwargs):
        raise OSError("no network\nsecond line")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    with pytest.raises(FileNotFoundError) as e:
        pipeline.get_info(config("mnist", data_dir=str(tmp_path)))
    assert "config.data.name='mnist'" in str(e.value) and "\n" not in str(e.value)
    assert "no network" in str(e.value)


def test_resize_and_centre_crop_keeps_the_middle_of_a_ramp():
    ramp = np.tile(np.arange(200, dtype=np.float64), (100, 1))  # value = column
    image = np.repeat((ramp * 255 / 199).astype(np.uint8)[..., None], 3, axis=-1)
    out = pipeline.resize_and_centre_crop(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    # Shorter side 100 -> round(64 / 0.875) = 73, width 200 -> 146, crop from column 41.
    columns = (41 + np.arange(64) + 0.5) * 200 / 146 - 0.5
    np.testing.assert_allclose(out[32, :, 0], columns * 255 / 199, atol=2.5)


def test_a_dataset_prepared_as_tfrecord_is_one_line(data_dir, tmp_path):
    pipeline.get_info(config("digits"))
    shutil.copytree(data_dir / "digits", tmp_path / "digits")
    info_file = tmp_path / "digits" / "1.0.0" / "dataset_info.json"
    info_file.write_text(info_file.read_text().replace('"array_record"', '"tfrecord"'))
    with pytest.raises(ValueError) as e:
        pipeline.get_info(config("digits", data_dir=str(tmp_path)))
    assert "config.data.name='digits'" in str(e.value) and "\n" not in str(e.value)
    assert "convert_format" in str(e.value)


# --- errors in the user's words ---------------------------------------------------------

@pytest.mark.parametrize("field,value,words", [
    ("name", "mnist2d", "config.data.name='mnist2d'"),
    ("train_split", "trian", "config.data.train_split='trian'"),
    ("eval_split", "validation", "config.data.eval_split='validation'"),
    ("transfer_split", "extra", "config.data.transfer_split='extra'"),
    ("augment", "mixup", "config.data.augment='mixup'"),
    ("builder_config", "huge", "config.data.builder_config='huge'"),
])
def test_bad_fields_are_one_line_errors_naming_the_field(field, value, words):
    c = config("mnist1d")
    c[field] = value
    with pytest.raises(ValueError) as e:
        pipeline.get_info(c)
    message = str(e.value)
    assert words in message and "\n" not in message
    if field.endswith("split"):
        assert "test, train, unlabelled" in message


def test_unknown_dataset_in_default_config_names_the_allowed_ones():
    with pytest.raises(ValueError, match="config.data.name='svhn'.*mnist1d, digits, mnist"):
        data_config("svhn")


def test_global_batch_must_split_evenly_over_processes():
    with pytest.raises(ValueError, match="batch_size=10 .* process count \\(3\\)"):
        next(pipeline.train_batches(config("mnist1d"), batch_size=10, seed=0,
                                    process_count=3))


def test_mnist1d_large_config_exists_without_building_it():
    configs = tfds.builder_cls("mnist1d").builder_configs
    assert configs["large"].num_samples == 50_000 and configs["default"].num_samples == 5000
    assert digits_builder.NUM_EXAMPLES - digits_builder.NUM_TEST == 1437


def test_a_validation_split_is_carved_deterministically_from_train():
    from jaxkd.config import run_config, validation

    c = validation(run_config("mnist1d", "mlp"))
    assert (c.data.train_split, c.data.eval_split) == ("train[:90%]", "train[90%:]")
    info = pipeline.get_info(c.data)
    assert info.num_examples["train[:90%]"] == 3600 and info.num_examples["train[90%:]"] == 400
    full = pipeline.train_inputs(config("mnist1d")).source
    held_out = next(pipeline.eval_batches(c.data, split=c.data.eval_split, batch_size=400))
    np.testing.assert_array_equal(held_out["image"], full.read(np.arange(3600, 4000))[0])
    seen = pipeline.train_inputs(c.data).source
    assert len(seen) == 3600  # no validation example is trained on
    c.data.eval_split = "train[:x]"
    with pytest.raises(ValueError, match=r"config.data.eval_split='train\[:x\]' is not a slice"):
        pipeline.get_info(c.data)
