"""jaxkd's one launcher: trains the run, chain or compression pipeline a config describes.

    python launch.py [--config=configs/<name>.py[:ARG]] [--workdir=DIR] [--config.<field>=V ...]

Without ``--config`` it runs ``configs/default.py`` (MNIST-1D: CNN teacher -> MLP student)
in ``runs/default``. ``--config.<field>=<value>`` overrides any field of the config (a
chain's stages: ``--config.stages.<stage>.<field>=<value>``); ``--print_config`` prints
every field with its value and exits. A run resumes from the newest checkpoint in its
workdir. For multi-host training pass ``--distributed`` (TPU VMs / SLURM: addresses found
automatically) or ``--coordinator_address``, ``--num_processes`` and ``--process_id``.
A mistake in the command or the config is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from jaxkd import multihost

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "default.py")


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one line (``jaxkd: error: ...``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"jaxkd: error: {message} (see python launch.py --help)", file=sys.stderr)
        sys.exit(2)


def parser() -> Parser:
    p = Parser(prog="python launch.py", description=__doc__.split("\n\n")[0],
               epilog="Examples:\n"
                      "  python launch.py --config=configs/mnist1d_teacher.py:model=mlp "
                      "--config.optimizer.learning_rate=3e-3\n"
                      "  python launch.py --config=configs/digits_student.py --print_config\n"
                      "Each config's args (after the colon) are listed in its docstring.",
               formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
               add_help=False)
    p.add_argument("-h", "--help", "--helpshort", "--helpfull", action="help",
                   help="print this help and exit")
    p.add_argument("--config", default=None, metavar="PATH[:ARG]",
                   help="the experiment's config file (default: configs/default.py)")
    p.add_argument("--workdir", default=None,
                   help="run directory (default: runs/<config name>[_<ARG>])")
    p.add_argument("--print_config", action="store_true",
                   help="print the resolved config (every field, after overrides) and exit")
    p.add_argument("--allow_config_change", action="store_true",
                   help="continue a workdir's checkpoints under a changed config")
    multihost.add_arguments(p)
    p.add_argument("--verbose", action="store_true", help="show the libraries' INFO logs")
    return p


def default_workdir(spec: str) -> str:
    """``runs/<config name>[_<arg>]``: ``configs/x.py:smoke`` runs in ``runs/x_smoke``, so
    that a config's variants never share a workdir."""
    path, _, arg = spec.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    if arg:
        name += "_" + re.sub(r"[^\w=+.-]", "_", arg)
    return os.path.join("runs", name)


def main(argv: list[str]) -> int:
    from jaxkd import configfile
    from jaxkd.schema import ConfigError

    try:
        overrides, rest = configfile.split_overrides(argv)
    except ConfigError as e:
        print(f"jaxkd: error: {e}", file=sys.stderr)
        return 2
    args = parser().parse_args(rest)
    spec = args.config or DEFAULT_CONFIG
    try:
        config = configfile.load(spec)
        configfile.apply(config, overrides)
    except ConfigError as e:
        print(f"jaxkd: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config)
        return 0

    from absl import flags, logging

    flags.FLAGS.mark_as_parsed()  # absl-logging libraries (orbax) need parsed flags
    logging.set_verbosity(logging.INFO if args.verbose else logging.WARNING)
    multihost.initialize(args)
    from jaxkd import chain, compression, preemption, train

    workdir = args.workdir or default_workdir(spec)
    if chain.is_chain(config):
        run = chain.run_chain
    elif compression.is_pipeline(config):
        run = compression.run_pipeline
    else:
        run = train.train_and_evaluate
    try:
        run(config, workdir, allow_config_change=args.allow_config_change)
    except preemption.Preempted as e:
        print(f"jaxkd: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    except ConfigError as e:  # the user's mistake; anything else is ours: its traceback
        print(f"jaxkd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
