r"""Fashion-MNIST (Xiao et al. 2017): a LeNet-5 distilled from a 10x larger LeNet.

    python -m jaxkd.data.fetch fashion_mnist     # once: the verified offline copy
    python launch.py --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist
    python launch.py --config=configs/mnist_compress.py:model=lenet5,dataset=fashion_mnist

A chain of three stages, each in ``runs/fashion_mnist/<stage>``:
  1. ``teacher``: Caffe's LeNet (conv 20 and 50 of 5x5, fc 500; 431,080 parameters),
     inputs jittered by up to 2 pixels;
  2. ``scratch``: the classic LeNet-5 (conv 6 and 16, fc 120 and 84; 44,426 parameters)
     on the labels alone;
  3. ``student``: the same LeNet-5 distilled from the teacher (Hinton KD at
     ``temperature``, alpha = 0.9) on the same jittered batches.
SGD with momentum 0.9 and a cosine decay from 0.05 (the distilled student: ``student_lr``),
batch 128, ``epochs`` epochs each (an epoch of the teacher costs about 30 s on 2 CPU
cores). The defaults are the choices made on the validation split: at lr 0.05 the distilled
student collapsed to chance at T = 4 and 8. The
second command compresses a LeNet on Fashion-MNIST with the Deep Compression pipeline.

Measured: README's Fashion-MNIST table (docs/mnist.md; ``python bench/mnist_table.py
--part=fashion --docs``, 3 seeds, these defaults chosen on the validation split), test
accuracy: teacher 91.47 ± 0.10 %, scratch 88.83 ± 0.16 %, distilled 88.36 ± 0.52 % (no
gain from distillation here); the compressed LeNet 8.91 ± 0.18 % error at 47.3x. No paper
target.

Args (after the colon): ``epochs=10``; ``student_lr=0.02``; ``temperature=2.0``; ``smoke``
(two tiny steps per stage).
"""

from jaxkd.config import (
    chain_config,
    hinton_losses,
    parse_arg,
    run_config,
    smoke,
    supervised_losses,
)


def fashion_run(epochs: int, **model_kwargs):
    c = run_config("fashion_mnist", "lenet5", **model_kwargs)
    c.data.augment, c.data.jitter_pixels = "jitter", 2
    c.batch_size = 128
    c.num_epochs = float(epochs)
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
    c.schedule.name = "cosine"
    c.log_every_steps = 500
    c.eval_every_steps = 5000
    c.checkpoint_every_steps = 2000
    return c


def get_config(arg=None):
    args = parse_arg(arg, epochs=10, student_lr=0.02, temperature=2.0, smoke=False)
    teacher = fashion_run(args["epochs"], channels=(20, 50), widths=(500,))
    scratch = fashion_run(args["epochs"])
    scratch.distill.losses = supervised_losses()
    student = fashion_run(args["epochs"])
    student.optimizer.learning_rate = args["student_lr"]
    student.distill.teacher.workdir = "stage:teacher"
    student.distill.losses = hinton_losses(alpha=0.9, temperature=args["temperature"])
    config = chain_config({"teacher": teacher, "scratch": scratch, "student": student})
    if args["smoke"]:
        smoke(config)
    return config
