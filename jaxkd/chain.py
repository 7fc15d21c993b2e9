"""Multi-stage runs: teacher -> (assistant ->) student, each stage feeding the next.

A chain config (:func:`jaxkd.config.chain_config`) lists stages in ``stage_order``; stage
``NAME`` runs in ``workdir/NAME`` and a later stage names it as its teacher with
``distill.teacher.workdir='stage:NAME'`` (teacher-assistant KD, Mirzadeh et al. 2020).
A finished stage (its ``summary.json`` is written) is not run again, provided it finished
under the same config (else the chain stops, naming the stage and the changed fields), and
an unfinished one resumes from its newest checkpoint, so relaunching a killed chain
continues where it stopped. A stage's errors name its fields as typed on the command line
(``config.stages.<stage>.<field>``). The chain ends with a table of every stage:
parameters, bytes, accuracy.
"""

from __future__ import annotations

import os
import re
from typing import Any

import ml_collections

from jaxkd import compression, metrics, multihost, stages, train
from jaxkd import workdir as workdirs
from jaxkd.schema import ConfigError


def is_chain(config: ml_collections.ConfigDict) -> bool:
    return "stages" in config


def run_chain(config: ml_collections.ConfigDict, workdir: str, *,
              allow_config_change: bool = False) -> dict[str, Any]:
    """Runs (or resumes) every stage in order; returns and writes the per-stage table."""
    unknown = [n for n in config.stage_order if n not in config.stages]
    if unknown:
        raise ConfigError(f"config.stage_order names unknown stages {unknown}; "
                          f"config.stages has: {', '.join(config.stages)}")
    workdirs.check_kind(workdir, stages=True)
    done: list[str] = []
    rows = {}
    for name in config.stage_order:
        try:
            summary = _run_stage(config, name, workdir, done, allow_config_change)
        except ConfigError as e:  # named as the user types the stage's fields
            e.args = (in_stage(str(e), name),)
            raise
        rows[name] = {k: summary.get(k) for k in
                      ("model", "method", "accuracy", "num_params", "artifact_bytes",
                       "train_steps_per_sec")}
        done.append(name)
    table = format_table(rows)
    print(table, flush=True)
    chain_summary = {"stages": rows, "stage_order": list(config.stage_order)}
    metrics.write_summary(workdir, chain_summary)
    return chain_summary


def _run_stage(config: ml_collections.ConfigDict, name: str, workdir: str, done: list[str],
               allow_config_change: bool) -> dict[str, Any]:
    run = stages.resolve(config.stages[name], workdir, done, name)
    stage_dir = os.path.join(workdir, name)
    # Only the leader reads the run's files; it tells the others what it found.
    summary = multihost.broadcast_json(
        metrics.read_summary(stage_dir) if multihost.is_leader() else None)
    if compression.is_pipeline(run):  # it checks and reuses its own finished stages
        if summary is None:
            print(f"=== stage {name} -> {stage_dir}", flush=True)
        return compression.run_pipeline(run, stage_dir,
                                        allow_config_change=allow_config_change)
    if summary is None:
        print(f"=== stage {name} -> {stage_dir}", flush=True)
        return train.train_and_evaluate(run, stage_dir, allow_config_change=allow_config_change)
    workdirs.check_finished(stage_dir, run, stage=name, allow_config_change=allow_config_change)
    print(f"=== stage {name}: finished earlier ({stage_dir})", flush=True)
    return summary


_FIELD = re.compile(r"(?<![\w/.-])config\.(?!stages\.|json\b)")


def in_stage(message: str, name: str) -> str:
    """``message`` with the stage's fields named as the user types them:
    ``config.model.name`` -> ``config.stages.<name>.model.name``."""
    return _FIELD.sub(f"config.stages.{name}.", message)


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: stage, model, method, accuracy, parameters, artifact bytes, steps/s."""
    lines = ["| stage | model | method | accuracy | params | artifact bytes | train steps/s |",
             "|---|---|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        rate = r.get("train_steps_per_sec")
        rate_text = f"{rate:.1f}" if rate else "n/a"
        lines.append(f"| {name} | {r['model']} | {r.get('method') or 'n/a'} | "
                     f"{100 * r['accuracy']:.2f} % | {r['num_params']:,} | "
                     f"{r['artifact_bytes']:,} | {rate_text} |")
    return "\n".join(lines)
