r"""The quickstart: MNIST-1D, a CNN teacher distilled into an MLP student through a transfer set.

    python launch.py        # same as: --config=configs/default.py --workdir=runs/default

Three stages in one chain, each in ``runs/default/<stage>``:
  1. ``teacher``: the MNIST-1D paper's CNN (Greydanus 2020) on the 4000 labelled examples;
  2. ``scratch``: the paper's MLP 40-100-100-10 trained on the labels alone (the baseline);
  3. ``student``: the same MLP distilled from the teacher (Hinton et al. 2015, T=4,
     alpha=0.9) on the 4000 labelled inputs plus 20,000 unlabelled ones from the generator
     (Hinton's "transfer set"; the teacher labels them, the label loss skips them).
Adam 1e-2, batch 100, 6000 steps each, as in the paper's training loop.

The MNIST-1D paper reports about 94 % for the CNN and 68 % for the MLP. Measured: README's
quickstart table, with the wall time (``bench/configs_table.py``).

Args (after the colon): ``smoke`` (two tiny steps per stage, in ``runs/default_smoke``).
"""

from jaxkd.config import chain_config, hinton_losses, parse_arg, run_config, smoke


def mnist1d_run(model: str, **model_kwargs):
    c = run_config("mnist1d", model, **model_kwargs)
    c.batch_size = 100
    c.num_steps = 6000
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-2
    c.log_every_steps = 500
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 2000
    return c


def get_config(arg=None):
    args = parse_arg(arg, smoke=False)
    teacher = mnist1d_run("cnn1d")
    scratch = mnist1d_run("mlp", widths=(100, 100))
    student = mnist1d_run("mlp", widths=(100, 100))
    student.data.transfer_split = "unlabelled"
    student.distill.teacher.workdir = "stage:teacher"
    student.distill.losses = hinton_losses(alpha=0.9, temperature=4.0)
    config = chain_config({"teacher": teacher, "scratch": scratch, "student": student})
    if args["smoke"]:
        smoke(config)
    return config
