r"""Language-model distillation on BBC News: Gemma 3 270M into a Gemma 3 cut out of it.

    python -m jaxkd.data.fetch bbc_news              # once: 2,225 articles, verified
    python -m jaxkd.models.fetch gemma-3-270m        # once: the teacher (Gemma Terms of Use)
    python launch.py --config=configs/bbc_lm_gemma.py:layers=6,divergence=forward_kl

The articles are a language-modelling corpus (``config.data.task='causal_lm'``): each one
tokenised whole with the teacher's own tokenizer (read from the GGUF file) and cut into
windows of ``length`` tokens; train, validation and test are the dataset's article splits,
so no held-out article is ever trained on.

One run, ``runs/bbc_lm_gemma_<args>/student``:
  - teacher: Gemma 3 270M read from its GGUF file (18 layers, d 640, vocabulary 262,144;
    Q4_K_M weights dequantized to float32), run in the step under ``stop_gradient``;
  - student (Minitron: Muralidharan et al. 2024): ``layers`` of the teacher's layers of
    highest Block Influence, in Gemma 3's local/global pattern, each keeping its ``ffn``
    most important FFN neurons (ranked on 64 training windows), then distilled with the
    token-level ``divergence`` (forward_kl: Hinton et al. 2015; reverse_kl: Gu et al. 2024;
    jsd: generalized JSD, beta 0.5, Agarwal et al. 2024; tvd), computed in chunks so the
    ``[B, L, 262144]`` logits are never formed (``jaxkd.token_kd``);
  - AdamW ``lr`` (1e-4), 10 % warm-up, cosine, ``steps`` steps of ``batch`` windows of
    ``length`` tokens: a token budget of ``steps * batch * length`` (200 * 8 * 128 = 204,800
    by default).

With ``qat=Q8_0`` or ``qat=Q4_0`` the student trains quantization-aware on llama.cpp's own
grid (``config.gguf_quantization``) and exports ``formats/model.gguf`` in that type, holding
exactly the weights that trained.

Measured: README and docs/llm.md (``bench/llm_table.py``): perplexity, KL to the teacher,
parameters, GGUF bytes and tokens/s for each divergence, GKD, top-k and QAT, at a small
token budget.

Args (after the colon): ``layers=6``, ``ffn=2048`` (the teacher's width: depth pruning
only), ``divergence=forward_kl``, ``lr=1e-4``, ``steps=200``, ``batch=8``, ``length=128``,
``qat=''`` (float; or ``Q8_0``, ``Q4_0``);
``smoke`` (no download: a 4-layer Gemma 3 of width 32 on the built-in byte tokenizer is
trained for a few steps as the teacher, then a 2-layer student is cut out of it and
distilled, two steps each).
"""

from jaxkd.config import chain_config, parse_arg, pretrained_dir, run_config, smoke
from jaxkd.schema import ConfigError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
QTYPES = ("", "Q8_0", "Q4_0")
GEMMA3_270M = {"hidden_size": 640, "num_layers": 18, "num_heads": 4, "num_kv_heads": 1,
               "head_dim": 256, "intermediate_size": 2048, "sliding_window": 512,
               "global_every": 6, "rope_local_base": 10_000.0, "rope_global_base": 1e6,
               "rms_eps": 1e-6}
TINY = {"hidden_size": 32, "num_layers": 4, "num_heads": 2, "num_kv_heads": 1,
        "head_dim": 16, "intermediate_size": 64, "sliding_window": 16, "global_every": 2}


def lm_run(kwargs, *, tokenizer, length, batch, steps, learning_rate):
    c = run_config("bbc_news", "gemma3", **kwargs)
    c.data.task, c.data.tokenizer = "causal_lm", tokenizer
    c.data.max_length, c.data.bucket_lengths = length, (length,)
    c.batch_size, c.eval_batch_size = batch, batch
    c.num_steps = steps
    c.optimizer.name, c.optimizer.learning_rate = "adamw", learning_rate
    c.optimizer.weight_decay, c.optimizer.grad_clip_norm = 0.01, 1.0
    c.schedule.name, c.schedule.warmup_steps = "cosine", max(steps // 10, 1)
    c.log_every_steps = 10
    c.eval_every_steps = c.checkpoint_every_steps = 100
    c.distill.losses = {"ce": {"name": "token_cross_entropy", "weight": 1.0}}
    c.export.formats = ()
    return c


def get_config(arg=None):
    args = parse_arg(arg, layers=6, ffn=2048, divergence="forward_kl", lr=1e-4, steps=200,
                     batch=8, length=128, qat="", smoke=False)
    if args["divergence"] not in DIVERGENCES:
        raise ConfigError(f"config arg divergence={args['divergence']!r} is not one of "
                          f"{', '.join(DIVERGENCES)}")
    if args["qat"] not in QTYPES:
        raise ConfigError(f"config arg qat={args['qat']!r} is not one of Q8_0, Q4_0 (or '')")
    shape = TINY if args["smoke"] else GEMMA3_270M
    layers = 2 if args["smoke"] else args["layers"]
    ffn = shape["intermediate_size"] if args["smoke"] else args["ffn"]
    if not 1 <= layers <= shape["num_layers"]:
        raise ConfigError(f"config arg layers={layers} must be in 1..{shape['num_layers']}")
    if not 1 <= ffn <= shape["intermediate_size"]:
        raise ConfigError(f"config arg ffn={ffn} must be in 1..{shape['intermediate_size']}")
    gguf = f"{pretrained_dir('gemma-3-270m')}/gemma-3-270m-q4_k_m.gguf"
    tokenizer = "bytes" if args["smoke"] else gguf
    common = dict(tokenizer=tokenizer, length=32 if args["smoke"] else args["length"],
                  batch=args["batch"], steps=args["steps"], learning_rate=args["lr"])
    student = lm_run({**shape, "num_layers": layers, "intermediate_size": ffn}, **common)
    student.init.method, student.init.calibration_examples = "minitron", 64
    student.distill.losses = {"kd": {"name": "token_kd", "weight": 1.0,
                                     "kwargs": {"divergence": args["divergence"]}}}
    if args["qat"]:
        student.gguf_quantization = {"enabled": True, "qtype": args["qat"]}
    stages = {}
    if args["smoke"]:
        teacher = lm_run(shape, **{**common, "learning_rate": 3e-3})
        stages["teacher"] = teacher
        student.distill.teacher.workdir = "stage:teacher"
        student.init.calibration_examples = 8
    else:
        student.distill.teacher.workdir = gguf
    student.init.teacher_workdir = student.distill.teacher.workdir
    stages["student"] = student
    config = chain_config(stages)
    if args["smoke"]:
        smoke(config)
    return config
