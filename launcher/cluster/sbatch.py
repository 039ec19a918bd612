"""Pure: a job spec -> submitit's SlurmExecutor parameters and the sbatch script it writes.

    print(sbatch_script(load_spec("jobs/dino_vits8.yaml"), Path("runs/dino_vits8/logs")))   # = --dry-run

The script is submitit's own generator, so `segjobs submit --dry-run` prints exactly what is submitted.
Every value is shell-quoted on its #SBATCH line (srun's arguments on its line); what quoting cannot make safe
(a control character) is refused, and so are extra sbatch options that would replace what segjobs sets itself.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from submitit.slurm.slurm import _make_sbatch_string

from launcher.spec import JobSpec, ResourcesSpec, SpecError

# sbatch options segjobs writes itself: an extra `sbatch` option of that name would silently replace it (submitit
# lets additional parameters win) and break the logs, the requeue signal or the array.
OWN_OPTIONS = {"output", "error", "open-mode", "signal", "array", "job-name", "wckey", "dependency", "requeue"}
# sbatch options that have their own resources key, which is where they belong.
KEYED_OPTIONS = {"partition": "partition", "account": "account", "qos": "qos", "constraint": "constraint",
                 "exclude": "exclude", "nodes": "nodes", "ntasks-per-node": "tasks_per_node",
                 "cpus-per-task": "cpus_per_task", "gpus-per-node": "gpus_per_node", "mem": "mem_gb", "time": "timeout_min"}


def tasks_per_node(spec: JobSpec) -> int:
    resources = spec.resources
    return resources.tasks_per_node or max(resources.gpus_per_node, 1)


def slurm_parameters(spec: JobSpec, dependency: str | None = None) -> dict:
    """submitit's SlurmExecutor parameters for a spec's `resources`; `dependency` is sbatch's (afterok:JOB)."""
    resources = spec.resources
    params = {
        "job_name": spec.name, "time": resources.timeout_min, "nodes": resources.nodes,
        "ntasks_per_node": tasks_per_node(spec), "cpus_per_task": resources.cpus_per_task,
        "signal_delay_s": resources.signal_delay_s, "setup": list(resources.setup), "srun_args": list(resources.srun_args),
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
    if dependency:
        params["dependency"] = dependency
    return params


def sbatch_script(spec: JobSpec, folder: Path, python: str = sys.executable, array_size: int | None = None,
                  max_parallel: int | None = None, dependency: str | None = None) -> str:
    """The sbatch script submitit writes for this spec: every value is shell-quoted on its #SBATCH line.
    resources.setup lines are the user's own shell, copied as they are. An array runs at most `max_parallel`
    tasks at once (submitit's default otherwise: 256)."""
    command = " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    throttle = {"array_parallelism": max_parallel} if max_parallel else {}
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size,
                               **slurm_parameters(spec, dependency), **throttle)


def resources_problem(resources: ResourcesSpec, site_file: bool = False) -> tuple[str, str] | None:
    """(key, why) for the first resources value that cannot go into an sbatch script, None when all can:
    a control character (a newline ends an #SBATCH line, and a setup line is one line; tabs are kept), or an
    extra sbatch option that is no option name. In a site file (clusters.yaml, shared by every spec) also an
    option that replaces one segjobs writes, or one that has its own key; a spec may still do that on purpose."""
    values = {key: getattr(resources, key) or "" for key in ("partition", "account", "qos", "constraint", "exclude")}
    values.update({f"setup[{i}]": line.replace("\t", " ") for i, line in enumerate(resources.setup)})
    values.update({f"srun_args[{i}]": arg for i, arg in enumerate(resources.srun_args)})
    for option, value in resources.sbatch.items():
        if not re.fullmatch(r"[a-z][a-z0-9-]*", option):
            return f"sbatch.{option}", f"{option!r} is not an sbatch option name (expected e.g. mail-type)"
        if site_file and option in OWN_OPTIONS:
            return f"sbatch.{option}", f"segjobs writes --{option} itself (its logs, requeue signal and arrays depend on it)"
        if site_file and option in KEYED_OPTIONS:
            return f"sbatch.{option}", f"--{option} has its own key: set {KEYED_OPTIONS[option]} instead"
        values[f"sbatch.{option}"] = value
    for key, value in values.items():
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            return key, f"{value[:60]!r} contains a control character, which cannot go into an sbatch script"
    return None


def check_sbatch_safe(spec: JobSpec, folder: Path) -> None:
    """Refuse what cannot go safely into the sbatch script (`resources_problem`), the run directory included."""
    if any(ord(c) < 32 for c in str(folder)):
        raise SpecError(f"run directory: {str(folder)!r} contains a control character, which cannot go into an sbatch script.")
    problem = resources_problem(spec.resources)
    if problem:
        raise SpecError(f"resources.{problem[0]}: {problem[1]}.")
