"""jaxkd's one launcher: ``python launch.py --config=configs/<name>.py[:arg] --workdir=DIR``.

Any config field can be overridden with ``--config.<field>=<value>``. Without flags it runs
``configs/default.py`` (MNIST-1D: CNN teacher -> MLP student) in ``runs/default``.
A run resumes from the newest checkpoint in its workdir. For multi-host training pass
``--distributed`` (TPU VMs / SLURM: addresses found automatically) or the explicit
``--coordinator_address``, ``--num_processes`` and ``--process_id``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(HERE, "configs", "default.py"), "The experiment's config file.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Continue a workdir's checkpoints under a changed config.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def default_workdir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    return os.path.join("runs", name)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:  # library INFO logs drown the progress lines
        logging.set_verbosity(logging.WARNING)
    import jax

    if _COORDINATOR.value or _DISTRIBUTED.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    from jaxkd import chain, compression, preemption, train

    config = _CONFIG.value
    workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
    try:
        if chain.is_chain(config):
            run = chain.run_chain
        elif compression.is_pipeline(config):
            run = compression.run_pipeline
        else:
            run = train.train_and_evaluate
        run(config, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    except preemption.Preempted as e:
        print(f"jaxkd: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    except (ValueError, FileNotFoundError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"jaxkd: error: {message}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """Parses flags; a bad flag or config override is one line on stderr, exit status 2."""
    try:
        argv = flags.FLAGS(sys.argv)
    except flags.Error as e:
        print(f"jaxkd: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as e:  # ml_collections: override of a missing field
        field = str(e.args[0] if e.args else e).strip("\"'")
        overrides = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.")]
        culprit = next((o for o in overrides if field in o.split(".")), "--config.<field>")
        print(f"jaxkd: error: {culprit}: the config has no field {field!r}", file=sys.stderr)
        sys.exit(2)
    sys.exit(app.run(main, argv=argv, flags_parser=lambda a: a))


if __name__ == "__main__":
    run()
