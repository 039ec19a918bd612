"""segjobs against a real SLURM (slurmctld, two slurmd nodes, slurmdbd for sacct): submit, preemption and
time-limit requeues with exact resume, two nodes, failures, cancel, sweeps, and the scheduler's refusals."""

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
from launcher.cluster import queue
from launcher.cluster.sbatch import sbatch_script
from launcher.commands import status
from launcher.spec import load_spec
from tests.jobspecs import losses, write_spec
from tests.slurmjobs import CPU_JOB, REPO, submit, wait_for

pytestmark = [pytest.mark.usefixtures("cluster"), pytest.mark.xdist_group("slurm")]


def test_submit_runs_to_completion_and_status_shows_it(shard_root, tmp_path, capsys):
    spec = write_spec(tmp_path, shard_root, "segmenter", name="first", train={"max_steps": 6, "log_every": 2},
                      resources=CPU_JOB)
    hostile = tmp_path / "it's a \"run\""  # quotes and spaces in every path of the sbatch script
    job, run_dir = submit(spec, "--set", f"output_dir={json.dumps(str(hostile))}", capsys=capsys)
    assert run_dir == hostile
    row = wait_for(run_dir, {"COMPLETED", "FAILED", "CANCELLED"})
    assert (row.state, row.step, row.total_steps, row.job_id) == ("COMPLETED", 6, 6, job)
    assert sorted(losses(run_dir)) == [2, 4, 6] and (run_dir / "checkpoints" / "step_00000006").is_dir()
    submitted = (run_dir / "logs" / f"{job}_submission.sh").read_text()
    spec_now = load_spec(spec, [f"output_dir={json.dumps(str(hostile))}"])
    spec_now.data.train, spec_now.data.val = spec_now.data.train.absolute(), spec_now.data.val.absolute()
    assert submitted == sbatch_script(spec_now, run_dir / "logs"), "--dry-run prints exactly what is submitted"

    assert segjobs(["status", "first", "--json"]) == 0
    shown, = json.loads(capsys.readouterr().out)
    assert (shown["state"], shown["job_id"], shown["limit_s"]) == ("COMPLETED", job, 20 * 60)
    assert segjobs(["status"]) == 0
    assert "COMPLETED" in capsys.readouterr().out


def test_preempted_job_requeues_and_ends_with_the_losses_of_an_uninterrupted_run(shard_root, tmp_path, capsys):
    sections = dict(train={"max_steps": 120, "log_every": 1}, checkpoint={"every_steps": 1000}, resources=CPU_JOB)
    whole_job, whole = submit(write_spec(tmp_path, shard_root, "segmenter", name="whole", **sections), capsys=capsys)
    job, run_dir = submit(write_spec(tmp_path, shard_root, "segmenter", name="preempted", **sections), capsys=capsys)
    wait_for(run_dir, {"RUNNING"}, until=lambda row: row.step >= 20)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    row = wait_for(run_dir, {"COMPLETED", "FAILED"}, timeout=400)
    assert row.state == "COMPLETED" and row.requeues == 1
    record = runs.read_run(run_dir)
    assert [r["reason"] for r in record["requeues"]] == ["preemption"]
    assert [s["restart_count"] for s in record["starts"]] == [0, 1]
    assert len(list((run_dir / "checkpoints").glob("step_*"))) >= 2, "the signal wrote a checkpoint"
    assert wait_for(whole, {"COMPLETED", "FAILED"}).state == "COMPLETED"
    assert losses(run_dir) == losses(whole) and len(losses(whole)) == 120
    history = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job, "--format=State"], capture_output=True, text=True).stdout
    assert history.split() == ["REQUEUED", "COMPLETED"]


def test_time_limit_checkpoints_requeues_and_finishes(shard_root, tmp_path, capsys):
    # The signal comes 30 s into each start's minute, so a start trains for 20-25 s after its imports: 1,000 steps
    # outlast one start even at the fastest speed seen here (~30 steps/s); at 18 steps/s they take four starts.
    spec = write_spec(tmp_path, shard_root, "segmenter", name="limited", train={"max_steps": 1000, "log_every": 10},
                      checkpoint={"every_steps": 100000}, resources={**CPU_JOB, "timeout_min": 1, "signal_delay_s": 30,
                                                                     "max_requeues": 20})
    job, run_dir = submit(spec, capsys=capsys)
    row = wait_for(run_dir, {"COMPLETED", "FAILED", "TIMEOUT"}, timeout=900)
    record = runs.read_run(run_dir)
    assert row.state == "COMPLETED" and row.step == 1000, record
    timeouts = [r for r in record["requeues"] if r["reason"] == "timeout"]
    assert 1 <= len(timeouts) == len(record["requeues"]) <= 20
    assert [s["restart_count"] for s in record["starts"]] == list(range(len(timeouts) + 1))
    steps = [r["step"] for r in timeouts]
    assert steps == sorted(steps) and steps[0] > 0, "every start progressed from the previous checkpoint"


def test_two_nodes_train_as_one_world_like_torchrun(shard_root, tmp_path, capsys):
    sections = dict(data={"batch_size": 2}, train={"max_steps": 6, "log_every": 1})
    spec = write_spec(tmp_path, shard_root, "segmenter", name="two_nodes", resources={**CPU_JOB, "nodes": 2}, **sections)
    job, run_dir = submit(spec, capsys=capsys)
    reference = write_spec(tmp_path, shard_root, "segmenter", name="torchrun", **sections)
    local = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "launcher.train", str(reference)], cwd=REPO, capture_output=True, text=True,
                           timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert local.returncode == 0, local.stderr[-3000:]
    row = wait_for(run_dir, {"COMPLETED", "FAILED"})
    assert row.state == "COMPLETED" and row.nodes == 2
    assert runs.read_run(run_dir)["starts"][0]["world_size"] == 2
    for rank in (0, 1):
        log = (run_dir / "logs" / f"{job}_{rank}_log.out").read_text()
        assert f"global_rank={rank}(2)" in log and f"node={rank}(2)" in log
    assert losses(run_dir) == pytest.approx(losses(tmp_path / "torchrun"), rel=1e-6)


def test_a_failing_job_is_failed_not_requeued_and_cancel_cancels(shard_copy, tmp_path, capsys):
    spec = write_spec(tmp_path, shard_copy, "segmenter", name="broken", resources=CPU_JOB)
    first = sorted((shard_copy / "training").glob("*.tar"))[0]
    first.write_bytes(b"\x00garbage" * (first.stat().st_size // 8))
    job, run_dir = submit(spec, capsys=capsys)
    row = wait_for(run_dir, {"FAILED", "COMPLETED"})
    record = runs.read_run(run_dir)
    assert row.state == "FAILED" and row.requeues == 0 and first.name in record["error"], record

    endless = write_spec(tmp_path, shard_copy, "segmenter", name="endless", train={"max_steps": 100000},
                         data={"train": str(shard_copy / "validation")}, resources=CPU_JOB)
    job, run_dir = submit(endless, capsys=capsys)
    wait_for(run_dir, {"RUNNING"}, until=lambda row: row.step >= 5)
    assert segjobs(["cancel", "endless"]) == 0  # scancel: SIGTERM, then SIGKILL after KillWait
    assert wait_for(run_dir, {"CANCELLED", "COMPLETED", "FAILED"}).state == "CANCELLED"
    # SLURM says CANCELLED at once; the job writes its checkpoint within KillWait (10 s here).
    deadline = time.monotonic() + 30
    while not list((run_dir / "checkpoints").glob("step_*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    cancelled_at = max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert cancelled_at >= 5, "SIGTERM wrote a checkpoint (no periodic one comes before step 1000)"
    assert segjobs(["resume", "endless"]) == 0
    wait_for(run_dir, {"RUNNING"}, until=lambda row: row.step > cancelled_at)
    assert segjobs(["cancel", "endless"]) == 0
    assert wait_for(run_dir, {"CANCELLED", "COMPLETED", "FAILED"}).state == "CANCELLED"


def test_sweep_submits_one_array_of_runs(shard_root, tmp_path, capsys):
    spec = write_spec(tmp_path, shard_root, "segmenter", name="sweep", train={"max_steps": 4, "log_every": 2}, resources=CPU_JOB)
    capsys.readouterr()
    assert segjobs(["submit", str(spec), "--cluster", "slurm", "--sweep", "optim.lr=0.01,0.001,0.0001"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [line[0] for line in lines] == ["sweep-0", "sweep-1", "sweep-2"]
    array_ids = {line[1].removeprefix("job ").split("_")[0] for line in lines}
    assert len(array_ids) == 1 and [line[1].split("_")[1] for line in lines] == ["0", "1", "2"]
    for (name, _, _, run_dir), lr in zip(lines, (0.01, 0.001, 0.0001)):
        assert wait_for(Path(run_dir), {"COMPLETED", "FAILED"}).state == "COMPLETED", name
        assert runs.read_run(Path(run_dir))["spec"]["optim"]["lr"] == lr
    assert segjobs(["status", "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} >= {"sweep-0", "sweep-1", "sweep-2"}


@pytest.mark.parametrize("change, slurm_says, hint", [
    ({"partition": "nosuch"}, "invalid partition", "resources.partition"),
    ({"gpus_per_node": 1}, "gres", "resources.gpus_per_node"),
    ({"partition": "short", "timeout_min": 5}, "time limit", "resources.timeout_min"),
    ({"nodes": 3}, "node count", "resources.nodes"),
])
def test_refusals_exit_1_with_slurms_message_and_record_nothing(change, slurm_says, hint, shard_root, tmp_path, capsys):
    spec = write_spec(tmp_path, shard_root, "segmenter", name="refused", resources={**CPU_JOB, **change})
    assert segjobs(["submit", str(spec), "--cluster", "slurm"]) == 1
    err = capsys.readouterr().err
    assert slurm_says in err.lower() and hint in err, err
    assert not (tmp_path / "refused").exists() and runs.indexed_runs() == []


def test_sigterm_preemption_checkpoints_requeues_and_ends_with_the_uninterrupted_losses(shard_root, tmp_path, capsys):
    """A higher-priority job takes the node of a job in `lowprio` (PreemptMode=REQUEUE, GraceTime=30): SLURM
    sends SIGTERM, every rank checkpoints at the next step, the job waits out the grace time, SLURM kills and
    requeues it, and it resumes from that checkpoint (no periodic checkpoint in between)."""
    sections = dict(train={"max_steps": 150, "log_every": 1}, checkpoint={"every_steps": 1000})
    whole_job, whole = submit(write_spec(tmp_path, shard_root, "segmenter", name="whole", resources=CPU_JOB, **sections),
                              capsys=capsys)
    low = {**CPU_JOB, "partition": "lowprio", "sbatch": {"nodelist": "n1"}}
    job, run_dir = submit(write_spec(tmp_path, shard_root, "segmenter", name="preempted", resources=low, **sections),
                          capsys=capsys)
    wait_for(run_dir, {"RUNNING"}, until=lambda row: row.step >= 20)
    subprocess.run(["sbatch", "-p", "highprio", "-w", "n1", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 5"],
                   check=True, capture_output=True)
    row = wait_for(run_dir, {"COMPLETED", "FAILED"}, timeout=400)
    assert row.state == "COMPLETED"
    saved = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*")]
    assert min(saved) >= 20 and len(saved) >= 2, "SIGTERM wrote a checkpoint, which the next start resumed from"
    record = runs.read_run(run_dir)
    assert [s["restart_count"] for s in record["starts"]] == [0, 1] and not record.get("requeues"), "SLURM requeued it"
    assert wait_for(whole, {"COMPLETED", "FAILED"}).state == "COMPLETED"
    assert losses(run_dir) == losses(whole) and len(losses(whole)) == 150


def test_a_sweep_over_max_array_size_goes_as_throttled_arrays_recorded_in_sweep_json(shard_root, tmp_path, capsys,
                                                                                    monkeypatch):
    monkeypatch.setattr("launcher.cluster.submit.max_array_size", lambda: 2)  # the cluster's MaxArraySize: 2
    spec = write_spec(tmp_path, shard_root, "segmenter", name="wide", train={"max_steps": 2, "log_every": 1}, resources=CPU_JOB)
    capsys.readouterr()
    assert segjobs(["submit", str(spec), "--cluster", "slurm", "--sweep", "seed=1,2,3", "--max-parallel", "1"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    arrays = [line[1].removeprefix("job ").split("_")[0] for line in lines]
    assert arrays[0] == arrays[1] != arrays[2], "three points in arrays of at most two"
    shown = subprocess.run(["scontrol", "show", "job", arrays[0]], capture_output=True, text=True).stdout
    assert "ArrayTaskThrottle=1" in shown, shown
    sweep = json.loads((tmp_path / "wide-sweep" / "sweep.json").read_text())
    assert sweep["axes"] == {"seed": ["1", "2", "3"]}
    assert [p["job_id"] for p in sweep["points"]] == [line[1].removeprefix("job ") for line in lines]
    for point in sweep["points"]:
        assert wait_for(Path(point["run_dir"]), {"COMPLETED", "FAILED"}).state == "COMPLETED", point
