r"""Digits teacher: LeNet-5 on scikit-learn's 8x8 handwritten digits (1437 train / 360 test).

    python launch.py --config=configs/digits_teacher.py --workdir=runs/digits_teacher

Adam 3e-3, batch 64, 3000 steps, 1-pixel jitter. Measured: README's configs table
(bench/configs_table.py).

Args (after the colon): ``smoke`` (two tiny steps).
"""

from jaxkd.config import parse_arg, run_config, smoke


def get_config(arg=None):
    args = parse_arg(arg, smoke=False)
    c = run_config("digits", "lenet5")
    c.data.augment = "jitter"
    c.data.jitter_pixels = 1
    c.batch_size = 64
    c.eval_batch_size = 360
    c.num_steps = 3000
    c.optimizer.learning_rate = 3e-3
    c.log_every_steps = 250
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    if args["smoke"]:
        smoke(c)
    return c
