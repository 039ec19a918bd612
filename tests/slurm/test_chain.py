"""Cluster profiles, chained jobs (`submit --after`) and evaluation jobs (`eval --submit`) on a real SLURM."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from launcher import runs
from launcher.cli import main as segjobs
from launcher.cluster import queue
from launcher.commands import status
from tests.jobspecs import write_spec
from tests.slurmjobs import submit, wait_for

pytestmark = [pytest.mark.usefixtures("cluster"), pytest.mark.xdist_group("slurm")]
SMALL = {"gpus_per_node": 0, "cpus_per_task": 1}  # what the model needs; where to run comes from the profile


def job_field(job: str, key: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return next((word.split("=", 1)[1] for word in shown.split() if word.startswith(f"{key}=")), "")


def test_profile_and_after_chain_jobs_and_resume_submits_the_recorded_profile(shard_root, tmp_path, segjobs_home, capsys):
    profile = {"partition": "short", "timeout_min": 2, "signal_delay_s": 30, "sbatch": {"comment": "from-mini"}}
    (segjobs_home / "clusters.yaml").parent.mkdir(parents=True, exist_ok=True)
    (segjobs_home / "clusters.yaml").write_text(yaml.safe_dump({"profiles": {"mini": profile}}))
    first_job, first = submit(write_spec(tmp_path, shard_root, "segmenter", name="first", resources=SMALL,
                                         train={"max_steps": 6, "log_every": 2}), "--profile", "mini", capsys=capsys)
    second_job, second = submit(write_spec(tmp_path, shard_root, "segmenter", name="second", resources=SMALL,
                                           train={"max_steps": 2, "log_every": 1}),
                                "--profile", "mini", "--after", "first", capsys=capsys)
    assert job_field(second_job, "Dependency").startswith(f"afterok:{first_job}"), "SLURM holds it for the first"
    assert (job_field(first_job, "Partition"), job_field(second_job, "Partition")) == ("short", "short")
    assert job_field(second_job, "Comment") == "from-mini"
    record = runs.read_run(second)
    assert record["submissions"][-1]["profile"] == "mini" and record["submissions"][-1]["after"] == f"afterok:{first_job}"
    assert record["spec"]["resources"]["partition"] == "short" and record["spec"]["resources"]["timeout_min"] == 2

    # resume submits what run.json recorded, whatever clusters.yaml says by then
    assert segjobs(["cancel", "second"]) == 0
    (segjobs_home / "clusters.yaml").write_text(yaml.safe_dump({"profiles": {"mini": {"partition": "debug"}}}))
    wait_for(second, {"CANCELLED"})
    capsys.readouterr()
    assert segjobs(["resume", "second"]) == 0
    resumed_job = capsys.readouterr().out.split("\t")[1].removeprefix("job ")
    assert job_field(resumed_job, "Partition") == "short" and job_field(resumed_job, "Comment") == "from-mini"
    assert runs.read_run(second)["submissions"][-1]["profile"] == "mini"
    assert wait_for(first, {"COMPLETED", "FAILED"}).state == "COMPLETED"
    assert wait_for(second, {"COMPLETED", "FAILED"}).state == "COMPLETED"


def test_eval_submit_waits_for_the_training_then_writes_its_report_which_status_shows(shard_root, tmp_path, capsys):
    job, run_dir = submit(write_spec(tmp_path, shard_root, "segmenter", name="trained", resources=SMALL,
                                     train={"max_steps": 4, "log_every": 2}), capsys=capsys)
    capsys.readouterr()
    assert segjobs(["eval", "trained", "--submit", "--mode", "ms-flip"]) == 0
    name, eval_job, cluster, folder, waits = capsys.readouterr().out.strip().split("\t")
    assert (name, cluster, Path(folder), waits) == ("trained-eval", "slurm", run_dir / "eval", f"after job {job}")
    eval_job = eval_job.removeprefix("job ")
    script = (run_dir / "logs" / f"{eval_job}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{job}\n" in script and "#SBATCH --ntasks-per-node=1\n" in script
    assert wait_for(run_dir, {"COMPLETED", "FAILED"}).state == "COMPLETED"
    report = run_dir / "eval" / "step_00000004_validation_ms-flip.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        row = status.build_row(run_dir, queue.poll_slurm([job, eval_job]), time.time())
        if (row.eval_miou is not None and row.eval_state is None) or row.eval_state in runs.FINAL_STATES:
            break
        time.sleep(0.5)
    assert row.eval_state is None and report.is_file(), (row, (run_dir / "logs" / f"{eval_job}_0_log.err").read_text())
    assert (row.eval_mode, row.eval_step, row.eval_miou) == ("ms-flip", 4, json.loads(report.read_text())["miou"])
    assert row.miou is not None, "the training's own final evaluation, beside it"
    assert runs.read_run(run_dir)["evaluations"][-1]["job_id"] == eval_job
    assert segjobs(["status", "trained"]) == 0
    assert f"ms-flip@4 {row.eval_miou:.4f}" in capsys.readouterr().out
