"""Provenance recorded at each start, drift between starts, goodput arithmetic, and `segjobs show` (text, --json,
hostile run.json). The run on the minicluster is in tests/slurm/test_show.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from launcher import runs
from launcher.cli import main as segjobs
from launcher.cluster import queue
from launcher.commands import status
from launcher.commands.goodput import goodput
from launcher.history import drift
from launcher.training.metrics_log import MetricsLog, read_metrics
from launcher.training.runtime import code_version
from tests.jobspecs import write_spec

T = 1_790_000_000.0  # a start time, seconds since the epoch
COMMIT = "a" * 40
DIFF = "b" * 64


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


# ---- provenance ---------------------------------------------------------------------------------------------
@pytest.fixture
def checkout(tmp_path) -> Path:
    repo = tmp_path / "segjobs checkout"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "launcher.py").write_text("print('v1')\n")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1")
    return repo


def test_a_clean_checkout_records_its_commit_and_a_dirty_one_the_hash_of_its_diff(checkout):
    head = git(checkout, "rev-parse", "HEAD").strip()
    assert code_version(checkout) == {"commit": head, "dirty": False, "diff_sha256": None}
    (checkout / "launcher.py").write_text("print('v2')\n")
    dirty = code_version(checkout)
    diff = subprocess.run(["git", "-C", str(checkout), "diff", "HEAD", "--binary"], capture_output=True, check=True).stdout
    assert dirty == {"commit": head, "dirty": True, "diff_sha256": hashlib.sha256(diff).hexdigest()}
    (checkout / "launcher.py").write_text("print('v3')\n")
    assert code_version(checkout)["diff_sha256"] != dirty["diff_sha256"], "another edit, another hash"


def test_no_code_is_recorded_outside_a_checkout_inside_another_repository_or_without_git(checkout, tmp_path, monkeypatch):
    (tmp_path / "plain").mkdir()
    assert code_version(tmp_path / "plain") is None
    (checkout / "site-packages").mkdir()  # segjobs installed in a venv inside somebody's project
    assert code_version(checkout / "site-packages") is None
    monkeypatch.setenv("PATH", str(tmp_path / "plain"))
    assert code_version(checkout) is None


def test_each_start_records_what_it_ran_and_the_steps_it_redoes(shard_root, tmp_path, capsys):
    """A run stopped after its checkpoint at step 3 but logged to step 6: the next start resumes from 3 and
    records that it does 3 steps again; show lists both starts, and goodput counts the 3 steps."""
    spec = write_spec(tmp_path, shard_root, "segmenter", name="twice", train={"max_steps": 6, "log_every": 1},
                      data={"val": None})
    assert segjobs(["train", str(spec)]) == 0
    shutil.rmtree(tmp_path / "twice" / "checkpoints" / "step_00000006")  # as if killed after step 6's log line
    assert segjobs(["train", str(spec)]) == 0
    first, second = runs.read_run(tmp_path / "twice")["starts"]
    assert (first["from_step"], first["redo_steps"], second["from_step"], second["redo_steps"]) == (0, 0, 3, 3)
    assert first["hosts"] == [first["host"]] and first["versions"]["torch"] and first["versions"]["python"]
    assert ("gpu" in first) == ("cuda" in first["versions"]) == __import__("torch").cuda.is_available()
    assert [r["step"] for r in read_metrics(tmp_path / "twice" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    capsys.readouterr()
    assert segjobs(["show", str(tmp_path / "twice"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [e["event"] for e in shown["history"] if e["event"].startswith("start")] == ["start 1", "start 2"]
    assert shown["goodput"]["recomputed_steps"] == 3 and shown["goodput"]["kept_steps"] == 6
    assert shown["drift"] == [] and shown["utilisation"]["last"]["rss_peak_gb"] > 0


def test_a_start_drops_what_a_stopped_start_logged_past_its_checkpoint_and_counts_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6, 8)) + '{"step": 10, "lo')
    assert MetricsLog(path, enabled=True).truncate_after(4) == 4
    assert [r["step"] for r in read_metrics(path)] == [2, 4]
    assert MetricsLog(path, enabled=True).truncate_after(4) == 0
    assert MetricsLog(path, enabled=False).truncate_after(0) == 0 and path.read_text().count("\n") == 2


# ---- a planted run: drift and goodput with known answers --------------------------------------------------
def planted_record(**changes) -> dict:
    """Three starts of job 4242 on 2 nodes x 4 GPUs: a fault at step 55 (checkpoint at 40), a time-limit requeue
    at step 80, then the end; torch was upgraded before the third start, the code edited before the second."""
    versions = {"python": "3.11.7", "torch": "2.11.0", "timm": "1.0.31", "accelerate": "1.15.0", "segjobs": "0.1.0"}
    start = {"job_id": "4242", "world_size": 8, "gpu": "NVIDIA H100 80GB HBM3", "hosts": ["n1"] * 4 + ["n2"] * 4}
    record = {
        "name": "planted", "model": "segmenter_t16_linear", "cluster": "slurm", "state": "COMPLETED",
        "nodes": 2, "gpus_per_node": 4, "tasks": 8, "total_steps": 100, "global_batch": 64, "ended": T + 11400,
        "submissions": [{"job_id": "4242", "time": T - 60, "cluster": "slurm", "log_folder": "/logs", "overrides": []}],
        "starts": [
            {**start, "time": T, "restart_count": 0, "from_step": 0, "redo_steps": 0, "versions": versions,
             "code": {"commit": COMMIT, "dirty": False}},
            {**start, "time": T + 5400, "restart_count": 1, "from_step": 40, "redo_steps": 10, "versions": versions,
             "code": {"commit": COMMIT, "dirty": True, "diff_sha256": DIFF}},
            {**start, "time": T + 9600, "restart_count": 2, "from_step": 80, "redo_steps": 0,
             "versions": {**versions, "torch": "2.14.1"}, "code": {"commit": COMMIT, "dirty": True, "diff_sha256": DIFF}},
        ],
        "faults": [{"job_id": "4242", "restart_count": 0, "time": T + 3600, "kind": "rank lost", "step": 55, "rank": 3,
                    "host": "n1", "detail": "a rank was lost at step 55", "requeued": True}],
        "requeues": [{"job_id": "4242", "time": T + 9000, "reason": "timeout", "step": 80}],
    }
    record.update(changes)
    return record


def planted_metrics() -> list[dict]:
    """Log steps every 10: steps 1-50 took 20 s each (64 samples / 3.2 per s), steps 51-100 took 40 s each."""
    return [{"step": s, "epoch": 0, "loss": 1.0, "lr": 1e-4, "samples_per_s": 3.2 if s <= 50 else 1.6, "data_wait": 0.25,
             "time": T + s} for s in range(10, 101, 10)] + [{"step": 100, "epoch": 0, "eval": {"miou": 0.5}}]


@pytest.fixture
def planted(tmp_path, monkeypatch) -> Path:
    run_dir = tmp_path / "planted"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps(planted_record()))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in planted_metrics()))
    monkeypatch.setattr(queue, "poll_slurm", lambda ids: queue.SlurmView(accounting=False))  # no slurmdbd
    return run_dir


def test_drift_names_what_changed_and_at_which_start():
    record = planted_record()
    assert drift(record["starts"]) == [f"code {COMMIT[:12]} -> {COMMIT[:12]}+dirty(sha256 {DIFF[:8]}) at start 2",
                                       "torch 2.11.0 -> 2.14.1 at start 3"]
    older = {"job_id": "1", "time": T - 100}  # a start recorded by a segjobs without provenance: not compared
    assert drift([older, *record["starts"][1:]]) == ["torch 2.11.0 -> 2.14.1 at start 3"]
    gone = {**record["starts"][2], "versions": {k: v for k, v in record["starts"][2]["versions"].items() if k != "timm"}}
    assert drift([record["starts"][1], gone]) == ["torch 2.11.0 -> 2.14.1 at start 2", "timm 1.0.31 -> none at start 2"]


def test_goodput_from_run_json_when_accounting_has_nothing():
    result = goodput(planted_record(), planted_metrics(), None, now=T + 20000)
    assert (result.unit, result.width, result.allocated_from) == ("GPU-hours", 8, "run.json")
    assert result.allocated == pytest.approx((3600 + 3600 + 1800) * 8 / 3600)  # each start to its recorded stop
    assert result.kept == pytest.approx((50 * 20 + 50 * 40) * 8 / 3600) and result.kept_steps == 100
    assert result.recomputed == pytest.approx(10 * 20 * 8 / 3600) and result.recomputed_steps == 10  # 41..50 again
    assert result.other == pytest.approx(20 - 3000 * 8 / 3600 - 200 * 8 / 3600)
    assert result.queued_h == pytest.approx((1800 + 600) / 3600)  # fault -> start 2, requeue -> start 3
    assert result.notes == []


def test_goodput_takes_every_starts_elapsed_time_from_sacct():
    seen = [queue.JobState("REQUEUED", elapsed_s=3700, nodes=2, submitted=T - 50, name=None),
            queue.JobState("REQUEUED", elapsed_s=3650, nodes=2, submitted=T + 3700),
            queue.JobState("COMPLETED", elapsed_s=1850, nodes=2, submitted=T + 9050),
            queue.JobState("COMPLETED", elapsed_s=99999, nodes=2, submitted=T - 86400)]  # the id, reused long before
    view = queue.SlurmView(records={"4242": sorted(seen, key=lambda s: s.submitted)})
    result = goodput(planted_record(), planted_metrics(), view, now=T + 20000)
    assert result.allocated_from == "sacct" and result.allocated == pytest.approx((3700 + 3650 + 1850) * 8 / 3600)


def test_goodput_of_a_cpu_run_killed_without_a_record_is_in_node_hours_and_says_how_it_counted():
    record = planted_record(gpus_per_node=0, faults=[], requeues=[])
    result = goodput(record, planted_metrics(), None, now=T + 20000)
    assert (result.unit, result.width) == ("node-hours", 2)
    assert result.allocated == pytest.approx((5400 + 4200 + 1800) * 2 / 3600)  # until the next start
    assert result.queued_h == 0 and any("counted until start 2" in note for note in result.notes)


# ---- segjobs show and status ------------------------------------------------------------------------------------
def test_show_prints_history_software_drift_goodput_and_spec(planted, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    (planted / "spec.yaml").write_text("name: planted\ntrain: {max_steps: 100, log_every: 10}\n")
    assert segjobs(["show", str(planted)]) == 0
    out = capsys.readouterr().out
    words = " ".join(out.split())
    for expected in ["planted COMPLETED step 100/100", "start 3", "fault", "rank lost at step 55 on n1",
                     "timeout at step 80", "8 ranks on n1 ×4, n2 ×4, from step 40 (redoes 10)", "torch 2.14.1",
                     "NVIDIA H100 80GB HBM3", "torch 2.11.0 -> 2.14.1 at start 3", "GPU-hours: wall hours x 8 GPUs",
                     "allocated 20.0000 from run.json", "recomputed 0.4444 2.2% 10 steps done again",
                     "queued 40:00", "data wait 25.0%", "train max_steps=100 log_every=10"]:
        assert expected in words, (expected, out)
    assert max(len(line) for line in out.splitlines()) <= 120


def test_show_json_holds_what_the_text_shows(planted, capsys):
    assert segjobs(["show", "planted", "--json"]) == 2, "not in the index: a name alone is not found"
    assert "no run named 'planted'" in capsys.readouterr().err
    assert segjobs(["show", str(planted), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [e["event"] for e in shown["history"]] == ["submitted", "start 1", "fault", "start 2", "requeued", "start 3",
                                                      "ended"]
    assert shown["latest_start"]["versions"]["torch"] == "2.14.1" and shown["starts"] == 3
    assert shown["goodput"]["allocated"] == pytest.approx(20) and shown["goodput"]["unit"] == "GPU-hours"
    assert shown["drift"][-1] == "torch 2.11.0 -> 2.14.1 at start 3" and shown["spec"] is None


def test_status_marks_drift_and_shows_the_data_wait(planted, capsys):
    assert segjobs(["status", "--runs", str(planted.parent), "--all", "--json"]) == 0
    row, = json.loads(capsys.readouterr().out)
    assert row["drift"][-1] == "torch 2.11.0 -> 2.14.1 at start 3" and row["data_wait"] == 0.25 and row["gpu_util"] is None
    from rich.console import Console

    console = Console(width=400, record=True, file=open("/dev/null", "w"))
    console.print(status.table(status.collect([], [planted.parent], show_all=True)[0]))
    out = console.export_text()
    assert "torch 2.11.0 -> 2.14.1 at start 3" in out and "wait 25%" in out


@pytest.mark.parametrize("change, culprit", [
    (lambda r: r["starts"][0].update(hosts=["n" * 100_000]), "starts[0].hosts.0"),
    (lambda r: r["starts"][1].update(time="yesterday"), "starts[1].time"),
    (lambda r: r["starts"][2].update(versions=["torch"]), "starts[2].versions"),
    (lambda r: r["starts"][0].update(code={"commit": "$(rm -rf ~)", "dirty": False}), "starts[0].code.commit"),
    (lambda r: r["requeues"][0].update(step=-1), "requeues[0].step"),
    (lambda r: r["faults"][0].update(detail={"x": 1}), "faults[0].detail"),
])
def test_hostile_run_json_fields_exit_2_naming_run_json(change, culprit, planted, capsys):
    record = planted_record()
    change(record)
    (planted / "run.json").write_text(json.dumps(record))
    assert segjobs(["show", str(planted)]) == 2
    err = capsys.readouterr().err
    assert f"{planted / 'run.json'}: not a segjobs record ({culprit}" in err and len(err) < 1000, err
    rows, _ = status.collect([], [planted], show_all=True)
    assert rows[0].state == "UNREADABLE"


def test_show_still_prints_a_run_with_odd_but_harmless_fields(planted, capsys):
    record = planted_record(spec="not a mapping", error="[bold red]markup[/] " + "x" * 50_000, state="FAILED")
    record["starts"][0]["extra"] = {"written by": "a newer segjobs"}
    (planted / "run.json").write_text(json.dumps(record))
    with open(planted / "metrics.jsonl", "a") as f:
        f.write('{"step": "x", "loss": "y", "samples_per_s": "fast"}\n[1, 2]\n{"step": 101, "lo')
    assert segjobs(["show", str(planted)]) == 0
    out = capsys.readouterr().out
    assert "[bold red]markup[/]" in out and "spec\nnot recorded" in out and len(out) < 20_000


# ---- what a log step records about the machine ----------------------------------------------------------------
def test_a_cpu_log_step_has_no_gpu_fields_and_a_gpu_one_has_nvmls_until_it_fails(monkeypatch, caplog):
    import torch

    from launcher.training.utilisation import LogWindow

    window = LogWindow(cuda=False)
    assert window.next_batch(iter([1])) == 1 and window.next_batch(iter([])) is None
    window.samples = 64
    fields = window.fields()
    assert set(fields) == {"samples_per_s", "data_wait", "time", "rss_peak_gb"} and 0 <= fields["data_wait"] <= 1
    assert fields["rss_peak_gb"] > 0.01, "this process holds torch: tens of MB at least"

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "utilization", lambda: 87)
    monkeypatch.setattr(torch.cuda, "device_memory_used", lambda: 31 * 2**30)
    window = LogWindow(cuda=True)
    window.nvml = True  # as when nvidia-ml-py is installed
    fields = window.fields()
    assert (fields["peak_mem_gb"], fields["gpu_util"], fields["gpu_mem_gb"]) == (3, 87, 31)

    def broken():
        raise RuntimeError("NVML: driver not loaded")

    monkeypatch.setattr(torch.cuda, "utilization", broken)
    fields = window.fields()
    assert "gpu_util" not in fields and fields["peak_mem_gb"] == 3 and not window.nvml
    assert "NVML failed (NVML: driver not loaded)" in caplog.text
