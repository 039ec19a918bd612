"""Cluster profiles ($SEGJOBS_HOME/clusters.yaml), `submit --after`, `eval --submit`'s checks and the evaluation
scores in `segjobs status`, without a SLURM cluster (tests/slurm/test_chain.py runs them on the minicluster)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher import runs
from launcher.cli import main as segjobs
from launcher.cluster import queue
from launcher.commands import status
from launcher.spec import load_spec
from tests.jobspecs import write_spec

CPU = {"gpus_per_node": 0, "cpus_per_task": 2, "timeout_min": 20}
LAB = {"partition": "gpu-a100", "account": "vision-lab", "cpus_per_task": 16, "timeout_min": 600, "mem_gb": 64,
       "setup": ["module load cuda/12.4"], "sbatch": {"mail-type": "END", "comment": "from the profile"}}


def write_clusters(home: Path, content) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "clusters.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def dry_run(spec: Path, *args: str, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = segjobs(["submit", str(spec), "--dry-run", *args])
    out, err = capsys.readouterr()
    return code, out, err


def provenance(out: str) -> dict[str, str]:
    """The dry run's `# key value origin` lines after the script."""
    lines = out.split("where each value came from", 1)[1].splitlines()[1:]
    return {line.split()[1]: re.search(r"(--set|spec|default|profile \S+)$", line).group(1) for line in lines}


def test_profiles_lists_every_profile_as_a_table_and_as_json(segjobs_home, capsys):
    assert segjobs(["profiles"]) == 0
    assert "no profiles" in capsys.readouterr().out
    write_clusters(segjobs_home, {"default": "lab", "profiles": {"lab": LAB, "cpu": {"partition": "cpu-long"}}})
    assert segjobs(["profiles"]) == 0
    table = capsys.readouterr().out
    assert "lab (default)" in table and "cpu-long" in table and "mail-type" in table
    assert segjobs(["profiles", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["default"] == "lab" and listed["profiles"]["lab"] == LAB
    assert listed["profiles"]["cpu"] == {"partition": "cpu-long"}, "only what the profile writes, no schema defaults"


def test_a_profile_fills_only_what_the_spec_and_set_leave_unwritten(segjobs_home, shard_root, tmp_path, capsys):
    write_clusters(segjobs_home, {"profiles": {"lab": LAB}})
    spec = write_spec(tmp_path, shard_root, "segmenter", name="merged",
                      resources={**CPU, "sbatch": {"comment": "from the spec"}})
    code, out, err = dry_run(spec, "--profile", "lab", "--set", "resources.account=other", capsys=capsys)
    assert code == 0, err
    for line in ["--partition=gpu-a100", "--account=other", "--cpus-per-task=2", "--time=20", "--mem=65536M",
                 "--mail-type=END", "--comment='from the spec'"]:
        assert f"#SBATCH {line}\n" in out, line
    assert "\nmodule load cuda/12.4\n" in out
    assert "--gpus-per-node" not in out, "the spec's gpus_per_node: 0 wins over nothing the profile says"
    origins = provenance(out)
    assert origins["partition"] == origins["mem_gb"] == origins["setup"] == origins["sbatch.mail-type"] == "profile lab"
    assert origins["account"] == "--set" and origins["cpus_per_task"] == origins["sbatch.comment"] == "spec"
    assert origins["signal_delay_s"] == "default" and origins["qos"] == "default"

    code, out, _ = dry_run(spec, capsys=capsys)
    assert code == 0 and "--partition" not in out and "(no profile)" in out, "no --profile and no default: none"
    write_clusters(segjobs_home, {"default": "lab", "profiles": {"lab": LAB}})
    code, out, _ = dry_run(spec, capsys=capsys)
    assert code == 0 and "#SBATCH --partition=gpu-a100\n" in out, "the file's default applies without --profile"


@pytest.mark.parametrize("content, culprit", [
    ("- lab\n- cpu\n", "a YAML mapping"),
    ("defaults: lab\n", "unknown key 'defaults'; did you mean default?"),
    ({"default": "lba", "profiles": {"lab": {}}}, "default: 'lba' is not a profile of the file; did you mean lab?"),
    ({"profiles": {"lab": {"partitoin": "gpu"}}}, "profiles.lab.partitoin; did you mean profiles.lab.partition?"),
    ({"profiles": {"lab": {"cpus_per_task": "many"}}}, "profiles.lab.cpus_per_task: input should be a valid integer"),
    ({"profiles": {"lab": {"setup": "module load cuda"}}}, "profiles.lab.setup: input should be a valid list"),
    ({"profiles": {"lab": ["gpu"]}}, "profiles.lab: a mapping of resources keys"),
    ({"profiles": {"a b": {}}}, "'a b' is not a profile name"),
    ({"profiles": {"lab": {"setup": ["module load cuda\nrm -rf ~"]}}}, "profiles.lab.setup[0]: 'module load cuda\\nrm -rf ~' contains a control character"),
    ({"profiles": {"lab": {"partition": "gpu\n#SBATCH --uid=0"}}}, "profiles.lab.partition: 'gpu\\n#SBATCH --uid=0' contains a control"),
    ({"profiles": {"lab": {"sbatch": {"x --uid=0": "1"}}}}, "profiles.lab.sbatch.x --uid=0: 'x --uid=0' is not an sbatch option"),
    ({"profiles": {"lab": {"sbatch": {"output": "/tmp/x"}}}}, "profiles.lab.sbatch.output: segjobs writes --output itself"),
    ({"profiles": {"lab": {"sbatch": {"partition": "gpu"}}}}, "profiles.lab.sbatch.partition: --partition has its own key"),
    ({"profiles": {"lab": {"srun_args": ["--container-image=x\ny"]}}}, "profiles.lab.srun_args[0]"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                                                        for p, c in zip("abcdef", "bcdefg")), "expands to over"),
    ("x" * (300 << 10), "over the 262,144 expected at most"),
])
def test_a_hostile_clusters_file_is_exit_2_naming_the_file_and_the_key(content, culprit, segjobs_home, shard_root,
                                                                      tmp_path, capsys):
    path = write_clusters(segjobs_home, content)
    spec = write_spec(tmp_path, shard_root, "segmenter", name="hostile", resources=CPU)
    code, out, err = dry_run(spec, capsys=capsys)
    assert code == 2 and not out, out
    assert err.startswith(f"segjobs: {path}") and culprit in err, err
    assert len(err.strip().splitlines()) == 1, "one paragraph"
    assert segjobs(["profiles"]) == 2


def test_an_unknown_profile_is_exit_2_with_the_nearest_name(segjobs_home, shard_root, tmp_path, capsys):
    spec = write_spec(tmp_path, shard_root, "segmenter", name="unknown", resources=CPU)
    code, _, err = dry_run(spec, "--profile", "lab", capsys=capsys)
    assert code == 2 and "does not exist" in err, "no file at all"
    write_clusters(segjobs_home, {"profiles": {"lab": LAB, "cpu": {}}})
    code, _, err = dry_run(spec, "--profile", "lba", capsys=capsys)
    assert code == 2 and "--profile 'lba': no such profile; did you mean lab?" in err and "these: cpu, lab" in err


def test_quoted_profile_values_reach_sbatch_and_srun_intact_and_run_nothing(segjobs_home, shard_root, tmp_path, capsys):
    """A profile's values are quoted like a spec's (tests/test_submit.py's golden file): run the dry run's script
    under bash with a fake srun that prints its arguments."""
    image = "--container-image=nvcr.io#nvidia/pytorch:24.05-py3 '; echo injected"
    write_clusters(segjobs_home, {"profiles": {"odd": {"partition": "gpu'; echo injected", "srun_args": [image],
                                                       "account": 'lab "x" $(echo injected)'}}})
    spec = write_spec(tmp_path, shard_root, "segmenter", name="odd", resources=CPU)
    code, script, err = dry_run(spec, "--profile", "odd", capsys=capsys)
    assert code == 0, err
    assert "#SBATCH --partition='gpu'\"'\"'; echo injected'\n" in script
    fake_srun = tmp_path / "bin" / "srun"
    fake_srun.parent.mkdir()
    fake_srun.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake_srun.chmod(fake_srun.stat().st_mode | stat.S_IEXEC)
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PATH": f"{fake_srun.parent}:{os.environ['PATH']}"})
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1, done.stdout + done.stderr
    assert image in json.loads(done.stdout), "one argument, as written"


def planted_run(tmp_path: Path, shard_root: Path, name: str, cluster: str = "slurm", job_id: str = "4242",
                state: str | None = None) -> Path:
    """A run.json as `segjobs submit` writes it, without a scheduler."""
    spec = load_spec(write_spec(tmp_path, shard_root, "segmenter", name=name, resources=CPU))
    run_dir = spec.run_dir
    runs.submitted(run_dir, {"job_id": job_id, "time": time.time(), "cluster": cluster, "log_folder": str(run_dir / "logs"),
                             "overrides": [], "job_name": name, "pid_start": None}, name=name, model=spec.model.name,
                   cluster=cluster, spec=spec.model_dump(mode="json"))
    if state:
        runs.settled(run_dir, state)
    return run_dir


def slurm_says(monkeypatch, state: str | None) -> None:
    def poll(job_ids):
        records = {i: [queue.JobState(state, submitted=time.time(), name=None)] for i in job_ids} if state else {}
        return queue.SlurmView(records=records)

    monkeypatch.setattr(queue, "poll_slurm", poll)


@pytest.mark.parametrize("slurm_state, code, expected", [
    ("RUNNING", 0, "#SBATCH --dependency=afterok:4242\n"),
    ("PENDING", 0, "#SBATCH --dependency=afterok:4242\n"),
    ("COMPLETED", 0, None),  # nothing to wait for: no dependency
    ("FAILED", 2, "job 4242 is FAILED, so a job waiting for it to complete would never start"),
    ("CANCELLED", 2, "segjobs resume first"),
])
def test_after_waits_on_the_runs_current_job_or_says_why_it_cannot(slurm_state, code, expected, shard_root, tmp_path,
                                                                   capsys, monkeypatch):
    planted_run(tmp_path, shard_root, "first")
    slurm_says(monkeypatch, slurm_state)
    spec = write_spec(tmp_path, shard_root, "segmenter", name="second", resources=CPU)
    got, out, err = dry_run(spec, "--after", "first", capsys=capsys)
    assert got == code, err
    if expected is None:
        assert "#SBATCH --dependency" not in out and "has completed; nothing to wait for" in err
    else:
        assert expected.replace("segjobs resume first", "`segjobs resume first`") in (out if code == 0 else err)


def test_after_needs_a_slurm_job_and_slurm(shard_root, tmp_path, capsys, monkeypatch):
    planted_run(tmp_path, shard_root, "here", cluster="local", job_id="1")
    slurm_says(monkeypatch, "RUNNING")
    spec = write_spec(tmp_path, shard_root, "segmenter", name="second", resources=CPU)
    code, _, err = dry_run(spec, "--after", "here", capsys=capsys)
    assert code == 2 and "ran with the local executor; --after waits for a SLURM job" in err
    code, _, err = dry_run(spec, "--after", "nosuch", capsys=capsys)
    assert code == 2 and "no run named 'nosuch'" in err
    planted_run(tmp_path, shard_root, "first")
    assert segjobs(["submit", str(spec), "--cluster", "local", "--after", "first"]) == 2
    assert "the local executor cannot wait for another job" in capsys.readouterr().err
    assert not (tmp_path / "second").exists()


def test_eval_submit_refuses_before_queueing(shard_root, tmp_path, capsys, monkeypatch):
    run_dir = planted_run(tmp_path, shard_root, "trained", state="COMPLETED")
    slurm_says(monkeypatch, "COMPLETED")
    assert segjobs(["eval", "trained", "--profile", "lab"]) == 2
    assert "add --submit" in capsys.readouterr().err
    assert segjobs(["eval", "trained", "--submit"]) == 2
    assert "no checkpoint to evaluate" in capsys.readouterr().err
    (run_dir / "checkpoints" / "step_00000006").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000006" / "meta.json").write_text("{}")
    monkeypatch.setattr("launcher.cluster.submit.choose_cluster", lambda cluster: "local")
    assert segjobs(["eval", "trained", "--submit"]) == 2
    assert "no SLURM controller answers here; evaluate on this machine" in capsys.readouterr().err
    assert segjobs(["eval", "trained", "--submit", "--split", "nosuch"]) == 2
    assert "--split nosuch" in capsys.readouterr().err


def test_status_shows_the_training_score_and_the_newest_evaluation(shard_root, tmp_path, capsys, monkeypatch):
    run_dir = planted_run(tmp_path, shard_root, "scored", state="COMPLETED")
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "step_00000003.json").write_text(json.dumps({"miou": 0.125}))
    (run_dir / "eval" / "step_00000006.json").write_text(json.dumps({"miou": 0.25}))  # the trainer's last
    row = status.build_row(run_dir, queue.SlurmView(), time.time())
    assert (row.miou, row.eval_miou) == (0.25, None)
    (run_dir / "eval" / "step_00000006_validation_ms-flip.json").write_text(json.dumps({"miou": 0.375, "mode": "ms-flip"}))
    row = status.build_row(run_dir, queue.SlurmView(), time.time())
    assert (row.miou, row.eval_miou, row.eval_mode, row.eval_step) == (0.25, 0.375, "ms-flip", 6)
    monkeypatch.setattr(queue, "poll_slurm", lambda ids: queue.SlurmView())
    assert segjobs(["status", "scored"]) == 0
    shown = capsys.readouterr().out
    assert "0.2500" in shown and "ms-flip@6 0.3750" in shown
    # a damaged or hostile newest report is left out, never fatal
    time.sleep(0.01)
    (run_dir / "eval" / "step_00000006_training_slide.json").write_text(json.dumps({"miou": "NaN", "mode": "slide"}))
    assert status.build_row(run_dir, queue.SlurmView(), time.time()).eval_miou is None
    (run_dir / "eval" / "step_00000006_training_slide.json").write_text("[" * 100000)
    assert status.build_row(run_dir, queue.SlurmView(), time.time()).state == "COMPLETED"
