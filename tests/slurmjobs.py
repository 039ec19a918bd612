"""Helpers of the tests in tests/slurm/: submit a spec to the minicluster, wait for a run's state, kill a node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from launcher import runs
from launcher.cli import main as segjobs
from launcher.cluster.job import TrainingJob
from launcher.cluster import queue
from launcher.commands import status

REPO = Path(__file__).resolve().parents[1]
CPU_JOB = {"gpus_per_node": 0, "cpus_per_task": 1, "timeout_min": 20}
MINICLUSTER_DIR = Path(os.environ.get("MINICLUSTER_DIR", "/tmp/segjobs-minicluster"))


def submit(spec: Path, *args: str, capsys) -> tuple[str, Path]:
    capsys.readouterr()
    assert segjobs(["submit", str(spec), "--cluster", "slurm", *args]) == 0, capsys.readouterr().err
    name, job, cluster, run_dir = capsys.readouterr().out.strip().splitlines()[-1].split("\t")
    assert cluster == "slurm"
    return job.removeprefix("job "), Path(run_dir)


def wait_for(run_dir: Path, states: set[str], timeout: float = 300, until=None, release_after: float = 2) -> status.Row:
    """Poll as `segjobs status` does; a job waiting after a requeue (BeginTime, ~120 s) is released once it has
    waited `release_after` s. Not sooner: slurmd refuses a restart whose credential bears the same second as the
    requeue ("Job already killed, do not launch batch job") and the job ends FAILED; and after a node died, the
    old srun cancels step 0 of its job once it gives up on that node (12 s later), which would be the new start's."""
    deadline = time.monotonic() + timeout
    waiting_since: dict[tuple, float] = {}
    while time.monotonic() < deadline:
        record = runs.read_run(run_dir)
        job = runs.latest_job(record)["job_id"]
        row = status.build_row(run_dir, queue.poll_slurm([job]), time.time())
        if row.reason == "BeginTime":
            start = (job, len(record.get("starts", [])))
            since = waiting_since.setdefault(start, time.monotonic())
            if since is not None and time.monotonic() - since > release_after:
                waiting_since[start] = None
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        if row.state in states and (until is None or until(row)):
            return row
        time.sleep(0.5)
    raise AssertionError(f"{run_dir}: {row.state} after {timeout}s; run.json {json.dumps(runs.read_run(run_dir))[:2000]}")


def kill_node(node: str, job: str) -> list[int]:
    """A node of the minicluster dies: SIGKILL to its slurmd, the job's task processes on it and their
    slurmstepd. Returns the task pids."""
    tasks = []
    for proc in Path("/proc").iterdir():
        try:
            environ = set((proc / "environ").read_bytes().split(b"\0")) if proc.name.isdigit() else set()
        except OSError:
            continue
        if {f"SLURM_JOB_ID={job}".encode(), f"SLURMD_NODENAME={node}".encode()} <= environ:
            tasks.append(int(proc.name))
    steps = set()
    for pid in tasks:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        if Path(f"/proc/{parent}/comm").read_text().startswith("slurmstepd"):
            steps.add(parent)
    slurmd = int((MINICLUSTER_DIR / "run" / f"slurmd.{node}.pid").read_text())
    for pid in [slurmd, *steps, *tasks]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tasks


def start_node(node: str) -> None:
    subprocess.run(["slurmd", "-N", node], check=True)


HANG_AT_STEP = 12


class HangingJob(TrainingJob):
    """The job segjobs submits, but in its first start rank 1 sleeps inside step HANG_AT_STEP + 1 (a hung rank:
    a stuck file system read, a deadlocked loader). Submitted in place of TrainingJob (monkeypatch); the job
    unpickles it from this module."""

    def prepare(self, trainer, requeue, spec, env) -> None:
        super().prepare(trainer, requeue, spec, env)
        if env.global_rank != 1 or int(os.environ.get("SLURM_RESTART_COUNT", 0)) != 0:
            return
        train_step = trainer.task.train_step

        def hanging_step(batch, context):
            if context.step == HANG_AT_STEP:
                time.sleep(3600)
            return train_step(batch, context)

        trainer.task.train_step = hanging_step
