"""Submission without a SLURM cluster: the sbatch script (golden file, hostile names), sweeps, the local executor
end to end (submit, status, logs, cancel, resume), the status table. tests/slurm/ runs the real cluster."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import runs
from launcher.cli import main as segjobs
from launcher.cluster import queue
from launcher.cluster.sbatch import sbatch_script
from launcher.cluster.submit import sweep_points
from launcher.commands import status
from launcher.spec import parse_spec
from tests.jobspecs import losses, write_spec

GOLDEN = Path(__file__).parent / "golden"
HOSTILE_DIR = Path("/runs/it's a \"run\"; echo injected/logs")
HOSTILE_SPEC = {
    "name": "golden", "model": {"name": "segmenter_t16_linear"}, "data": {"train": "/data/training"},
    "train": {"max_steps": 10},
    "resources": {"nodes": 2, "gpus_per_node": 4, "cpus_per_task": 10, "mem_gb": 64, "timeout_min": 120,
                  "partition": "gpu'; echo injected", "account": 'lab "x" $(echo injected)', "qos": "high",
                  "setup": ["module load cuda/12.1", "source '/opt/my env/bin/activate'"],
                  "sbatch": {"mail-type": "END,FAIL", "comment": "`echo injected`"}},
}


def hostile_script(python: str = "/opt/my env/bin/python") -> str:
    return sbatch_script(parse_spec(json.loads(json.dumps(HOSTILE_SPEC)), "hostile.yaml"), HOSTILE_DIR, python=python)


def test_sbatch_script_matches_the_golden_file():
    """The generated script, hostile names included; to accept a deliberate change, rewrite the golden file
    from hostile_script() and review the diff."""
    assert hostile_script() == (GOLDEN / "sbatch_hostile.sh").read_text()


def test_hostile_names_reach_srun_intact_and_run_nothing(tmp_path):
    """Run the script under bash with a fake srun that records its arguments: every path and name arrives as
    one argument, and nothing in them executes."""
    fake_srun = tmp_path / "bin" / "srun"
    fake_srun.parent.mkdir()
    fake_srun.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake_srun.chmod(fake_srun.stat().st_mode | stat.S_IEXEC)
    script = hostile_script().replace("module load cuda/12.1", "true").replace("source '/opt/my env/bin/activate'", "true")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PATH": f"{fake_srun.parent}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1, "only srun printed: no injected command ran"
    assert json.loads(done.stdout) == ["--unbuffered", "--output", f"{HOSTILE_DIR}/%j_%t_log.out", "--error",
                                       f"{HOSTILE_DIR}/%j_%t_log.err", "/opt/my env/bin/python", "-u", "-m",
                                       "submitit.core._submit", str(HOSTILE_DIR)]


@pytest.mark.parametrize("key, value", [("partition", "gpu\necho injected"), ("sbatch", {"x\necho injected": "1"}),
                                        ("sbatch", {"comment": "a\rb"})])
def test_control_characters_cannot_reach_the_script(key, value, shard_root, tmp_path, capsys):
    spec = write_spec(tmp_path, shard_root, "segmenter", name="ctl", resources={key: value, "gpus_per_node": 0})
    assert segjobs(["submit", str(spec), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "cannot go into an sbatch script" in err or "not an sbatch option name" in err


def test_sweep_is_one_array_with_a_run_per_point(shard_root, tmp_path, capsys):
    assert sweep_points(["optim.lr=0.1,0.01", "seed=0,1,2"]) == [
        ["optim.lr=0.1", f"seed={s}"] for s in range(3)] + [["optim.lr=0.01", f"seed={s}"] for s in range(3)]
    spec = write_spec(tmp_path, shard_root, "segmenter", name="sw", resources={"gpus_per_node": 0})
    assert segjobs(["submit", str(spec), "--dry-run", "--sweep", "optim.lr=0.1,0.01,0.001"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-2%3" in script and f"{tmp_path / 'sw-sweep' / 'logs'}/%A_%a_0_log.out" in script
    assert not (tmp_path / "sw-sweep").exists(), "a dry run writes nothing"
    assert segjobs(["submit", str(spec), "--dry-run", "--sweep", "optim.lr"]) == 2
    capsys.readouterr()
    assert segjobs(["submit", str(spec), "--dry-run", "--sweep", "optim.lr=0.1,0.01,0.001", "--max-parallel", "2"]) == 0
    assert "#SBATCH --array=0-2%2" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # argparse's usage error
        segjobs(["submit", str(spec), "--dry-run", "--max-parallel", "0"])
    assert refused.value.code == 2 and "--max-parallel" in capsys.readouterr().err


def wait_for_state(run_dir: Path, states: set[str], timeout: float = 240) -> status.Row:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = status.build_row(run_dir, {}, time.time())
        if row.state in states:
            return row
        time.sleep(0.5)
    raise AssertionError(f"{run_dir} still {row.state} after {timeout}s; run.json: {runs.read_run(run_dir)}")


def test_local_executor_runs_a_spec_end_to_end(shard_root, tmp_path, capsys):
    spec = write_spec(tmp_path, shard_root, "segmenter", name="local", train={"max_steps": 6, "log_every": 2},
                      resources={"gpus_per_node": 0, "timeout_min": 10})
    assert segjobs(["submit", str(spec), "--cluster", "local"]) == 0
    name, job, cluster, run_dir = capsys.readouterr().out.strip().split("\t")
    assert (name, cluster, Path(run_dir)) == ("local", "local", tmp_path / "local")
    row = wait_for_state(tmp_path / "local", {"COMPLETED", "FAILED", "STOPPED"})
    assert row.state == "COMPLETED" and row.step == 6 and row.total_steps == 6, runs.read_run(tmp_path / "local")
    assert sorted(losses(tmp_path / "local")) == [2, 4, 6]
    assert (tmp_path / "local" / "checkpoints" / "step_00000006").is_dir()
    record = runs.read_run(tmp_path / "local")
    assert record["submissions"][0]["job_id"] == job.removeprefix("job ") and len(record["starts"]) == 1
    assert runs.indexed_runs() == [tmp_path / "local"], "submitted runs are found by `segjobs status`"

    assert segjobs(["status", "--json"]) == 0
    shown, = json.loads(capsys.readouterr().out)
    assert (shown["name"], shown["state"], shown["step"], shown["cluster"]) == ("local", "COMPLETED", 6, "local")
    assert segjobs(["logs", "local"]) == 0
    assert "step 6/6" in capsys.readouterr().out
    assert segjobs(["resume", "local"]) == 1
    assert "completed; nothing to resume" in capsys.readouterr().err


def test_cancel_then_resume_continues_from_the_checkpoint(shard_root, tmp_path, capsys):
    spec = write_spec(tmp_path, shard_root, "segmenter", name="long", train={"max_steps": 100000, "log_every": 5},
                      checkpoint={"every_steps": 5}, resources={"gpus_per_node": 0})
    assert segjobs(["submit", str(spec), "--cluster", "local"]) == 0
    run_dir = tmp_path / "long"
    wait_for_state(run_dir, {"RUNNING"})
    deadline = time.monotonic() + 120
    while not list((run_dir / "checkpoints").glob("step_*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert segjobs(["submit", str(spec), "--cluster", "local"]) == 1
    assert "already running" in capsys.readouterr().err, "two jobs never write one run directory"
    assert segjobs(["cancel", "long"]) == 0
    assert wait_for_state(run_dir, {"CANCELLED"}).state == "CANCELLED"
    job = runs.latest_job(runs.read_run(run_dir))
    deadline = time.monotonic() + 30
    while queue.local_job_alive(job) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not queue.local_job_alive(job)
    saved = max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*"))

    capsys.readouterr()
    assert segjobs(["resume", str(run_dir)]) == 0
    wait_for_state(run_dir, {"RUNNING"})
    deadline = time.monotonic() + 120
    while len(runs.read_run(run_dir).get("starts", [])) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert segjobs(["cancel", "long"]) == 0
    log = (run_dir / "logs" / f"{runs.latest_job(runs.read_run(run_dir))['job_id']}_0_log.out").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{saved:08d}'}" in log


def test_submit_refuses_without_sbatch(shard_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no sinfo
    spec = write_spec(tmp_path, shard_root, "segmenter", name="nosl", resources={"gpus_per_node": 0})
    assert segjobs(["submit", str(spec), "--cluster", "slurm"]) == 1
    assert "sbatch is not on PATH" in capsys.readouterr().err
    assert not (tmp_path / "nosl").exists()


def test_unknown_run_names_exit_2(capsys):
    assert segjobs(["logs", "no_such_run"]) == 2
    assert "no run named 'no_such_run'" in capsys.readouterr().err


# ---- the status table ---------------------------------------------------------------------------------------
def fake_run(root: Path, name: str, state: str, job_id: str, cluster: str = "slurm", step: int = 50) -> Path:
    run_dir = root / name
    (run_dir / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    lines = [{"step": s, "epoch": s // 20, "loss": 1.0 / s, "lr": 0.1, "samples_per_s": 64.0} for s in range(10, step + 1, 10)]
    lines.append({"step": step, "epoch": step // 20, "eval": {"miou": 0.5}})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    record = dict(name=name, model="dino_vits8", state=state, nodes=2, gpus_per_node=8, total_steps=100, global_batch=64,
                  timeout_min=60, submissions=[{"job_id": job_id, "cluster": cluster, "time": 0,
                                                "log_folder": str(run_dir / "logs"), "overrides": []}])
    (run_dir / "run.json").write_text(json.dumps(record))
    return run_dir


def sacct(*lines: str) -> queue.SlurmView:
    """What `sacct -X -D` prints, from JobID|State|Reason|ElapsedRaw|TimelimitRaw|NNodes lines."""
    return queue.SlurmView(queue.parse_sacct("".join(f"{line}|2026-11-27T10:00:00|job\n" for line in lines)))


def test_status_rows_combine_sacct_run_json_and_metrics(tmp_path):
    running = fake_run(tmp_path, "a", "RUNNING", "101")
    forgotten = fake_run(tmp_path, "b", "TIMEOUT", "102")
    requeued = fake_run(tmp_path, "c", "REQUEUED", "103")
    polled = sacct("101|RUNNING|None|754|60|2", "103|PENDING|BeginTime|0|60|2", "102_junk")
    now = time.time()
    row = status.build_row(running, polled, now)
    assert (row.state, row.step, row.loss, row.elapsed_s, row.limit_s, row.nodes) == ("RUNNING", 50, 1 / 50, 754, 3600, 2)
    assert row.eta_s == pytest.approx(50 * 64 / 64.0) and row.checkpoint_age_s < 60
    assert status.build_row(forgotten, polled, now).state == "TIMEOUT", "a job gone from sacct keeps its last state"
    assert status.build_row(running, queue.SlurmView(), now).state == "RUNNING", "SLURM silent: the state recorded last"
    waiting = status.build_row(requeued, polled, now)
    assert (waiting.state, waiting.reason) == ("REQUEUED", "BeginTime")

    finished = sacct("101|CANCELLED by 0|None|800|60|2")
    assert status.build_row(running, finished, now).state == "CANCELLED"
    assert runs.read_run(running)["state"] == "CANCELLED", "SLURM's final state is remembered in run.json"

    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(status.table([status.build_row(d, polled, now) for d in (running, forgotten, requeued)]))
    text = console.export_text()
    assert "REQUEUED (BeginTime)" in text and "50/100 ep 2" in text and "12:34 / 1:00:00" in text


def test_status_reads_only_the_tail_of_long_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 100001)))
    assert status.last_training_record(path) == {"step": 100000, "loss": 100000.0}
    assert status.last_training_record(tmp_path / "none.jsonl") is None


def test_durations_read_like_slurm():
    assert [status.duration(s) for s in (None, 59, 3599, 3600, 90061)] == ["-", "0:59", "59:59", "1:00:00", "1-1:01:01"]
    assert [queue._seconds(t) for t in ("1-02:03:04", "02:03", "UNLIMITED")] == [93784, 123, None]


def test_a_reused_job_id_is_not_taken_for_the_runs_job(tmp_path):
    """After a controller reset SLURM hands out job ids again: sacct -D lists every job of an id. Only a record
    submitted no earlier than run.json's submission, under the name the run submitted, is the run's job."""
    run_dir = fake_run(tmp_path, "mine", "RUNNING", "16")
    record = json.loads((run_dir / "run.json").read_text())
    submitted = time.mktime(time.strptime("2026-11-27T10:00:05", "%Y-%m-%dT%H:%M:%S"))
    record["submissions"][0].update(time=submitted, job_name="mine")
    (run_dir / "run.json").write_text(json.dumps(record))
    old = "16|COMPLETED|None|50|60|1|2026-11-20T08:00:00|mine"  # the id's job before the reset
    later = "16|RUNNING|None|30|60|1|2026-11-28T09:00:00|someone_else"  # a job submitted after, given the id again
    mine = "16|RUNNING|None|40|60|2|2026-11-27T10:00:04|mine"
    now = time.time()
    for lines, expected in [([old], "RUNNING"), ([old, later], "RUNNING"), ([old, mine, later], "RUNNING")]:
        view = queue.SlurmView(queue.parse_sacct("\n".join(lines)))
        row = status.build_row(run_dir, view, now)
        assert row.state == expected and runs.read_run(run_dir)["state"] == "RUNNING", lines
        assert (row.elapsed_s == 40) == (mine in lines), lines
    assert queue.SlurmView(queue.parse_sacct(old)).job(record["submissions"][0]) is None
    assert queue.SlurmView(queue.parse_sacct(later)).job(record["submissions"][0]) is None
    assert queue.SlurmView(queue.parse_sacct(f"{old}\n{mine}\n{later}")).job(record["submissions"][0]).elapsed_s == 40
    finished = "16|FAILED|None|50|60|1|2026-11-27T10:00:04|mine"
    assert status.build_row(run_dir, queue.SlurmView(queue.parse_sacct(f"{old}\n{finished}")), now).state == "FAILED"


def test_without_accounting_live_jobs_come_from_squeue_and_the_table_says_it_once(tmp_path):
    live = fake_run(tmp_path, "live", "RUNNING", "201")
    gone = fake_run(tmp_path, "gone", "RUNNING", "202")
    done = fake_run(tmp_path, "done", "COMPLETED", "203")
    view = queue.SlurmView(accounting=False)
    view.records = {job: [state] for job, state in queue.parse_squeue("201|RUNNING|None|2026-11-27T10:00:00|live\n").items()}
    now = time.time()
    rows = [status.build_row(d, view, now) for d in (live, gone, done)]
    assert [r.state for r in rows] == ["RUNNING", "STOPPED", "COMPLETED"]
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(status.table(rows, "sacct did not answer"))
    assert console.export_text().count("sacct did not answer") == 1


def test_runs_sharing_a_name_are_told_apart_by_their_folder(tmp_path):
    first = fake_run(tmp_path / "a", "twin", "COMPLETED", "301")
    second = fake_run(tmp_path / "b", "twin", "COMPLETED", "302")
    alone = fake_run(tmp_path / "c", "single", "COMPLETED", "303")
    from rich.console import Console

    console = Console(width=250, record=True)
    console.print(status.table([status.build_row(d, queue.SlurmView(), time.time()) for d in (first, second, alone)]))
    text = console.export_text()
    assert str(first) in text and str(second) in text and str(alone) not in text
