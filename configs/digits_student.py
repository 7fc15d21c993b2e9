r"""Digits student: an MLP 64-32-10 distilled from the LeNet-5 digits teacher.

    python launch.py --config=configs/digits_teacher.py --workdir=runs/digits_teacher
    python launch.py --config=configs/digits_student.py --workdir=runs/digits_student \
        [--config.distill.teacher.workdir=runs/digits_teacher]

Hinton KD (T=4, alpha=0.9); the teacher sees the same jittered batch as the student, so the
augmentations act as the transfer set. Adam 1e-2, batch 64, 3000 steps. On 1437 easy
examples with no unlabelled inputs, distillation does not beat the labels; MNIST-1D with its
transfer set (configs/default.py) is where it helps. Measured: README's configs table
(bench/configs_table.py).

Args (after the colon): ``scratch`` trains the same MLP on the labels alone; ``smoke``.
"""

from jaxkd.config import hinton_losses, parse_arg, run_config, smoke, supervised_losses


def get_config(arg=None):
    args = parse_arg(arg, scratch=False, smoke=False)
    c = run_config("digits", "mlp", widths=(32,))
    c.data.augment = "jitter"
    c.data.jitter_pixels = 1
    c.batch_size = 64
    c.eval_batch_size = 360
    c.num_steps = 3000
    c.optimizer.learning_rate = 1e-2
    c.distill.teacher.workdir = "runs/digits_teacher"
    c.distill.losses = hinton_losses(alpha=0.9, temperature=4.0)
    if args["scratch"]:
        c.distill.teacher.workdir = ""
        c.distill.losses = supervised_losses()
    c.log_every_steps = 250
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    if args["smoke"]:
        smoke(c)
    return c
