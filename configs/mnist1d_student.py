r"""MNIST-1D student: the paper's MLP 40-100-100-10 distilled from a trained teacher.

    python launch.py --config=configs/mnist1d_teacher.py --workdir=runs/mnist1d_teacher
    python launch.py --config=configs/mnist1d_student.py --workdir=runs/mnist1d_student \
        [--config.distill.teacher.workdir=runs/mnist1d_teacher]

Hinton KD (T=4, alpha=0.9) on the 4000 labelled inputs plus the 20,000-input unlabelled
transfer set. Adam 1e-2, batch 100, 6000 steps. Measured: README's configs table
(bench/configs_table.py).

Args (after the colon): ``precomputed=DIR`` distils from the teacher's top-k logits
written once to DIR (``python -m jaxkd.teacher_logits --teacher_workdir=... --out=DIR
--top_k=3 --temperature=4 --transfer_split=unlabelled``) with the top-k KL and its
residual bucket, instead of running the teacher at every step; ``smoke`` (two tiny steps).
"""

from jaxkd.config import hinton_losses, parse_arg, run_config, smoke

TEMPERATURE = 4.0


def get_config(arg=None):
    args = parse_arg(arg, precomputed="", smoke=False)
    c = run_config("mnist1d", "mlp", widths=(100, 100))
    c.batch_size = 100
    c.num_steps = 6000
    c.optimizer.learning_rate = 1e-2
    c.data.transfer_split = "unlabelled"
    c.distill.teacher.workdir = "runs/mnist1d_teacher"
    c.distill.losses = hinton_losses(alpha=0.9, temperature=TEMPERATURE)
    if args["precomputed"]:
        c.distill.teacher.workdir = ""
        c.distill.teacher_logits = args["precomputed"]
        c.distill.losses.kd.name = "topk_soft_target_kl"
    c.log_every_steps = 500
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 2000
    if args["smoke"]:
        smoke(c)
    return c
