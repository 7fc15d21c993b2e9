r"""CIFAR-100 KD benchmark of CRD (Tian et al. 2020): resnet32x4 teacher -> resnet8x4 student.

    python launch.py --config=configs/cifar100_kd.py --workdir=runs/cifar100_kd

Needs the tfds ``cifar100`` dataset prepared in ``$TFDS_DATA_DIR``. Both stages use the
RepDistiller recipe: 240 epochs, SGD momentum 0.9, lr 0.05 divided by 10 at epochs 150, 180
and 210, batch 64, weight decay 5e-4, random crop (pad 4) + horizontal flip. The student
uses Hinton KD with T=4 and alpha=0.9. Published (CRD, table 1): teacher 79.42 %, student
from scratch 72.50 %, KD 73.33 %. Expected: those numbers within about half a point.
Not measured here (no GPU, no download). A run takes hours on one GPU.

Args (after the colon): ``smoke`` (two tiny steps per stage; the tests run it on tfds mock
data).
"""

from jaxkd.config import chain_config, hinton_losses, parse_arg, run_config, smoke


def cifar_run(model: str):
    c = run_config("cifar100", model)
    c.data.augment = "crop_flip"
    c.batch_size = 64
    c.eval_batch_size = 1000
    c.num_epochs = 240
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.schedule.name = "step"
    c.schedule.boundaries_epochs = (150, 180, 210)
    c.schedule.decay_factor = 0.1
    c.log_every_steps = 200
    c.eval_every_steps = 5000
    c.checkpoint_every_steps = 5000
    return c


def get_config(arg=None):
    args = parse_arg(arg, smoke=False)
    teacher = cifar_run("resnet32x4")
    student = cifar_run("resnet8x4")
    student.distill.teacher.workdir = "stage:teacher"
    student.distill.losses = hinton_losses(alpha=0.9, temperature=4.0)
    config = chain_config({"teacher": teacher, "student": student})
    if args["smoke"]:
        smoke(config)
    return config
