"""Slurm job identity, and finding a requeued job's run dir again.

A requeued Slurm job runs its batch script again, so `bigmodel train` starts afresh with
a new time-stamped run dir. To continue the run it had, the default run dir goes through
the `bigmodel_requeued_dir` resolver: the first time a job runs a command it records the
run dir under `outputs/.requeue/<job id>-<hash of the command line>`; when Slurm restarts
the job (SLURM_RESTART_COUNT > 0) the same command gets that run dir back, and
trainer.resume=auto continues from its newest checkpoint. No torch here: Hydra resolves
the run dir before anything heavy is imported.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Mapping, Optional

REGISTRY = Path("outputs") / ".requeue"


def slurm_job_id(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The id `scontrol requeue` wants: ARRAYJOB_TASK for an array task, else the job id."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID") or None


def registry_entry(job_id: str, argv=None) -> Path:
    command = "\0".join(sys.argv if argv is None else argv)
    return REGISTRY / f"{job_id}-{hashlib.sha1(command.encode()).hexdigest()[:12]}"


def requeued_run_dir(default: str, environ: Mapping[str, str] = os.environ) -> str:
    """`default`, unless this is a restarted Slurm job that recorded another run dir."""
    job_id = slurm_job_id(environ)
    if not job_id:
        return default
    entry = registry_entry(job_id)
    restarted = int(environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    if restarted and entry.is_file():
        try:
            recorded = entry.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):  # unreadable: a fresh run dir rather than a crash
            recorded = ""
        if recorded:
            return recorded
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(entry.name + f".{os.getpid()}.tmp")
        tmp.write_text(os.path.abspath(default) + "\n", encoding="utf-8")
        tmp.replace(entry)
    except OSError:  # an unwritable folder: the run dir itself will say so, in one line
        pass
    return default


def register_resolver() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("bigmodel_requeued_dir", requeued_run_dir, replace=True)
