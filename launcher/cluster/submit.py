"""Submission from the login node: a job spec -> a submitit executor -> sbatch (or processes on this machine).

    segjobs submit jobs/dino_vits8.yaml                                   # SLURM when sbatch answers, else local
    segjobs submit jobs/demo_segmenter.yaml --cluster local --set train.max_steps=50
    segjobs submit jobs/demo_segmenter.yaml --sweep optim.lr=0.01,0.001 --sweep seed=0,1   # one array, 4 runs
    segjobs submit jobs/dino_vits8.yaml --dry-run                         # print the sbatch script only
    segjobs submit jobs/dino_vits8.yaml --profile lab                     # resources from $SEGJOBS_HOME/clusters.yaml
    segjobs submit jobs/segmenter_tiny16.yaml --after dino_vits8          # starts once that run's job completed
    segjobs resume dino_vits8                                             # resubmit from the latest checkpoint

This is the login node's layer of three, as in submitit: launcher.cluster.sbatch (pure: spec -> sbatch options and
text), this module (sweeps, the executor, run.json through launcher.runs) and launcher.cluster.job (what runs
in every task of the job, including the requeue on SIGUSR2).

Note: the run directory and its logs/ (where submitit keeps the pickled job, which a requeued job reruns)
must be on a file system every node sees, and so must the data shards.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from launcher import checkpoint as layout
from launcher import runlock, runs
from launcher.cluster import profiles, queue
from launcher.cluster.job import TrainingJob
from launcher.cluster.sbatch import check_sbatch_safe, sbatch_script, slurm_parameters, tasks_per_node
from launcher.errors import InputError, WorkFailed
from launcher.spec import JobSpec, SpecError, apply_override, check_environment, parse_spec, read_spec_file, resume_conflict

log = logging.getLogger("segjobs.submit")
DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's default MaxArraySize


class SubmitError(WorkFailed):
    """The scheduler refused the job, or the run is already running (exit status 1)."""


@dataclass
class Submission:
    spec: JobSpec
    overrides: list[str] = field(default_factory=list)
    job_id: str = ""
    profile: str | None = None  # the cluster profile merged into spec.resources
    sources: dict[str, str] = field(default_factory=dict)  # resources key -> "--set", "spec", "profile NAME", "default"


def choose_cluster(cluster: str) -> str:
    """auto: slurm when a SLURM controller answers `sinfo`, else local (submitit's LocalExecutor)."""
    if cluster != "auto":
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise SubmitError("--cluster slurm: sbatch is not on PATH; run on a login node of the cluster, "
                              "or use --cluster local (see tools/minicluster for a SLURM on this machine).")
        return cluster
    if shutil.which("sbatch") is None:
        return "local"
    try:
        answered = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        answered = False
    return "slurm" if answered else "local"


def sweep_points(sweeps: list[str]) -> list[list[str]]:
    """`--sweep optim.lr=0.1,0.01 --sweep seed=0,1` -> the cartesian product as lists of `key=value` overrides."""
    axes = []
    for sweep in sweeps:
        key, sep, values = sweep.partition("=")
        if not sep or not key or not values:
            raise SpecError(f"--sweep {sweep!r}: expected KEY=V1,V2,... such as optim.lr=0.01,0.001")
        axes.append([f"{key}={value}" for value in values.split(",")])
    return [list(point) for point in itertools.product(*axes)]


def load_points(spec_path: str, overrides: list[str], sweeps: list[str],
                profile_name: str | None = None) -> tuple[list[Submission], Path]:
    """One resolved spec per sweep point (paths made absolute: the job may start in another folder), with the
    cluster profile (`profile_name`, else clusters.yaml's default) under its resources; and the submitit
    folder: the run's logs/, or <name>-sweep/logs beside the runs of a sweep."""
    raw = read_spec_file(spec_path)
    profile = profiles.select(profile_name)
    merged = copy.deepcopy(raw)
    profiles.merge(merged, profile)
    base = parse_spec(copy.deepcopy(merged), spec_path, overrides)
    points = sweep_points(sweeps) if sweeps else [[]]
    submissions = []
    for index, point in enumerate(points):
        edited = copy.deepcopy(merged)
        for assignment in [*overrides, *point]:
            apply_override(edited, assignment, spec_path)
        if sweeps:
            edited["name"] = f"{base.name}-{index}"
            if base.output_dir is not None:
                edited["output_dir"] = str(base.output_dir.with_name(f"{base.output_dir.name}-{index}"))
        spec = absolute(parse_spec(edited, spec_path))
        check_environment(spec, spec_path)
        found = profiles.sources(raw, profile, [*overrides, *point], list(spec.resources.sbatch))
        submissions.append(Submission(spec, [*overrides, *point], profile=profile and profile.name, sources=found))
    base_dir = absolute(base).run_dir
    folder = base_dir.with_name(f"{base_dir.name}-sweep") / "logs" if sweeps else base_dir / "logs"
    return submissions, folder


def absolute(spec: JobSpec) -> JobSpec:
    spec = spec.model_copy(deep=True)
    spec.output_dir = spec.run_dir.absolute()
    spec.data.train = spec.data.train.absolute()
    if spec.data.val is not None:
        spec.data.val = spec.data.val.absolute()
    if spec.model.pretrained and Path(spec.model.pretrained).exists():
        spec.model.pretrained = str(Path(spec.model.pretrained).absolute())
    return spec


def check_not_running(run_dir: Path) -> None:
    """Two jobs must never write one run directory: refuse while its job is alive or its run lock is held."""
    record = runs.read_run(run_dir)
    job = runs.latest_job(record)
    if job is not None and record.get("state") in runs.ACTIVE_STATES:
        alive = (queue.local_job_alive(job) if job["cluster"] == "local"
                 else getattr(queue.poll_slurm([job["job_id"]]).job(job), "state", None) in runs.ACTIVE_STATES)
        if alive:
            raise SubmitError(f"{run_dir}: run {record.get('name')} is already {record['state'].lower()} as job {job['job_id']}; "
                              f"`segjobs cancel {record.get('name')}` first, or give the spec another name.")
    holder = runlock.lock_holder(run_dir)
    if holder is not None and runlock.stale_reason(holder, job_running=queue.slurm_job_running) is None:
        raise SubmitError(f"{run_dir}: the run is being trained by {runlock.describe_holder(holder)}; "
                          "two processes never write one run. Wait for it to end, or stop it first.")


def check_resumable(spec: JobSpec, source: str) -> None:
    """A run directory with checkpoints is resumed by the job: refuse now (on the login node) what it would refuse."""
    latest = layout.latest(layout.checkpoints_folder(spec.run_dir))
    if latest is not None:
        conflict = resume_conflict(layout.read_meta(latest)["resume"], spec)
        if conflict:
            raise SpecError(f"{source}: cannot resume {latest}: {conflict}. Use another name or output_dir for a new run.")


def make_executor(cluster: str, folder: Path, spec: JobSpec, max_parallel: int | None = None,
                  dependency: str | None = None):
    resources = spec.resources
    if cluster == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=resources.max_requeues)
        executor.update_parameters(**slurm_parameters(spec, dependency))
        if max_parallel:
            executor.update_parameters(array_parallelism=max_parallel)  # --array=0-K%N
        return executor
    if resources.nodes > 1:
        raise SpecError(f"resources.nodes: {resources.nodes} nodes need SLURM; the local executor runs on one node.")
    import torch

    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=resources.max_requeues)
    executor.update_parameters(timeout_min=resources.timeout_min, tasks_per_node=tasks_per_node(spec),
                               gpus_per_node=min(resources.gpus_per_node, torch.cuda.device_count()),
                               signal_delay_s=resources.signal_delay_s, setup=list(resources.setup))
    return executor


def refusal_hint(message: str) -> str:
    """What to change in the spec for SLURM's most common refusals."""
    text = message.lower()
    hints = [("partition", "resources.partition (`sinfo` lists the partitions)"),
             ("account", "resources.account (`sacctmgr show assoc user=$USER` lists yours)"),
             ("qos", "resources.qos"),
             ("node count", "resources.nodes (`sinfo` shows the nodes of each partition)"),
             ("time limit", "resources.timeout_min (`sinfo -o '%P %l'` shows each partition's limit)"),
             ("gres", "resources.gpus_per_node (`sinfo -o '%P %G'` shows the GPUs per node)"),
             ("node configuration", "resources (nodes, gpus_per_node, tasks_per_node, cpus_per_task, mem_gb, constraint): "
                                    "no node has what the job asks (`sinfo -N -l` shows the nodes)"),
             ("memory", "resources.mem_gb")]
    for word, hint in hints:
        if word in text:
            return f"Change {hint}."
    return "Check the spec's resources section against `sinfo`."


def submit_all(submissions: list[Submission], folder: Path, cluster: str, source: str,
               max_parallel: int | None = None, dependency: str | None = None) -> list[Submission]:
    """Submit one job (or one array for several submissions), then record each run. Nothing is recorded when
    the scheduler refuses, and a run directory this call created is removed again. `dependency`: sbatch's
    --dependency (afterok:JOB), SLURM only."""
    from submitit.core.utils import FailedJobError

    for item in submissions:
        check_sbatch_safe(item.spec, folder)
        runs.check_run_dir(item.spec.run_dir, source)
        check_not_running(item.spec.run_dir)
        check_resumable(item.spec, source)
    created = [p for p in {folder.parent, *(s.spec.run_dir for s in submissions)} if not p.exists()]
    executor = make_executor(cluster, folder, submissions[0].spec, max_parallel, dependency)
    jobs = []
    refused = io.StringIO()
    try:
        with contextlib.redirect_stderr(refused):  # submitit prints sbatch's error too: it is in ours
            with executor.batch():
                for item in submissions:
                    jobs.append(executor.submit(TrainingJob(item.spec.to_yaml(), source)))
    except FailedJobError as exc:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        message = "\n".join(line for line in str(exc).splitlines() if line.strip()) or refused.getvalue().strip()
        raise SubmitError(f"SLURM refused {source}: {message}\n{refusal_hint(message)}") from None
    for item, job in zip(submissions, jobs):
        item.job_id = str(job.job_id)
        record_submission(item, cluster, folder, job_name=submissions[0].spec.name, dependency=dependency)
    return submissions


def record_submission(item: Submission, cluster: str, folder: Path, job_name: str, dependency: str | None = None) -> None:
    """`job_name` is the name sbatch was given (an array's, the first run's): with the time it tells this job
    from a later one that gets the same id (see queue.SlurmView.job)."""
    spec = item.spec
    submission = {"job_id": item.job_id, "time": time.time(), "cluster": cluster, "log_folder": str(folder),
                  "overrides": item.overrides, "job_name": job_name, "profile": item.profile, "after": dependency}
    if cluster == "local":  # the job id is the controller's pid: with its start time, it names that process only
        submission["pid_start"] = runs.process_start_time(int(item.job_id))
    runs.submitted(spec.run_dir, submission,
                   name=spec.name, model=spec.model.name, cluster=cluster, spec=spec.model_dump(mode="json"),
                   nodes=spec.resources.nodes, gpus_per_node=spec.resources.gpus_per_node,
                   tasks=spec.resources.nodes * tasks_per_node(spec), timeout_min=spec.resources.timeout_min)


def submit(spec_path: str, cluster: str = "auto", overrides: list[str] = (), sweeps: list[str] = (),
           dry_run: bool = False, max_parallel: int | None = None, profile: str | None = None,
           after: str | None = None) -> int:
    """`after`: a run whose current job must complete first (sbatch --dependency=afterok:JOB)."""
    submissions, folder = load_points(spec_path, list(overrides), list(sweeps), profile)
    if not dry_run:
        cluster = choose_cluster(cluster)
        if after and cluster != "slurm":
            raise InputError(f"--after {after}: the {cluster} executor cannot wait for another job; --after needs "
                             "SLURM (a login node, or --cluster slurm).")
    dependency = dependency_on(after) if after else None
    if dry_run:
        for item in submissions:
            check_sbatch_safe(item.spec, folder)
        array = len(submissions) if len(submissions) > 1 else None
        first = submissions[0]
        print(sbatch_script(first.spec, folder, array_size=array, max_parallel=max_parallel, dependency=dependency))
        print(profiles.provenance_comment(first.spec.resources, first.sources, first.profile), end="")
        return 0
    # A sweep over SLURM's MaxArraySize goes as several arrays, each throttled to max_parallel.
    size = max_array_size() if cluster == "slurm" else len(submissions)
    done = []
    for first in range(0, len(submissions), size):
        done += submit_all(submissions[first:first + size], folder, cluster, spec_path, max_parallel, dependency)
    if sweeps:
        write_sweep(folder.parent / "sweep.json", spec_path, sweeps, done)
    for item in done:
        print(f"{item.spec.name}\tjob {item.job_id}\t{cluster}\t{item.spec.run_dir}")
    return 0


def dependency_on(name: str) -> str | None:
    """sbatch's --dependency for `--after RUN`: afterok on the run's current job (its latest submission, so
    after a resume the resumed job); None when that job has completed already (nothing to wait for).
    InputError (exit 2) when the run has no SLURM job that is live or completed.

    Note: a job that ends otherwise (failed, cancelled, out of requeues) never releases the jobs waiting
    for it: SLURM shows them PENDING (DependencyNeverSatisfied) until they are cancelled."""
    run_dir = runs.resolve_run(name)
    record = runs.read_run(run_dir)
    job = runs.latest_job(record)
    label = record.get("name", name)
    if job is None or job["cluster"] != "slurm":
        how = "has no submitted job" if job is None else f"ran with the {job['cluster']} executor"
        raise InputError(f"--after {name}: run {label} {how}; --after waits for a SLURM job.")
    if not queue.valid_slurm_job_id(job["job_id"]):
        raise runs.RunError(f"{run_dir / 'run.json'}: job id {job['job_id'][:40]!r} is not a SLURM job id.")
    seen = queue.poll_slurm([job["job_id"]]).job(job)
    state = seen.state if seen is not None else record.get("state", "UNKNOWN")
    if state == runs.COMPLETED:
        print(f"segjobs: --after {label}: its job {job['job_id']} has completed; nothing to wait for", file=sys.stderr)
        return None
    if state not in runs.ACTIVE_STATES:
        raise InputError(f"--after {name}: run {label}'s job {job['job_id']} is {state}, so a job waiting for it to "
                         f"complete would never start. Resume it first (`segjobs resume {label}`), then submit --after it.")
    return f"afterok:{job['job_id']}"


def max_array_size() -> int:
    """SLURM's MaxArraySize (`scontrol show config`): an array's task indices run from 0 to MaxArraySize - 1."""
    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        config = ""
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", config, re.MULTILINE)
    return max(1, int(found.group(1))) if found else DEFAULT_MAX_ARRAY_SIZE


def write_sweep(path: Path, spec_path: str, sweeps: list[str], submitted: list[Submission]) -> None:
    """<name>-sweep/sweep.json: the swept axes and, per point, its overrides, run folder and job id."""
    axes = {key: values.split(",") for key, _, values in (sweep.partition("=") for sweep in sweeps)}
    points = [{"name": item.spec.name, "run_dir": str(item.spec.run_dir), "overrides": item.overrides,
               "job_id": item.job_id} for item in submitted]
    runs.write_json(path, {"spec": spec_path, "axes": axes, "points": points})


def resume(name: str, cluster: str | None = None) -> int:
    """Resubmit a stopped, failed or cancelled run with the spec of its last submission."""
    run_dir = runs.resolve_run(name)
    record = runs.read_run(run_dir)
    if record.get("spec") is not None:
        raw = record["spec"]
    elif (run_dir / "spec.yaml").exists():
        raw = read_spec_file(run_dir / "spec.yaml")
    else:
        raise runs.RunError(f"{run_dir}: no spec recorded (neither run.json nor spec.yaml); submit its job spec instead.")
    if record.get("state") == "COMPLETED":
        raise SubmitError(f"{run_dir}: run {record.get('name', name)} completed; nothing to resume "
                          "(to train longer, submit its spec with --set train.max_steps=...).")
    source = str(run_dir / "run.json")
    spec = parse_spec(raw, source)
    check_environment(spec, source)
    job = runs.latest_job(record)
    cluster = choose_cluster(cluster or (job["cluster"] if job else "auto"))
    folder = run_dir / "logs"  # its own, also for a run of a sweep (the recorded folder is not trusted to write in)
    # The recorded spec holds the resources merged at submission: the profile is not read again.
    again = Submission(spec, job["overrides"] if job else [], profile=job.get("profile") if job else None)
    item, = submit_all([again], folder, cluster, source)
    print(f"{spec.name}\tjob {item.job_id}\t{cluster}\t{spec.run_dir}")
    return 0


def cancel(name: str) -> int:
    run_dir = runs.resolve_run(name)
    record = runs.read_run(run_dir)
    job = runs.latest_job(record)
    if job is None or record.get("state") not in runs.ACTIVE_STATES:
        raise SubmitError(f"{run_dir}: run {record.get('name', name)} has no active job (state {record.get('state', 'unknown')}).")
    if job["cluster"] == "slurm":
        if not queue.valid_slurm_job_id(job["job_id"]):
            raise runs.RunError(f"{run_dir / 'run.json'}: job id {str(job['job_id'])[:40]!r} is not a SLURM job id "
                                "(digits, or digits_digits for an array task); nothing was cancelled.")
        view = queue.poll_slurm([job["job_id"]])
        seen = view.job(job)
        if view.reachable and (seen is None or seen.state not in runs.ACTIVE_STATES):
            raise SubmitError(f"{run_dir}: SLURM shows no live job {job['job_id']} submitted for run {record.get('name', name)} "
                              "(it has ended, or the id now belongs to a job submitted later); nothing was cancelled.")
        done = subprocess.run(["scancel", job["job_id"]], capture_output=True, text=True)
        if done.returncode != 0:
            raise SubmitError(f"scancel {job['job_id']} failed: {done.stderr.strip()}")
    elif queue.local_job_alive(job):
        os.kill(int(job["job_id"]), signal.SIGINT)  # submitit's local controller stops its tasks on SIGINT
    else:
        raise SubmitError(f"{run_dir}: run.json names process {str(job['job_id'])[:40]} as the job of run "
                          f"{record.get('name', name)}, but no process started by segjobs runs under that id (it has "
                          "ended, its pid now belongs to another process, or the record was edited); nothing was signalled.")
    runs.cancelled(run_dir)
    print(f"{record.get('name', name)}\tjob {job['job_id']}\tcancelled")
    return 0


