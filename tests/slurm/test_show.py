"""`segjobs show` of a run that SLURM requeued: both starts, the requeue between them, sacct's elapsed times."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from launcher.cli import main as segjobs
from tests.jobspecs import write_spec
from tests.slurmjobs import CPU_JOB, submit, wait_for

pytestmark = [pytest.mark.usefixtures("cluster"), pytest.mark.xdist_group("slurm")]


def test_show_of_a_requeued_run_lists_both_starts_and_the_requeue(shard_root, tmp_path, capsys):
    spec = write_spec(tmp_path, shard_root, "segmenter", name="shown", train={"max_steps": 40, "log_every": 1},
                      checkpoint={"every_steps": 1000}, data={"val": None}, resources=CPU_JOB)
    job, run_dir = submit(spec, capsys=capsys)
    wait_for(run_dir, {"RUNNING"}, until=lambda row: row.step >= 5)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    assert wait_for(run_dir, {"COMPLETED", "FAILED"}, timeout=300).state == "COMPLETED"
    deadline = time.monotonic() + 90  # slurmdbd records a finished job's times a moment after it ends
    while True:
        assert segjobs(["show", str(run_dir), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        if shown["goodput"]["allocated_from"] == "sacct" or time.monotonic() > deadline:
            break
        time.sleep(2)
    events = [(e["event"], e["job_id"]) for e in shown["history"]]
    assert events == [("submitted", job), ("start 1", job), ("requeued", job), ("start 2", job), ("ended", None)]
    requeue = shown["history"][2]
    assert requeue["detail"].startswith("preemption at step ") and shown["starts"] == 2
    assert shown["latest_start"]["from_step"] == int(requeue["detail"].split()[-1]) > 0
    assert shown["goodput"]["unit"] == "node-hours" and shown["goodput"]["allocated_from"] == "sacct"
    assert shown["goodput"]["allocated"] > shown["goodput"]["kept"] > 0 and shown["goodput"]["queued_h"] > 0
    assert segjobs(["show", str(run_dir)]) == 0
    assert "start 2" in capsys.readouterr().out
