"""Submission: a job spec -> a submitit executor -> sbatch (or processes on this machine); the job seen from inside.

    segjobs submit jobs/dino_vits8.yaml                                   # SLURM when sbatch answers, else local
    segjobs submit jobs/demo_segmenter.yaml --cluster local --set train.max_steps=50
    segjobs submit jobs/demo_segmenter.yaml --sweep optim.lr=0.01,0.001 --sweep seed=0,1   # one array, 4 runs
    segjobs submit jobs/dino_vits8.yaml --dry-run                         # print the sbatch script only
    segjobs resume dino_vits8                                             # resubmit from the latest checkpoint

Three layers, as in submitit: `slurm_parameters` and `sbatch_script` (pure: spec -> sbatch options and text),
`submit` (the executor, run.json, the index) and `TrainingJob` (what runs in every task of the job).

Requeue: SLURM sends SIGUSR2 `resources.signal_delay_s` before the time limit (and a preempting scheduler may
send it at any time). Every rank's handler only sets a flag; at the next log step rank 0's flag is broadcast,
all ranks write the checkpoint together (FSDP gathers from every rank), rank 0 runs `scontrol requeue`, and the
next start resumes from that checkpoint. This replaces submitit's own handler, which checkpoints on rank 0
alone. A signal counts as a timeout when it comes within signal_delay_s (+90 s: SLURM may signal up to a
minute early) of the time limit, else as a preemption; timeouts are bounded by `resources.max_requeues`,
preemptions are not.

Note: the run directory and its logs/ (where submitit keeps the pickled job, which a requeued job reruns)
must be on a file system every node sees, and so must the data shards.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import submitit
import yaml
from submitit.slurm.slurm import _make_sbatch_string

from launcher import runs
from launcher.spec import JobSpec, SpecError, apply_override, check_environment, parse_spec, read_spec_file

log = logging.getLogger("segjobs.submit")

# Seconds of slack when telling a timeout from a preemption: SLURM may send --signal up to 60 s early.
SIGNAL_SLACK_S = 90


class SubmitError(Exception):
    """The scheduler refused the job, or the run is already running (exit status 1)."""


# ---- pure: spec -> sbatch ---------------------------------------------------------------------------------
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
        "additional_parameters": dict(resources.sbatch),
    }
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    if resources.mem_gb:
        params["mem"] = f"{int(resources.mem_gb * 1024)}M"
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(resources, key):
            params[key] = getattr(resources, key)
    return params


def sbatch_script(spec: JobSpec, folder: Path, python: str = sys.executable, array_size: int | None = None) -> str:
    """The sbatch script submitit writes for this spec: every value is shell-quoted on its #SBATCH line.
    resources.setup lines are the user's own shell, copied as they are."""
    command = " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size, **slurm_parameters(spec))


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


def master_port(job_id: str) -> int:
    """A port derived from the job id: two jobs sharing a node use different ports, a requeued job the same."""
    return 20000 + zlib.crc32(job_id.encode()) % 20000


# ---- submission -------------------------------------------------------------------------------------------
@dataclass
class Submission:
    spec: JobSpec
    overrides: list[str] = field(default_factory=list)
    job_id: str = ""


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


def load_points(spec_path: str, overrides: list[str], sweeps: list[str]) -> tuple[list[Submission], Path]:
    """One resolved spec per sweep point (paths made absolute: the job may start in another folder), and the
    submitit folder: the run's logs/, or <name>-sweep/logs beside the runs of a sweep."""
    raw = read_spec_file(spec_path)
    base = parse_spec(copy.deepcopy(raw), spec_path, overrides)
    points = sweep_points(sweeps) if sweeps else [[]]
    submissions = []
    for index, point in enumerate(points):
        edited = copy.deepcopy(raw)
        for assignment in [*overrides, *point]:
            apply_override(edited, assignment, spec_path)
        if sweeps:
            edited["name"] = f"{base.name}-{index}"
            if base.output_dir is not None:
                edited["output_dir"] = str(base.output_dir.with_name(f"{base.output_dir.name}-{index}"))
        spec = absolute(parse_spec(edited, spec_path))
        check_environment(spec, spec_path)
        submissions.append(Submission(spec, [*overrides, *point]))
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
    """Two jobs must never write one run directory."""
    record = runs.read_run(run_dir)
    job = runs.latest_job(record)
    if job is None or record.get("state") not in runs.ACTIVE_STATES:
        return
    alive = (runs.local_job_alive(job["job_id"]) if job["cluster"] == "local"
             else runs.poll_slurm([job["job_id"]]).get(job["job_id"], runs.JobState("UNKNOWN")).state in runs.ACTIVE_STATES)
    if alive:
        raise SubmitError(f"{run_dir}: run {record.get('name')} is already {record['state'].lower()} as job {job['job_id']}; "
                          f"`segjobs cancel {record.get('name')}` first, or give the spec another name.")


def check_resumable(spec: JobSpec, source: str) -> None:
    """A run directory with checkpoints is resumed by the job: refuse now (on the login node) what it would refuse."""
    from launcher.train import resume_conflict

    steps = sorted((spec.run_dir / "checkpoints").glob("step_*/meta.json"))
    if steps:
        conflict = resume_conflict(json.loads(steps[-1].read_text())["resume"], spec)
        if conflict:
            raise SpecError(f"{source}: cannot resume {steps[-1].parent}: {conflict}. Use another name or output_dir for a new run.")


def make_executor(cluster: str, folder: Path, spec: JobSpec):
    resources = spec.resources
    if cluster == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=resources.max_requeues)
        executor.update_parameters(**slurm_parameters(spec))
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


def submit_all(submissions: list[Submission], folder: Path, cluster: str, source: str) -> list[Submission]:
    """Submit one job (or one array for several submissions), then record each run. Nothing is recorded when
    the scheduler refuses, and a run directory this call created is removed again."""
    from submitit.core.utils import FailedJobError

    for item in submissions:
        check_sbatch_safe(item.spec, folder)
        check_not_running(item.spec.run_dir)
        check_resumable(item.spec, source)
    created = [p for p in {folder.parent, *(s.spec.run_dir for s in submissions)} if not p.exists()]
    executor = make_executor(cluster, folder, submissions[0].spec)
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
        record_submission(item, cluster, folder)
    return submissions


def record_submission(item: Submission, cluster: str, folder: Path) -> None:
    spec = item.spec
    entry = {"job_id": item.job_id, "time": time.time(), "cluster": cluster, "log_folder": str(folder),
             "overrides": item.overrides}

    def change(record: dict) -> None:
        record.setdefault("submissions", []).append(entry)
        started = any(start["job_id"] == item.job_id for start in record.get("starts", []))
        record.update(name=spec.name, model=spec.model.name, cluster=cluster, spec=spec.model_dump(mode="json"),
                      nodes=spec.resources.nodes, gpus_per_node=spec.resources.gpus_per_node,
                      tasks=spec.resources.nodes * tasks_per_node(spec), timeout_min=spec.resources.timeout_min)
        if not started:  # a fast job may have started already
            record.update(state="SUBMITTED", error=None)

    runs.update_run(spec.run_dir, change)
    runs.register(spec.run_dir)


def submit(spec_path: str, cluster: str = "auto", overrides: list[str] = (), sweeps: list[str] = (),
           dry_run: bool = False) -> int:
    submissions, folder = load_points(spec_path, list(overrides), list(sweeps))
    if dry_run:
        for item in submissions:
            check_sbatch_safe(item.spec, folder)
        array = len(submissions) if len(submissions) > 1 else None
        print(sbatch_script(submissions[0].spec, folder, array_size=array), end="")
        return 0
    cluster = choose_cluster(cluster)
    for item in submit_all(submissions, folder, cluster, spec_path):
        print(f"{item.spec.name}\tjob {item.job_id}\t{cluster}\t{item.spec.run_dir}")
    return 0


def resume(name: str, cluster: str | None = None) -> int:
    """Resubmit a stopped, failed or cancelled run with the spec of its last submission."""
    run_dir = runs.resolve_run(name)
    record = runs.read_run(run_dir)
    if record.get("spec") is not None:
        raw = record["spec"]
    elif (run_dir / "spec.yaml").exists():
        raw = yaml.safe_load((run_dir / "spec.yaml").read_text())
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
    folder = Path(job["log_folder"]) if job else run_dir / "logs"
    item, = submit_all([Submission(spec, job["overrides"] if job else [])], folder, cluster, source)
    print(f"{spec.name}\tjob {item.job_id}\t{cluster}\t{spec.run_dir}")
    return 0


def cancel(name: str) -> int:
    run_dir = runs.resolve_run(name)
    record = runs.read_run(run_dir)
    job = runs.latest_job(record)
    if job is None or record.get("state") not in runs.ACTIVE_STATES:
        raise SubmitError(f"{run_dir}: run {record.get('name', name)} has no active job (state {record.get('state', 'unknown')}).")
    if job["cluster"] == "slurm":
        done = subprocess.run(["scancel", job["job_id"]], capture_output=True, text=True)
        if done.returncode != 0:
            raise SubmitError(f"scancel {job['job_id']} failed: {done.stderr.strip()}")
    elif runs.local_job_alive(job["job_id"]):
        os.kill(int(job["job_id"]), signal.SIGINT)  # submitit's local controller stops its tasks on SIGINT
    runs.set_fields(run_dir, state="CANCELLED")
    print(f"{record.get('name', name)}\tjob {job['job_id']}\tcancelled")
    return 0


# ---- inside the job ---------------------------------------------------------------------------------------
def distributed_environment(env) -> dict[str, str]:
    """torch.distributed's variables from submitit's view of the job (SLURM_* or the local executor's)."""
    if env.num_tasks == 1:
        return {}
    return {"MASTER_ADDR": "127.0.0.1" if env.cluster == "local" else env.hostnames[0],
            "MASTER_PORT": str(master_port(env.job_id)), "RANK": str(env.global_rank),
            "WORLD_SIZE": str(env.num_tasks), "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.num_tasks // env.num_nodes)}


class RequeueSignal:
    """SIGUSR2 -> checkpoint on every rank at the next log step, then stop so that rank 0 requeues the job.
    The handler only sets flags (it may interrupt a collective); rank 0's flags decide for all ranks."""

    def __init__(self, spec: JobSpec, timeouts_so_far: int):
        self.deadline = time.time() + 60 * spec.resources.timeout_min
        self.signal_delay_s = spec.resources.signal_delay_s
        self.timeouts_left = spec.resources.max_requeues - timeouts_so_far
        self.reason: str | None = None
        self.trainer = None
        signal.signal(signal.SIGUSR2, self._handle)

    def _handle(self, signum, frame) -> None:
        timed_out = time.time() >= self.deadline - self.signal_delay_s - SIGNAL_SLACK_S
        self.reason = "timeout" if timed_out else "preemption"
        log.warning("SIGUSR2 (%s): checkpointing at the next log step", self.reason)
        if self.trainer is not None:
            self.trainer.request_checkpoint(stop=self.requeue_allowed)

    @property
    def requeue_allowed(self) -> bool:
        return self.reason == "preemption" or self.timeouts_left > 0

    def attach(self, trainer) -> None:
        self.trainer = trainer
        if self.reason is not None:  # the signal came while the trainer was being built
            trainer.request_checkpoint(stop=self.requeue_allowed)


class TrainingJob(submitit.helpers.Checkpointable):
    """What every task of a submitted job runs: the distributed environment from SLURM, then the trainer.
    Submitit pickles it once; a requeued job runs the same pickle again and the trainer resumes.

    Note: SLURM may send SIGUSR2 up to a minute early, even while the job is still importing torch. The
    handler is installed first thing; before that (while submitit unpickles the job) submitit's own handler
    calls `checkpoint()`, inherited from Checkpointable: it requeues the job unchanged, and the next start
    resumes from the latest checkpoint."""

    def __init__(self, spec_yaml: str, source: str):
        self.spec_yaml, self.source = spec_yaml, source

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        spec = parse_spec(yaml.safe_load(self.spec_yaml), self.source)
        main = env.global_rank == 0
        # The budget is per submission: `segjobs resume` starts a new job with max_requeues again.
        timeouts = sum(1 for r in runs.read_run(spec.run_dir).get("requeues", [])
                       if r["reason"] == "timeout" and r["job_id"] == env.job_id)
        requeue = RequeueSignal(spec, timeouts)
        os.environ.update(distributed_environment(env))
        handler = logging.StreamHandler(sys.stdout)  # submitit logs to its own handler: no root handler here
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger = logging.getLogger("segjobs")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        # torch would use every core of the node, whatever the job was given
        threads = str(min(int(os.environ.get("SLURM_CPUS_PER_TASK", spec.resources.cpus_per_task)), os.cpu_count() or 1))
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        import torch

        from launcher import train

        torch.set_num_threads(int(threads))

        try:
            result = train.run_spec(spec, self.source, job_id=env.job_id, cluster=env.cluster,
                                    restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)), on_trainer=requeue.attach)
        except Exception as exc:  # also before the trainer exists (a refused resume, missing data)
            if main:
                runs.set_fields(spec.run_dir, state="FAILED", error=f"{type(exc).__name__}: {exc}")
            raise
        if result["stopped"]:
            if main:
                runs.append(spec.run_dir, "requeues", {"job_id": env.job_id, "time": time.time(), "reason": requeue.reason,
                                                       "step": result["step"]}, state="REQUEUED")
                log.info("requeueing job %s after a %s at step %d", env.job_id, requeue.reason, result["step"])
                env._requeue(requeue.timeouts_left)  # scontrol requeue (SLURM) or the local executor's exit code
            sys.exit(0)  # not a result: the requeued job runs again
        return {k: v for k, v in result.items() if k != "main"}
