r"""BBC News topics with BERT: fine-tune all-MiniLM-L6-v2, distil it into a shallower BERT.

    python -m jaxkd.data.fetch bbc_news                 # once: 2,225 articles, verified
    python -m jaxkd.models.fetch all-MiniLM-L6-v2       # once: the teacher's weights
    python launch.py --config=configs/bbc_news_bert.py:student=minilm,layers=3

A chain of two stages in ``runs/bbc_news_bert_<args>/<stage>``:
  1. ``teacher``: all-MiniLM-L6-v2 (Wang et al. 2020; 6 layers, hidden 384, 12 heads, 22.7
     M parameters; mean pooling, as sentence-transformers uses it) from its Hugging Face
     weights (``config.init.method='pretrained'``), fine-tuned on the 1,558 training
     articles (its own tokenizer, 128 tokens) with AdamW 5e-5, 10 % warm-up, cosine decay,
     5 epochs, batch 32.
  2. ``student``: a BERT of ``layers`` layers, the teacher's width, by ``student``:
     - ``scratch``: random weights, the labels only;
     - ``kd``: random weights, Hinton KD (T = 4, alpha = 0.5);
     - ``tinybert``: TinyBERT's two-step task distillation (Jiao et al. 2020, sec. 3.3): a
       stage ``intermediate`` learns the teacher's layers alone (no labels, no logits):
       embedding-output and hidden-state MSE, student layer ``j`` against teacher layer
       ``6j / layers``, and (``tinybert_attention``) their attention-score MSE; then the
       ``student`` stage continues it (``init.method='copy'``) with KD. The widths are
       equal, so no projection ``W_h``: through one (FitNets' adapter), in one stage with KD,
       the student matched the hidden states by their mean and stayed at chance;
     - ``minilm``: KD + MiniLM's last-layer attention and value-relation KL (Wang et al.
       2020);
     - ``init``: KD from the teacher's own layers (``config.init.method='layer_select'``,
       every other one: DistilBERT's initialisation);
     - ``pruned``: all the teacher's layers with half its attention heads and FFN neurons
       in each, the ones of highest Michel et al. (2019) importance on 512 training
       articles (``config.init.method='prune_width'``, ``importance='gradient'``), then KD;
     - ``qat``: the teacher itself, quantization-aware (int8 weights and activations of
       every projection, int8 embedding tables) with KD from its float self, 2 epochs at
       a tenth of ``lr``;
     - ``pipeline``: three stages after the teacher: ``init`` (``layers`` of its layers +
       KD), ``pruned`` (half of that student's heads and FFN neurons + KD from the
       teacher), ``qat`` (that student int8 + KD), as above.
     AdamW ``lr`` (1e-4), 10 % warm-up, cosine, ``epochs`` (10) epochs, batch 32.

Measured: README (``python bench/bbc_table.py``: the learning rates chosen on the
validation split, 64 tokens, 3 epochs, the TinyBERT attention term left out there; 3
seeds).

Args (after the colon): ``student=kd`` (scratch, kd, tinybert, minilm, init, pruned, qat,
pipeline); ``layers=3``; ``lr=1e-4`` and ``epochs=10`` (the students'), ``teacher_lr=5e-5``,
``teacher_epochs=5``, ``qat_epochs=2``; ``max_length=128`` (tokens kept of each article);
``tinybert_attention=true`` (the ``tinybert`` row's attention-score term); ``smoke`` (a
2-layer teacher and 1-layer student of width 32, random weights, the built-in byte
tokenizer, two steps per stage: no download).
"""

from jaxkd.config import (
    chain_config,
    hinton_losses,
    parse_arg,
    pretrained_dir,
    run_config,
    smoke,
)
from jaxkd.schema import ConfigError

STUDENTS = ("scratch", "kd", "tinybert", "minilm", "init", "pruned", "qat", "pipeline")
MINILM = {"vocab_size": 30522, "hidden_size": 384, "num_layers": 6, "num_heads": 12,
          "intermediate_size": 1536, "max_position": 512, "pooling": "mean"}
TINY = {"vocab_size": 260, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
        "intermediate_size": 64, "max_position": 128, "pooling": "mean"}
TRAIN_EXAMPLES, BATCH = 1558, 32


def bbc_run(kwargs, *, epochs, learning_rate, tokenizer, max_length):
    c = run_config("bbc_news", "bert", **kwargs)
    c.data.tokenizer, c.data.max_length = tokenizer, max_length
    c.batch_size = BATCH
    c.num_epochs = float(epochs)
    c.optimizer.name, c.optimizer.learning_rate = "adamw", learning_rate
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = int(0.1 * epochs * TRAIN_EXAMPLES // BATCH)
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 100, 100
    return c


def halved(shape, layers):
    """Half the heads and FFN neurons of each of ``layers`` layers of width ``shape``."""
    return {**shape, "num_layers": layers, "layer_heads": (shape["num_heads"] // 2,) * layers,
            "layer_intermediate": (shape["intermediate_size"] // 2,) * layers}


def distilled(c, teacher="stage:teacher"):
    c.distill.teacher.workdir = teacher
    c.distill.losses = hinton_losses(alpha=0.5, temperature=4.0)
    return c


def quantized(c, source, learning_rate):
    """``c`` continuing ``source``'s model, int8 everywhere (QAT), a tenth of the rate."""
    c.init.method, c.init.teacher_workdir = "copy", source
    c.quantization.enabled, c.quantization.activation_bits = True, 8
    c.quantization.embedding_bits = 8
    c.optimizer.learning_rate = learning_rate / 10
    return c


def tinybert_layer_losses(layers, step, *, attention):
    """TinyBERT's intermediate-layer objective (Jiao et al. 2020, eqs. 7-9), weight 1 each:
    the embedding outputs' MSE, and for student layer ``j`` in ``1..layers`` the MSE of its
    hidden states against teacher layer ``step * j`` and, with ``attention``, of its
    attention scores (before the softmax). Equal widths: no projection."""
    pairs = [("embeddings", "embeddings", "tinybert_hidden_mse")]
    for j in range(1, layers + 1):
        pairs.append((f"hidden{j}", f"hidden{step * j}", "tinybert_hidden_mse"))
        if attention:
            pairs.append((f"attention_scores{j}", f"attention_scores{step * j}",
                          "tinybert_attention_mse"))
    return {s: {"name": name, "weight": 1.0, "student_feature": s, "teacher_feature": t,
                **({"adapter": False} if name == "tinybert_hidden_mse" else {})}
            for s, t, name in pairs}


def get_config(arg=None):
    args = parse_arg(arg, student="kd", layers=3, lr=1e-4, epochs=10, teacher_lr=5e-5,
                     teacher_epochs=5, qat_epochs=2, max_length=128, tinybert_attention=True,
                     smoke=False)
    if args["student"] not in STUDENTS:
        raise ConfigError(f"config arg student={args['student']!r} is not one of "
                          f"{', '.join(STUDENTS)}")
    shape = TINY if args["smoke"] else MINILM
    layers = 1 if args["smoke"] else args["layers"]
    if not 1 <= layers <= shape["num_layers"]:
        raise ConfigError(f"config arg layers={layers} must be in 1..{shape['num_layers']}")
    directory = pretrained_dir("all-MiniLM-L6-v2")
    tokenizer = "bytes" if args["smoke"] else f"{directory}/tokenizer.json"
    max_length = args["max_length"]
    teacher = bbc_run(shape, epochs=args["teacher_epochs"], learning_rate=args["teacher_lr"],
                      tokenizer=tokenizer, max_length=max_length)
    if not args["smoke"]:
        teacher.init.method, teacher.init.pretrained = "pretrained", directory
    kind, lr, epochs = args["student"], args["lr"], args["epochs"]
    step = shape["num_layers"] // layers
    keep = tuple(range(0, shape["num_layers"], step))[:layers]

    def run(kwargs, epochs=epochs):
        return bbc_run(kwargs, epochs=epochs, learning_rate=lr, tokenizer=tokenizer,
                       max_length=max_length)

    def pruned(kwargs, source):
        c = distilled(run(halved(shape, kwargs["num_layers"])))
        c.init.method, c.init.teacher_workdir = "prune_width", source
        c.init.importance = "gradient"
        return c

    if kind in ("pruned", "qat", "pipeline"):
        stages = {"teacher": teacher}
        if kind == "pruned":
            stages["student"] = pruned(shape, "stage:teacher")
        elif kind == "qat":
            stages["student"] = quantized(distilled(run(shape, epochs=args["qat_epochs"])),
                                          "stage:teacher", lr)
        else:
            init = distilled(run({**shape, "num_layers": layers}))
            init.init.method, init.init.keep_layers = "layer_select", keep
            init.init.teacher_workdir = "stage:teacher"
            stages["init"] = init
            stages["pruned"] = pruned({"num_layers": layers}, "stage:init")
            stages["student"] = quantized(distilled(run(halved(shape, layers),
                                                        epochs=args["qat_epochs"])),
                                          "stage:pruned", lr)
        config = chain_config(stages)
        if args["smoke"]:
            smoke(config)
        return config
    student = run({**shape, "num_layers": layers})
    if kind != "scratch":
        distilled(student)
    if kind == "minilm":
        for name in ("minilm_attention_kl", "minilm_value_relation_kl"):
            feature = "attention_probs" if name == "minilm_attention_kl" else "value"
            student.distill.losses[name] = {
                "name": name, "weight": 1.0, "student_feature": f"{feature}{layers}",
                "teacher_feature": f"{feature}{shape['num_layers']}"}
    if kind == "init":
        student.init.method = "layer_select"
        student.init.teacher_workdir = "stage:teacher"
        student.init.keep_layers = keep
    stages = {"teacher": teacher, "student": student}
    if kind == "tinybert":
        intermediate = run({**shape, "num_layers": layers})
        intermediate.distill.teacher.workdir = "stage:teacher"
        intermediate.distill.losses = tinybert_layer_losses(
            layers, step, attention=args["tinybert_attention"])
        student.init.method, student.init.teacher_workdir = "copy", "stage:intermediate"
        stages = {"teacher": teacher, "intermediate": intermediate, "student": student}
    config = chain_config(stages)
    if args["smoke"]:
        smoke(config)
    return config
