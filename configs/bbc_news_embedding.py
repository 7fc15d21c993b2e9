r"""BBC News sentence embeddings: all-MiniLM-L6-v2's embedding distilled into a shallower BERT.

    python -m jaxkd.data.fetch bbc_news                 # once: 2,225 articles, verified
    python -m jaxkd.models.fetch all-MiniLM-L6-v2       # once: the teacher's weights
    python launch.py --config=configs/bbc_news_embedding.py:layers=3

The ``sentence_embedding`` task (``config.data.task``). The teacher is the pretrained
sentence encoder itself (Wang et al. 2020; 6 layers, hidden 384; mean pooling), read from
its Hugging Face directory: no fine-tuning, no head. The student, ``layers`` of its layers
(every other one, DistilBERT's initialisation; ``init=scratch``: random weights), learns
the teacher's embedding of the 1,558 BBC training articles (their first ``max_length``
tokens) by the mean squared difference (Reimers & Gurevych 2020: ``hint_mse`` on the
``embedding`` features, without FitNets' adapter); the topic labels are never trained
on. AdamW ``lr``, 10 % warm-up, cosine decay, ``epochs`` epochs, batch 32.

Reported in ``summary.json``'s ``embedding`` (:mod:`jaxkd.sentence_embedding`): the mean
cosine between the student's and the teacher's embeddings of the test articles, and the
linear-probe accuracy of each (a logistic regression on the training articles'
embeddings, measured on the test articles), which is also the run's ``accuracy``.

Not measured here: a run of the config is the measurement (``summary.json``).

Args (after the colon): ``layers=3``; ``init=teacher`` (or ``scratch``); ``lr=1e-4``;
``epochs=3``; ``max_length=128``; ``smoke`` (two steps of batch 8, width 32, at most 2
layers, the built-in byte tokenizer); ``teacher=DIR`` (a Hugging Face BERT directory; with
``smoke``, one of vocabulary 260, 2 layers, hidden 32, 2 heads, FFN 64, 128 positions, as
the tests write; ``smoke`` without it trains such a BERT for two steps as a first stage).
"""

from jaxkd.config import chain_config, parse_arg, pretrained_dir, run_config, smoke
from jaxkd.schema import ConfigError

MINILM = {"vocab_size": 30522, "hidden_size": 384, "num_layers": 6, "num_heads": 12,
          "intermediate_size": 1536, "max_position": 512, "pooling": "mean"}
TINY = {"vocab_size": 260, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
        "intermediate_size": 64, "max_position": 128, "pooling": "mean"}
INITS = ("teacher", "scratch")
TRAIN_EXAMPLES, BATCH = 1558, 32


def get_config(arg=None):
    args = parse_arg(arg, layers=3, init="teacher", lr=1e-4, epochs=3, max_length=128,
                     teacher="", smoke=False)
    if args["init"] not in INITS:
        raise ConfigError(f"config arg init={args['init']!r} is not one of {', '.join(INITS)}")
    shape = TINY if args["smoke"] else MINILM
    layers = min(args["layers"], shape["num_layers"])
    if not 1 <= layers <= shape["num_layers"]:
        raise ConfigError(f"config arg layers={layers} must be in 1..{shape['num_layers']}")
    # Smoke without a directory: a tiny BERT trained for two steps in a first stage teaches.
    chain = args["smoke"] and not args["teacher"]
    teacher = ("stage:teacher" if chain else
               args["teacher"] or pretrained_dir("all-MiniLM-L6-v2"))
    c = run_config("bbc_news", "bert", **{**shape, "num_layers": layers})
    c.data.task = "sentence_embedding"
    c.data.tokenizer = "bytes" if args["smoke"] else f"{teacher}/tokenizer.json"
    tiny = run_config("bbc_news", "bert", **shape)
    tiny.data.tokenizer, tiny.data.max_length = c.data.tokenizer, args["max_length"]
    c.data.max_length = args["max_length"]
    c.distill.teacher.workdir = teacher
    # No adapter (hint_mse has one by default, FitNets' regressor): the student's own
    # embedding is what must match the teacher's.
    c.distill.losses = {"embedding": {"name": "hint_mse", "weight": 1.0, "adapter": False,
                                      "student_feature": "embedding",
                                      "teacher_feature": "embedding"}}
    if args["init"] == "teacher":
        step = shape["num_layers"] // layers
        c.init.method, c.init.teacher_workdir = "layer_select", teacher
        c.init.keep_layers = tuple(range(0, shape["num_layers"], step))[:layers]
    c.batch_size = BATCH
    c.num_epochs = float(args["epochs"])
    c.optimizer.name, c.optimizer.learning_rate = "adamw", args["lr"]
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = int(0.1 * args["epochs"] * TRAIN_EXAMPLES // BATCH)
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 100, 100
    if chain:
        c = chain_config({"teacher": tiny, "student": c})
    if args["smoke"]:
        smoke(c)
    return c
