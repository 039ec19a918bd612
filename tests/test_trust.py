"""Hostile and damaged files: no planted code runs, nothing segjobs did not write is overwritten, one writer
per run, checkpoints that check themselves. Each test gives the input, the exit status, the message and what
is on disk afterwards."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher import checkpoint as layout
from launcher import runlock, runs
from launcher.cli import main as segjobs
from tests.jobspecs import same_losses, write_spec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the sha256 of its bytes: what 'nothing touched' compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Planted:
    """Unpickling this writes a marker file: proof that code from a checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def reseal(checkpoint: Path) -> None:
    """Rewrite meta.json's file records after editing a checkpoint: an attacker who knows the format."""
    meta = layout.read_meta(checkpoint)
    meta["files"] = {name: layout.file_record(checkpoint / name) for name in meta["files"]}
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def trained(tmp_path, shard_root, name, **sections) -> Path:
    spec = write_spec(tmp_path, shard_root, "segmenter", name=name, train={"max_steps": 6, "precision": "no", "log_every": 1},
                      **sections)
    assert segjobs(["train", str(spec)]) == 0
    return spec


# ---- 1. no code from a file runs ----------------------------------------------------------------------------
@pytest.mark.parametrize("planted_in", ["shared.pt", "rank_00000.pt"])
def test_a_planted_pickle_in_a_checkpoint_never_runs(planted_in, shard_root, tmp_path, capsys):
    spec = trained(tmp_path, shard_root, "planted", checkpoint={"every_steps": 3})
    checkpoint = tmp_path / "planted" / "checkpoints" / "step_00000006"
    marker = tmp_path / "marker"
    torch.save({"model": Planted(marker)}, checkpoint / planted_in)
    reseal(checkpoint)
    capsys.readouterr()
    assert segjobs(["train", str(spec), "--set", "train.max_steps=8"]) == 1
    err = capsys.readouterr().err
    assert f"{checkpoint / planted_in}: holds objects other than tensors" in err and "Traceback" not in err
    if planted_in == "shared.pt":
        assert segjobs(["eval", str(tmp_path / "planted")]) == 1
    assert not marker.exists()


def test_rng_files_of_an_older_segjobs_still_resume_exactly(shard_root, tmp_path):
    trained(tmp_path, shard_root, "whole", checkpoint={"every_steps": 3})
    spec = trained(tmp_path, shard_root, "old", checkpoint={"every_steps": 3})
    checkpoints = tmp_path / "old" / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000006")
    # The RNG file as segjobs wrote it before: random.getstate() and np.random.get_state() pickled as they are.
    rng = torch.load(checkpoints / "step_00000003" / "rank_00000.pt", weights_only=True)
    python, numpy_state = rng["python"], rng["numpy"]
    old = {"python": (python["version"], tuple(python["state"]), python["gauss"]),
           "numpy": (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                     numpy_state["has_gauss"], numpy_state["cached_gaussian"]),
           "torch": rng["torch"], **({"cuda": rng["cuda"]} if "cuda" in rng else {})}
    torch.save(old, checkpoints / "step_00000003" / "rank_00000.pt")
    meta = layout.read_meta(checkpoints / "step_00000003")
    del meta["files"]  # written before meta.json listed its files
    (checkpoints / "step_00000003" / "meta.json").write_text(json.dumps(meta))
    assert segjobs(["train", str(spec)]) == 0
    assert same_losses(tmp_path / "old", tmp_path / "whole")


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    from launcher.training.checkpointer import load_rng_file, rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_rng_file(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_cancel_signals_only_the_process_segjobs_started(tmp_path, capsys):
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        run_dir = tmp_path / "edited"
        run_dir.mkdir()
        job = {"job_id": str(bystander.pid), "cluster": "local", "time": 0, "log_folder": str(run_dir), "overrides": []}
        for edit in ({"pid_start": 12345}, {}, {"job_id": "-1"}, {"job_id": "0"}):
            (run_dir / "run.json").write_text(json.dumps({"name": "edited", "state": "RUNNING", "submissions": [{**job, **edit}]}))
            assert segjobs(["cancel", str(run_dir)]) == 1
            assert "nothing was signalled" in capsys.readouterr().err
            assert bystander.poll() is None, "an unrelated process was signalled"
        slurm = {**job, "cluster": "slurm", "job_id": "1; touch pwned"}
        (run_dir / "run.json").write_text(json.dumps({"name": "edited", "state": "RUNNING", "submissions": [slurm]}))
        assert segjobs(["cancel", str(run_dir)]) == 2
        assert "is not a SLURM job id" in capsys.readouterr().err
        assert runs.read_run(run_dir)["state"] == "RUNNING"
    finally:
        bystander.kill()
        bystander.wait()


def test_process_identity_tells_a_recycled_pid():
    me = runs.this_process()
    assert runs.process_is(me["pid"], me["pid_start"])
    assert not runs.process_is(me["pid"], me["pid_start"] + 1)
    assert not runs.process_is(me["pid"], None) and not runs.process_is("-1", 0) and not runs.process_is("1 2", 0)


# ---- 2. nothing is lost -------------------------------------------------------------------------------------
def test_a_foreign_output_dir_is_refused_and_left_as_it_was(shard_root, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my notes")
    (foreign / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    before = tree(foreign)
    spec = write_spec(tmp_path, shard_root, "segmenter", name="mine")  # output_dir: tmp_path / "mine"
    for command in (["train", str(spec)], ["submit", str(spec), "--cluster", "local"]):
        assert segjobs(command) == 2
        err = capsys.readouterr().err
        assert f"output_dir {foreign} already holds files that no segjobs run wrote (metrics.jsonl, notes.txt)" in err
        assert tree(foreign) == before and sorted(p.name for p in foreign.iterdir()) == ["metrics.jsonl", "notes.txt"]


def test_checkpoint_rotation_deletes_only_checkpoints(shard_root, tmp_path, capsys):
    """keep=1 prunes old checkpoints: folders under a step_ or .tmp_step_ name that segjobs did not write stay."""
    spec = trained(tmp_path, shard_root, "rotate", checkpoint={"every_steps": 2, "keep": 1})
    checkpoints = tmp_path / "rotate" / "checkpoints"
    for name in ("step_00000001", ".tmp_step_00000009"):
        (checkpoints / name).mkdir()
        (checkpoints / name / "mine.txt").write_text("precious")
    assert segjobs(["train", str(spec), "--set", "train.max_steps=10"]) == 0
    assert (checkpoints / "step_00000001" / "mine.txt").read_text() == "precious"
    assert (checkpoints / ".tmp_step_00000009" / "mine.txt").read_text() == "precious"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000001", "step_00000010"]
    (checkpoints / "step_00000012").mkdir()  # newer than the latest checkpoint: checked, and set aside
    (checkpoints / "step_00000012" / "mine.txt").write_text("precious")
    assert segjobs(["train", str(spec), "--set", "train.max_steps=12"]) == 0
    assert (checkpoints / "damaged_step_00000012" / "mine.txt").read_text() == "precious"
    assert layout.verify(checkpoints / "step_00000012") is None


def test_synth_never_overwrites_without_force(tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"real photo")
    assert segjobs(["synth", "ade20k", str(out), "--train", "2", "--val", "1", "--size", "32x32"]) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert tree(out) == {"holiday.jpg": hashlib.sha256(b"real photo").hexdigest()}
    assert segjobs(["synth", "ade20k", str(out), "--train", "2", "--val", "1", "--size", "32x32", "--force"]) == 0


def test_shard_lists_shards_of_another_source_and_replaces_them_only_with_force(synth_root, tmp_path, capsys):
    out = tmp_path / "shards"
    assert segjobs(["shard", "ade20k", str(synth_root), str(out), "--splits", "training", "--samples-per-shard", "7"]) == 0
    other = tmp_path / "other" / "ADEChallengeData2016"
    assert segjobs(["synth", "ade20k", str(other), "--train", "10", "--val", "1", "--size", "32x32", "--seed", "9"]) == 0
    before = tree(out)
    capsys.readouterr()
    assert segjobs(["shard", "ade20k", str(other), str(out), "--splits", "training", "--samples-per-shard", "7"]) == 2
    err = capsys.readouterr().err
    assert "holds 6 shard(s) that were not written from this source: ade20k-training-000000.tar" in err and "--force" in err
    assert tree(out) == before
    # The same source again: its own shards, reused without --force.
    assert segjobs(["shard", "ade20k", str(synth_root), str(out), "--splits", "training", "--samples-per-shard", "7"]) == 0
    assert tree(out) == before
    assert segjobs(["shard", "ade20k", str(other), str(out), "--splits", "training", "--samples-per-shard", "7", "--force"]) == 0
    assert sorted(p.name for p in (out / "training").glob("*.tar")) == ["ade20k-training-000000.tar", "ade20k-training-000001.tar"]
    assert segjobs(["shard", "verify", str(out / "training")]) == 0


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint(shard_root, tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path, shard_root, "segmenter", name="full", train={"max_steps": 6, "precision": "no"},
                      checkpoint={"every_steps": 3})
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "step_00000006" in str(path):  # the disk fills up during the second checkpoint
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert segjobs(["train", str(spec)]) == 1
    err = capsys.readouterr().err
    checkpoints = tmp_path / "full" / "checkpoints"
    assert f"{checkpoints}: no space left to write the checkpoint of step 6" in err and "GiB free there" in err
    assert f"the last checkpoint, {checkpoints / 'step_00000003'}, is intact" in err and "Traceback" not in err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000003"]
    assert layout.verify(checkpoints / "step_00000003") is None
    assert runs.read_run(tmp_path / "full")["state"] == "FAILED"


def test_a_half_written_metrics_line_is_skipped_everywhere(shard_root, tmp_path, capsys):
    trained(tmp_path, shard_root, "whole", checkpoint={"every_steps": 3})
    spec = trained(tmp_path, shard_root, "cut", checkpoint={"every_steps": 3})
    run_dir = tmp_path / "cut"
    shutil.rmtree(run_dir / "checkpoints" / "step_00000006")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "epoch": 0, "lo')  # killed mid-write
    capsys.readouterr()
    assert segjobs(["status", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["step"] == 6
    assert segjobs(["visualize", str(run_dir), "--curves"]) == 0
    assert segjobs(["train", str(spec)]) == 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)
    assert same_losses(run_dir, tmp_path / "whole")


def test_the_suite_never_writes_the_users_run_index():
    """Module-scoped fixtures and SLURM test jobs run outside the per-test SEGJOBS_HOME: the session sets one."""
    from tests.conftest import SESSION_HOME

    assert SESSION_HOME.resolve() != (Path.home() / ".segjobs").resolve()
    assert SESSION_HOME.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())


# ---- 3. one writer per run ----------------------------------------------------------------------------------
def test_a_second_trainer_is_refused_while_the_first_runs(shard_root, tmp_path, capsys, caplog):
    spec = write_spec(tmp_path, shard_root, "segmenter", name="busy", train={"max_steps": 100000, "precision": "no"},
                      checkpoint={"every_steps": 5})
    first = subprocess.Popen([sys.executable, "-m", "launcher.cli", "train", str(spec)], cwd=REPO, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    run_dir = tmp_path / "busy"
    try:
        deadline = time.monotonic() + 120
        while not list((run_dir / "checkpoints").glob("step_*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert segjobs(["train", str(spec)]) == 1
        err = capsys.readouterr().err
        assert f"the run is being trained by pid {first.pid} on {socket.gethostname()}" in err
        assert segjobs(["submit", str(spec), "--cluster", "local"]) == 1
        assert f"pid {first.pid} on {socket.gethostname()}" in capsys.readouterr().err
        assert runs.read_run(run_dir)["state"] == "RUNNING"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # SIGKILL left the lock behind; its holder is dead on this host, so the next start takes it over.
    assert runlock.lock_holder(run_dir)["pid"] == first.pid
    assert segjobs(["train", str(spec), "--set", "train.max_steps=5"]) == 0
    assert f"taking over the run lock of pid {first.pid}" in caplog.text and "has ended" in caplog.text
    assert runlock.lock_holder(run_dir) is None


def fake_holder(run_dir: Path, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    holder = {"host": "node-17", "pid": 4242, "pid_start": 1, "job_id": None, "since": now, "heartbeat": now, **fields}
    (run_dir / "run.lock").write_text(json.dumps(holder))


def test_a_run_lock_is_stale_exactly_when_its_holder_is_gone(tmp_path, caplog):
    run_dir = tmp_path / "run"
    fake_holder(run_dir)  # alive elsewhere, fresh heartbeat
    with pytest.raises(runs.RunLockedError, match="being trained by pid 4242 on node-17"):
        runlock.RunLock(run_dir).acquire()
    fake_holder(run_dir, job_id="77")
    with pytest.raises(runs.RunLockedError):
        runlock.RunLock(run_dir, job_running=lambda job: None).acquire()  # SLURM cannot tell: not stale
    cases = [({"heartbeat": time.time() - 301}, {}, "heartbeat is older than 300 s"),
             ({"job_id": "77"}, {"job_id": "77"}, "earlier start of this job 77"),
             ({"job_id": "77"}, {"job_running": lambda job: False}, "SLURM no longer runs its job 77"),
             ({"host": socket.gethostname(), "pid": 999999999}, {}, "has ended")]
    for holder, options, reason in cases:
        fake_holder(run_dir, **holder)
        caplog.clear()
        with runlock.RunLock(run_dir, **options):
            assert runlock.lock_holder(run_dir)["pid"] == os.getpid()
        assert reason in caplog.text and runlock.lock_holder(run_dir) is None


def test_the_heartbeat_renews_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    with runlock.RunLock(tmp_path / "run"):
        first = runlock.lock_holder(tmp_path / "run")["heartbeat"]
        time.sleep(0.3)
        assert runlock.lock_holder(tmp_path / "run")["heartbeat"] > first


# ---- 4. checkpoints that check themselves -------------------------------------------------------------------
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_before_it(shard_root, tmp_path, capsys):
    trained(tmp_path, shard_root, "whole", checkpoint={"every_steps": 2})
    spec = trained(tmp_path, shard_root, "damaged", checkpoint={"every_steps": 2})
    checkpoints = tmp_path / "damaged" / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000006")
    shared = checkpoints / "step_00000004" / "shared.pt"
    shared.write_bytes(shared.read_bytes()[:1000])  # truncated
    (checkpoints / "step_00000002" / "meta.json").rename(checkpoints / "step_00000002" / "meta.json.bak")
    assert segjobs(["eval", str(tmp_path / "damaged")]) == 1  # none intact: nothing to evaluate
    assert "every checkpoint is damaged; nothing was loaded" in capsys.readouterr().err
    assert layout.verify(checkpoints / "step_00000004") == "shared.pt has 1000 bytes, meta.json records " + str(
        json.loads((checkpoints / "step_00000004" / "meta.json").read_text())["files"]["shared.pt"]["bytes"])
    assert segjobs(["train", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "no intact checkpoint to resume from: step_00000004: shared.pt has 1000 bytes" in err
    assert "step_00000002: meta.json is missing" in err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["damaged_step_00000002", "damaged_step_00000004"]


def test_resume_skips_a_damaged_checkpoint_and_matches_an_uninterrupted_run(shard_root, tmp_path, caplog):
    trained(tmp_path, shard_root, "whole", checkpoint={"every_steps": 3})
    spec = trained(tmp_path, shard_root, "skip", checkpoint={"every_steps": 3})
    checkpoints = tmp_path / "skip" / "checkpoints"
    rank = checkpoints / "step_00000006" / "rank_00000.pt"
    data = bytearray(rank.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped
    rank.write_bytes(bytes(data))
    assert segjobs(["train", str(spec), "--set", "train.max_steps=6"]) == 0
    assert "rank_00000.pt does not match its sha256" in caplog.text
    assert sorted(p.name for p in checkpoints.iterdir()) == ["damaged_step_00000006", "step_00000003", "step_00000006"]
    assert same_losses(tmp_path / "skip", tmp_path / "whole")


# ---- 5. exact resume for DINO ---------------------------------------------------------------------------------
def test_dino_resumed_inside_the_frozen_epoch_matches_past_the_unfreeze(shard_root, tmp_path):
    """40 samples, batch 4: epoch 0 is steps 1-10, the last layer is frozen in it and trains from step 11."""
    sections = {"train": {"max_steps": 13, "precision": "no", "log_every": 1}, "checkpoint": {"every_steps": 3}}
    assert segjobs(["train", str(write_spec(tmp_path, shard_root, "dino", name="whole", **sections))]) == 0
    spec = write_spec(tmp_path, shard_root, "dino", name="resumed", **sections)
    assert segjobs(["train", str(spec)]) == 0
    for later in (tmp_path / "resumed" / "checkpoints").glob("step_*"):
        if later.name != "step_00000003":
            shutil.rmtree(later)
    assert segjobs(["train", str(spec)]) == 0
    assert same_losses(tmp_path / "resumed", tmp_path / "whole")
