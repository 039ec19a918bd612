"""Pure: a job spec -> submitit's SlurmExecutor parameters and the sbatch script it writes.

    print(sbatch_script(load_spec("jobs/dino_vits8.yaml"), Path("runs/dino_vits8/logs")))   # = --dry-run

The script is submitit's own generator, so `segjobs submit --dry-run` prints exactly what is submitted.
Every value is shell-quoted on its #SBATCH line; what quoting cannot make safe (a control character) is refused.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from submitit.slurm.slurm import _make_sbatch_string

from launcher.spec import JobSpec, SpecError


def tasks_per_node(spec: JobSpec) -> int:
    resources = spec.resources
    return resources.tasks_per_node or max(resources.gpus_per_node, 1)


def slurm_parameters(spec: JobSpec) -> dict:
    """submitit's SlurmExecutor parameters for a spec's `resources`."""
    resources = spec.resources
    params = {
        "job_name": spec.name, "time": resources.timeout_min, "nodes": resources.nodes,
        "ntasks_per_node": tasks_per_node(spec), "cpus_per_task": resources.cpus_per_task,
        "signal_delay_s": resources.signal_delay_s, "setup": list(resources.setup),
        # --requeue: SLURM requeues the job when a node fails (and lets segjobs requeue it) on clusters whose
        # JobRequeue default is 0.
        "additional_parameters": {"requeue": True, **resources.sbatch},
    }
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    if resources.mem_gb:
        params["mem"] = f"{int(resources.mem_gb * 1024)}M"
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(resources, key):
            params[key] = getattr(resources, key)
    return params


def sbatch_script(spec: JobSpec, folder: Path, python: str = sys.executable, array_size: int | None = None,
                  max_parallel: int | None = None) -> str:
    """The sbatch script submitit writes for this spec: every value is shell-quoted on its #SBATCH line.
    resources.setup lines are the user's own shell, copied as they are. An array runs at most `max_parallel`
    tasks at once (submitit's default otherwise: 256)."""
    command = " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    throttle = {"array_parallelism": max_parallel} if max_parallel else {}
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size, **slurm_parameters(spec), **throttle)


def check_sbatch_safe(spec: JobSpec, folder: Path) -> None:
    """Refuse what shell quoting cannot make safe on a #SBATCH line: control characters (a newline ends it)."""
    values = {"run directory": str(folder)}
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        values[f"resources.{key}"] = getattr(spec.resources, key) or ""
    for key, value in spec.resources.sbatch.items():
        if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
            raise SpecError(f"resources.sbatch: {key!r} is not an sbatch option name (expected e.g. mail-type).")
        values[f"resources.sbatch.{key}"] = value
    for where, value in values.items():
        if any(ord(c) < 32 for c in value):
            raise SpecError(f"{where}: {value!r} contains a control character, which cannot go into an sbatch script.")
