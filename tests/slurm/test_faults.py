"""Faults a real cluster throws, against the minicluster: a node that dies, a rank that hangs, a time limit
changed while the job runs, no accounting, a job id that comes back. Every recovered run is compared with an
uninterrupted one, loss by loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import runs
from launcher.cli import main as segjobs
from launcher.commands import status
from tests.jobspecs import losses, write_spec
from tests.slurmjobs import CPU_JOB, HANG_AT_STEP, MINICLUSTER_DIR, REPO, HangingJob, kill_node, start_node, submit, wait_for

pytestmark = [pytest.mark.usefixtures("cluster"), pytest.mark.xdist_group("slurm")]
TWO_RANKS = dict(data={"batch_size": 2}, train={"max_steps": 60, "log_every": 1, "collective_timeout_min": 1},
                 checkpoint={"every_steps": 10})


@pytest.fixture(scope="module")
def two_rank_losses(shard_root, tmp_path_factory):
    """The losses of TWO_RANKS trained without interruption by two processes (torchrun on this machine)."""
    folder = tmp_path_factory.mktemp("two_ranks")
    spec = write_spec(folder, shard_root, "segmenter", name="uninterrupted", **TWO_RANKS)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "launcher.train", str(spec)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return losses(folder / "uninterrupted")


def test_a_dead_node_is_a_fault_requeued_and_resumed_when_the_node_is_back(shard_root, tmp_path, capsys, two_rank_losses):
    spec = write_spec(tmp_path, shard_root, "segmenter", name="node_dies", resources={**CPU_JOB, "nodes": 2}, **TWO_RANKS)
    job, run_dir = submit(spec, capsys=capsys)
    wait_for(run_dir, {"RUNNING"}, until=lambda row: row.step >= 14)
    try:
        assert kill_node("n2", job), "rank 1 runs on n2"
        deadline = time.monotonic() + 120  # SLURM holds the job COMPLETING while n2 is down: read run.json
        while not runs.read_run(run_dir).get("faults") and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        start_node("n2")
    fault, = runs.read_run(run_dir)["faults"]
    assert (fault["kind"], fault["rank"], fault["requeued"]) == ("rank lost", 0, True), fault
    assert fault["step"] >= 14 and "rank was lost" in fault["detail"]
    assert wait_for(run_dir, {"COMPLETED", "FAILED"}, timeout=400, release_after=20).state == "COMPLETED"
    record = runs.read_run(run_dir)
    assert [s["restart_count"] for s in record["starts"]] == [0, 1] and not record.get("requeues")
    assert losses(run_dir) == pytest.approx(two_rank_losses, rel=1e-6) and len(two_rank_losses) == 60


def test_a_hung_rank_dumps_every_ranks_stacks_and_is_requeued(shard_root, tmp_path, capsys, monkeypatch, two_rank_losses):
    monkeypatch.setattr("launcher.cluster.submit.TrainingJob", HangingJob)
    train = {**TWO_RANKS["train"], "stall_timeout_min": 0.25}
    spec = write_spec(tmp_path, shard_root, "segmenter", name="hangs", resources={**CPU_JOB, "nodes": 2},
                      **{**TWO_RANKS, "train": train})
    job, run_dir = submit(spec, capsys=capsys)
    row = wait_for(run_dir, {"REQUEUED", "FAILED"}, until=lambda row: row.faults == 1, timeout=180)
    assert row.state == "REQUEUED" and f"stalled at step {HANG_AT_STEP}" in row.error, row
    assert str(run_dir / "logs" / f"{job}_<rank>_log.err") in row.error
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(status.table([row]))
    shown = console.export_text()
    assert f"stalled at step {HANG_AT_STEP}" in shown and "_log.err" in shown and "1 faults" in shown, shown
    assert wait_for(run_dir, {"COMPLETED", "FAILED"}, timeout=400).state == "COMPLETED"
    for rank in (0, 1):
        stacks = (run_dir / "logs" / f"{job}_{rank}_log.err").read_text()
        assert "most recent call first" in stacks, f"rank {rank} wrote its stacks"
    assert "hanging_step" in (run_dir / "logs" / f"{job}_1_log.err").read_text(), "the hung rank's stack shows where"
    record = runs.read_run(run_dir)
    assert record["faults"][0]["kind"] == "stall" and record["faults"][0]["step"] == HANG_AT_STEP
    assert losses(run_dir) == pytest.approx(two_rank_losses, rel=1e-6)


def test_a_shortened_time_limit_is_read_from_slurm_and_requeued_before_it_without_a_signal(shard_root, tmp_path, capsys):
    """An administrator shortens the running job's limit to 1 minute. SLURM's SIGUSR2 is replaced by SIGURG here
    (which Python ignores), so only the end time rank 0 reads from squeue makes the job checkpoint and requeue,
    signal_delay_s before the new end, as a time limit (not a preemption)."""
    sections = dict(train={"max_steps": 1000, "log_every": 10}, checkpoint={"every_steps": 100000})
    limited = {**CPU_JOB, "timeout_min": 3, "signal_delay_s": 30, "sbatch": {"signal": "URG@30"}}
    job, run_dir = submit(write_spec(tmp_path, shard_root, "segmenter", name="shortened", resources=limited, **sections),
                          capsys=capsys)
    whole_job, whole = submit(write_spec(tmp_path, shard_root, "segmenter", name="whole", resources=CPU_JOB, **sections),
                              capsys=capsys)
    wait_for(run_dir, {"RUNNING"}, until=lambda row: row.step >= 10)
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=1"], check=True)
    row = wait_for(run_dir, {"COMPLETED", "FAILED", "TIMEOUT"}, timeout=400)
    record = runs.read_run(run_dir)
    assert row.state == "COMPLETED", record
    assert record["requeues"] and {r["reason"] for r in record["requeues"]} == {"timeout"}, record["requeues"]
    logs = (run_dir / "logs" / f"{job}_0_log.out").read_text()
    assert "the job ends at" in logs and "SIGUSR2" not in logs
    assert wait_for(whole, {"COMPLETED", "FAILED"}).state == "COMPLETED"
    assert losses(run_dir) == losses(whole) and len(losses(whole)) == 100


@pytest.fixture
def no_accounting():
    """slurmdbd stopped for the test (sacct fails; slurmctld keeps the records for later), started again after."""
    pid = int((MINICLUSTER_DIR / "run" / "slurmdbd.pid").read_text())
    os.kill(pid, 15)
    deadline = time.monotonic() + 20
    while subprocess.run(["sacct", "-n", "-X"], capture_output=True).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        yield
    finally:
        subprocess.run(["slurmdbd"], check=True)
        while subprocess.run(["sacct", "-n", "-X"], capture_output=True).returncode != 0 and time.monotonic() < deadline + 30:
            time.sleep(0.2)


def test_without_accounting_status_cancel_and_resume_work_from_squeue_and_say_so_once(shard_root, tmp_path, capsys,
                                                                                    no_accounting):
    spec = write_spec(tmp_path, shard_root, "segmenter", name="no_dbd", train={"max_steps": 100000},
                      resources=CPU_JOB)
    job, run_dir = submit(spec, capsys=capsys)
    wait_for(run_dir, {"RUNNING"}, until=lambda row: row.step >= 3)
    capsys.readouterr()
    assert segjobs(["status", "no_dbd", "--all"]) == 0
    shown = capsys.readouterr().out
    assert "RUNNING" in shown and shown.count("sacct did not answer") == 1, shown
    assert segjobs(["cancel", "no_dbd"]) == 0
    assert wait_for(run_dir, {"CANCELLED", "STOPPED"}).state == "CANCELLED"
    cancelled_at = max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert segjobs(["resume", "no_dbd"]) == 0, capsys.readouterr().err
    wait_for(run_dir, {"RUNNING"}, until=lambda row: row.step > cancelled_at)
    assert segjobs(["cancel", "no_dbd"]) == 0
    assert wait_for(run_dir, {"CANCELLED", "STOPPED"}).state == "CANCELLED"
    capsys.readouterr()
    assert segjobs(["status", "--json", "no_dbd"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["state"] == "CANCELLED" and "sacct did not answer" in captured.err
