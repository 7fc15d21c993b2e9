r"""MNIST-1D teacher: the paper's CNN (Greydanus 2020) on the 4000 labelled examples.

    python launch.py --config=configs/mnist1d_teacher.py --workdir=runs/mnist1d_teacher

Adam 1e-2, batch 100, 6000 steps (the paper reports about 94 %). Measured: README's configs
table (bench/configs_table.py).

Args (after the colon): ``model=mlp`` trains the paper's MLP 40-100-100-10 instead (the
scratch baseline; the paper: 68 %); ``smoke`` (two tiny steps).
"""

from jaxkd.config import parse_arg, run_config, smoke


def get_config(arg=None):
    args = parse_arg(arg, model="cnn1d", smoke=False)
    model = args["model"]
    c = run_config("mnist1d", model, **({"widths": (100, 100)} if model == "mlp" else {}))
    c.batch_size = 100
    c.num_steps = 6000
    c.optimizer.learning_rate = 1e-2
    c.log_every_steps = 500
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 2000
    if args["smoke"]:
        smoke(c)
    return c
