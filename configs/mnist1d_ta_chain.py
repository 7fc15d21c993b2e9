r"""Teacher -> assistant -> student on MNIST-1D (TAKD, Mirzadeh et al. 2020), in one chain.

    python launch.py --config=configs/mnist1d_ta_chain.py --workdir=runs/mnist1d_ta_chain

Stages, each in ``runs/mnist1d_ta_chain/<stage>``, each stage's student the next one's
teacher: ``teacher`` (the paper's CNN) -> ``assistant`` (MLP 400-400, Hinton KD from the
teacher) -> ``student`` (MLP 100-100, Hinton KD from the assistant); ``student_init``
starts the same MLP 100-100 from the assistant's weights, keeping the 100 most active
neurons of each layer (``init.method='prune_width'``, Minitron-style), then distils from the
teacher. All KD stages use the 20,000-input transfer set (T=4, alpha=0.9), Adam 1e-2,
batch 100, 6000 steps. A killed chain resumes at its unfinished stage and ends with a
per-stage table. Measured: README's configs table (bench/configs_table.py). Over 3 seeds:
docs/distillation.md.

Args (after the colon): ``smoke`` (two tiny steps per stage).
"""

from jaxkd.config import chain_config, hinton_losses, parse_arg, run_config, smoke


def stage(model: str, teacher: str = "", **model_kwargs):
    c = run_config("mnist1d", model, **model_kwargs)
    c.batch_size = 100
    c.num_steps = 6000
    c.optimizer.learning_rate = 1e-2
    c.log_every_steps = 1000
    c.eval_every_steps = 2000
    c.checkpoint_every_steps = 2000
    if teacher:
        c.data.transfer_split = "unlabelled"
        c.distill.teacher.workdir = teacher
        c.distill.losses = hinton_losses(alpha=0.9, temperature=4.0)
    return c


def get_config(arg=None):
    args = parse_arg(arg, smoke=False)
    student_init = stage("mlp", "stage:teacher", widths=(100, 100))
    student_init.init.method = "prune_width"
    student_init.init.teacher_workdir = "stage:assistant"
    config = chain_config({
        "teacher": stage("cnn1d"),
        "assistant": stage("mlp", "stage:teacher", widths=(400, 400)),
        "student": stage("mlp", "stage:assistant", widths=(100, 100)),
        "student_init": student_init,
    })
    if args["smoke"]:
        smoke(config)
    return config
