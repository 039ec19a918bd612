"""The trainer: specs, every family's steps, exact resume after a kill, DDP and FSDP on CPU, atomic checkpoints."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from launcher.training.checkpointer import Checkpointer
from launcher.cli import main as segjobs
from launcher.training.metrics import SegmentationMetric
from tests.jobspecs import losses, same_losses, write_spec

REPO = Path(__file__).resolve().parents[1]
@pytest.fixture(autouse=True)
def one_thread():
    """CPU kernels reduce in an order that depends on the thread count: every run here uses one thread, like
    the training subprocesses (OMP_NUM_THREADS=1), so that losses can be compared for equality."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def torchrun(nproc: int, spec: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "launcher.train", str(spec), *(f"--set={o}" for o in overrides)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def kill_after_checkpoint(command: list[str], checkpoint: Path) -> None:
    """Start a training process and SIGKILL it as soon as `checkpoint` exists."""
    log = checkpoint.parent.parent.parent / f"{checkpoint.parent.parent.name}.stderr"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, f"the run ended before it could be killed: {log.read_text()[-3000:]}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("family", ["segmenter", "wnet", "dino"])
def test_killed_run_resumes_with_identical_losses(family, workers, shard_root, tmp_path):
    """A run is a function of (spec, seed, world size): the loader workers change nothing, killed or not."""
    whole = write_spec(tmp_path, shard_root, family, name="whole")
    assert segjobs(["train", str(whole)]) == 0
    expected = losses(tmp_path / "whole")
    assert sorted(expected) == list(range(1, 9))

    killed = write_spec(tmp_path, shard_root, family, name="killed", data={"num_workers": workers})
    kill_after_checkpoint([sys.executable, "-m", "launcher.cli", "train", str(killed)],
                          tmp_path / "killed" / "checkpoints" / "step_00000003")
    resumed_from = max(Checkpointer(tmp_path / "killed" / "checkpoints", 5).steps())
    assert 3 <= resumed_from < 8
    assert segjobs(["train", str(killed)]) == 0
    assert same_losses(tmp_path / "killed", tmp_path / "whole")  # float equality, every step (on the CPU)
    evals = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines() if "eval" in line]
    assert evals and 0.0 <= evals[-1]["eval"]["miou"] <= 1.0


@pytest.mark.parametrize("family", ["segmenter", "dino"])
def test_photometric_on_the_device_resumes_exactly_and_refuses_a_switch(family, shard_root, tmp_path, capsys):
    """data.photometric: device draws in the loader and colours on the device (the CPU here): a killed run resumes
    with identical losses, and resuming it with the photometric steps back in the loader is refused."""
    device = {"photometric": "device"}
    whole = write_spec(tmp_path, shard_root, family, name="whole", data=device)
    assert segjobs(["train", str(whole)]) == 0
    assert yaml.safe_load((tmp_path / "whole" / "spec.yaml").read_text())["data"]["photometric"] == "device"
    loader = write_spec(tmp_path, shard_root, family, name="loader", data={"photometric": "auto"}, train={"max_steps": 2})
    assert segjobs(["train", str(loader)]) == 0  # auto on the CPU: the loader's Pillow path
    first, first_on_device = losses(tmp_path / "loader")[1], losses(tmp_path / "whole")[1]
    assert first != first_on_device and first == pytest.approx(first_on_device, rel=1e-3)  # the same augmentation

    killed = write_spec(tmp_path, shard_root, family, name="killed", data=device)
    kill_after_checkpoint([sys.executable, "-m", "launcher.cli", "train", str(killed)],
                          tmp_path / "killed" / "checkpoints" / "step_00000003")
    capsys.readouterr()
    assert segjobs(["train", str(killed), "--set", "data.photometric=loader"]) == 2
    assert "data.photometric: 'device' -> 'loader'" in capsys.readouterr().err
    assert segjobs(["train", str(killed)]) == 0
    assert same_losses(tmp_path / "killed", tmp_path / "whole")


def test_demo_specs_validate_and_take_steps(shard_root, tmp_path):
    for spec_file in sorted((REPO / "jobs").glob("demo_*.yaml")):
        name = spec_file.stem
        overrides = [f"data.train={shard_root / 'training'}", f"data.val={shard_root / 'validation'}",
                     "train.max_steps=2", "data.num_workers=0", f"output_dir={tmp_path / name}", "data.batch_size=2"]
        assert segjobs(["train", str(spec_file), *[a for o in overrides for a in ("--set", o)]]) == 0, name
        assert sorted(losses(tmp_path / name))[-1] == 2


def test_every_job_spec_is_valid():
    from launcher.spec import load_spec

    names = sorted(p.name for p in (REPO / "jobs").glob("*.yaml"))
    for name in names:
        load_spec(REPO / "jobs" / name)
    assert {"dino_vits8.yaml", "dino_vits16.yaml", "segmenter_tiny16.yaml", "segmenter_base8.yaml",
            "segmenter_small16.yaml", "wnet.yaml", "demo_segmenter.yaml", "demo_wnet.yaml", "demo_dino.yaml"} <= set(names)


@pytest.mark.parametrize("change, message", [
    ({"data": {"batch_sise": 4}}, "unknown key data.batch_sise; did you mean data.batch_size?"),
    ({"train": {"max_steps": "ten"}}, "train.max_steps: input should be a valid integer"),
    ({"optim": {"lr": -1}}, "optim.lr: input should be greater than 0; found -1"),
    ({"model": {"name": "segmenter_t16_mask_x"}}, "model.name: 'segmenter_t16_mask_x' is not a registered model; did you mean segmenter_t16_mask?"),
    ({"data": {"train": "/nonexistent/shards"}}, "data.train: /nonexistent/shards does not exist"),
])
def test_bad_specs_exit_2_with_one_paragraph_and_write_nothing(change, message, shard_root, tmp_path, capsys):
    spec_path = write_spec(tmp_path, shard_root, "segmenter", name="bad")
    spec = yaml.safe_load(spec_path.read_text())
    for section, values in change.items():
        spec[section].update(values)
    spec_path.write_text(yaml.safe_dump(spec))
    assert segjobs(["train", str(spec_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(spec_path) in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_unknown_override_is_refused(shard_root, tmp_path, capsys):
    spec = write_spec(tmp_path, shard_root, "segmenter", name="x")
    assert segjobs(["train", str(spec), "--set", "train.max_step=3"]) == 2
    assert "did you mean train.max_steps?" in capsys.readouterr().err


def test_resume_with_another_architecture_is_refused(shard_root, tmp_path, capsys):
    spec = write_spec(tmp_path, shard_root, "segmenter", name="arch", train={"max_steps": 3})
    assert segjobs(["train", str(spec)]) == 0
    capsys.readouterr()
    saved_spec = (tmp_path / "arch" / "spec.yaml").read_text()
    assert segjobs(["train", str(spec), "--set", "model.name=segmenter_t16_mask"]) == 2
    assert "model.name changed since the checkpoint" in capsys.readouterr().err
    assert (tmp_path / "arch" / "spec.yaml").read_text() == saved_spec
    assert segjobs(["train", str(spec), "--set", "train.max_steps=5", "--set", "train.log_every=2"]) == 0  # safe changes


def test_ddp_two_processes_resume_exactly_and_elastically(shard_root, tmp_path):
    whole = write_spec(tmp_path, shard_root, "segmenter", name="ddp_whole", data={"batch_size": 2})
    result = torchrun(2, whole)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = losses(tmp_path / "ddp_whole")
    assert sorted(expected) == list(range(1, 9))

    killed = write_spec(tmp_path, shard_root, "segmenter", name="ddp_killed", data={"batch_size": 2})
    kill_after_checkpoint([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "launcher.train", str(killed)], tmp_path / "ddp_killed" / "checkpoints" / "step_00000003")
    result = torchrun(2, killed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path / "ddp_killed") == pytest.approx(expected, abs=1e-6)  # gloo all-reduce order may vary

    elastic = run_cli("train", str(killed), "--set", "train.max_steps=10")
    assert elastic.returncode == 0, elastic.stderr[-3000:]
    assert "with 1 processes instead of 2 (elastic" in elastic.stderr
    assert sorted(losses(tmp_path / "ddp_killed"))[-1] == 10


def test_fsdp_two_processes_train_like_ddp_and_resume(shard_root, tmp_path):
    ddp = write_spec(tmp_path, shard_root, "dino", name="ddp", data={"batch_size": 2}, train={"max_steps": 4})
    fsdp = write_spec(tmp_path, shard_root, "dino", name="fsdp", data={"batch_size": 2},
                      train={"max_steps": 4, "strategy": "fsdp"})
    for spec in (ddp, fsdp):
        result = torchrun(2, spec)
        assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-4)
    result = torchrun(2, fsdp, "train.max_steps=6")  # resumes from the FSDP checkpoint at step 4
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and sorted(losses(tmp_path / "fsdp"))[-1] == 6


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep=3)
    checkpointer.save(10, {"model": {"w": torch.ones(2)}}, {"resume": {}})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save(20, {"model": {"w": torch.zeros(2)}}, {"resume": {}})
    monkeypatch.undo()
    assert checkpointer.steps() == [10] and (tmp_path / "checkpoints" / ".tmp_step_00000020").exists()
    shared, meta, _ = checkpointer.load(checkpointer.latest())
    assert torch.equal(shared["model"]["w"], torch.ones(2)) and meta["step"] == 10
    checkpointer.save(30, {"model": {"w": torch.zeros(2)}}, {"resume": {}})
    assert checkpointer.steps() == [10, 30] and not (tmp_path / "checkpoints" / ".tmp_step_00000020").exists()


def test_retention_keeps_the_newest(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        checkpointer.save(step, {}, {"resume": {}})
    assert checkpointer.steps() == [3, 4]


def test_segmentation_metric_against_a_hand_computed_confusion_matrix():
    metric = SegmentationMetric(num_classes=3)
    metric.update(torch.tensor([[0, 0, 1], [1, 2, 2]]), torch.tensor([[0, 1, 1], [255, 2, 0]]))
    metric.update(torch.tensor([2]), torch.tensor([2]))
    # pairs (pred, true): (0,0) (0,1) (1,1) (2,2) (2,0) (2,2); the 255 pixel is ignored
    # class 0: I=1, U=2+2-1=3; class 1: I=1, U=2+1-1=2; class 2: I=2, U=2+3-2=3
    result = metric.compute()
    assert result["iou"] == pytest.approx([1 / 3, 1 / 2, 2 / 3])
    assert result["miou"] == pytest.approx((1 / 3 + 1 / 2 + 2 / 3) / 3)
    assert result["pixel_acc"] == pytest.approx(4 / 6)


def test_unsupervised_metric_matches_clusters_to_classes():
    metric = SegmentationMetric(num_classes=2, num_predicted=3)
    metric.update(torch.tensor([2, 2, 0, 1]), torch.tensor([0, 0, 1, 1]))
    result = metric.compute()
    # cluster 2 -> class 0 (2 px); one of clusters 0/1 -> class 1, the other unmatched
    assert result["iou"] == pytest.approx([1.0, 0.5]) and result["pixel_acc"] == pytest.approx(0.75)


def test_the_seed_shortcut_maps_to_spec_fields(shard_root, tmp_path):
    from launcher.commands.train import shortcut

    spec, overrides = shortcut("segmenter", 16, 30, 0.001, "", ["train.log_every=5"])
    assert spec.endswith("jobs/segmenter_tiny16.yaml")
    assert overrides == ["data.batch_size=16", "train.epochs=30", "train.max_steps=null", "optim.lr=0.001",
                         "model.name=segmenter_s16_mask", "model.pretrained=dino_vits16", "train.log_every=5"]
    run_dir = tmp_path / "short"
    assert segjobs(["train", "--model=wnet", "--batch-size=2", "--epochs=1", "--learning-rate=0.01",
                    "--set", f"data.train={shard_root / 'training'}", "--set", "data.val=null", "--set", "train.max_steps=1",
                    "--set", "data.image_size=32", "--set", "model.options={base_channels: 8, levels: 3}",
                    "--set", "data.num_workers=0", "--set", f"output_dir={run_dir}"]) == 0
    assert losses(run_dir) and yaml.safe_load((run_dir / "spec.yaml").read_text())["optim"]["lr"] == 0.01


def test_readme_spec_reference_is_generated_from_the_schema():
    from launcher.spec import spec_reference

    readme = (REPO / "README.md").read_text()
    embedded = readme.split("<!-- spec-reference:start -->\n", 1)[1].split("<!-- spec-reference:end -->", 1)[0]
    assert embedded == spec_reference(), "README's spec reference is stale: run tools/update_readme.py"


def test_weight_decay_groups_do_not_depend_on_a_ddp_wrapper():
    from launcher.training.families.base import param_groups

    class Network(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 3))
            self.proj = torch.nn.Linear(3, 3)

        def no_weight_decay(self):
            return {"pos_embed"}

    class Wrapper(torch.nn.Module):  # what DDP looks like to param_groups: the network under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    network = Network()
    plain, wrapped = param_groups(network, 0.1), param_groups(Wrapper(network), 0.1)
    assert [[id(p) for p in g["params"]] for g in plain] == [[id(p) for p in g["params"]] for g in wrapped]
    decayed = {id(p) for p in plain[0]["params"]}
    assert decayed == {id(network.proj.weight)}  # pos_embed (no_weight_decay) and the bias do not decay


def test_segmenter_statistics_are_resolved_from_the_weights_and_recorded(shard_root, tmp_path):
    """data.normalization unset: vit for a timm ViT file; spec.yaml and the checkpoint carry it, so evaluation
    normalises as training did without the file."""
    import timm
    from safetensors.torch import save_file

    from launcher.training.restore import restore

    weights = tmp_path / "vit_tiny_patch16_384.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), str(weights))
    spec_file = write_spec(tmp_path, shard_root, "segmenter", name="vitstats", model={"pretrained": str(weights)},
                           train={"max_steps": 2})
    assert segjobs(["train", str(spec_file)]) == 0
    assert yaml.safe_load((tmp_path / "vitstats" / "spec.yaml").read_text())["data"]["normalization"] == "vit"
    weights.unlink()
    spec, task, _, _ = restore(str(tmp_path / "vitstats"))
    assert spec.data.normalization == "vit" and task.mean == (0.5, 0.5, 0.5)


def test_a_recipe_without_its_pretrained_file_refuses_to_start(shard_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert segjobs(["train", str(REPO / "jobs" / "segmenter_tiny16.yaml"), "--set", f"data.train={shard_root / 'training'}",
                    "--set", "data.val=null"]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained" in err and "vit_tiny_patch16_384" in err and "model.pretrained: null" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("optimizer, finite", [([], True), (["optim.kind=sgd", "optim.momentum=0.9"], False)],
                         ids=["the recipe's Adam", "SGD"])
def test_the_wnet_recipe_trains_on_224_crops_with_the_summed_reconstruction(optimizer, finite, shard_root, tmp_path):
    """jobs/wnet.yaml's optimizer, learning rate and summed reconstruction (on W-Net-Tiny, batch 2): Adam keeps
    the losses finite and the reconstruction falling; SGD at the paper's lr 0.003 blows up within 6 steps."""
    run_dir = tmp_path / "wnet224"
    overrides = ["model.name=wnet_tiny", f"data.train={shard_root / 'training'}", "data.val=null", "data.batch_size=2",
                 "data.num_workers=0", "train.max_steps=6", "train.log_every=1", "train.precision='no'", f"output_dir={run_dir}",
                 *optimizer]
    code = segjobs(["train", str(REPO / "jobs" / "wnet.yaml"), *[a for o in overrides for a in ("--set", o)]])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if finite:
        assert code == 0 and all(math.isfinite(r["loss"]) for r in records)
        assert records[-1]["reconstruction"] < records[0]["reconstruction"]
    else:
        assert code == 1 or not all(math.isfinite(r["loss"]) and r["loss"] < 1e8 for r in records)


def test_a_resume_refuses_what_an_older_checkpoint_trained_differently():
    """Checkpoints from before data.normalization and wnet.reconstruction were recorded trained with ImageNet
    statistics and the mean reconstruction: resuming them under other values is refused, not done silently."""
    from launcher.spec import parse_spec, resume_conflict

    def spec(model, **sections):
        return parse_spec({"name": "r", "model": {"name": model}, "data": {"train": "x"}, "train": {"max_steps": 5},
                           **sections}, "test")

    def older(model):  # a fingerprint without the newer keys
        return {"model.name": model, "model.options": {}, "optim.kind": "adamw", "seed": 0}

    assert "wnet.reconstruction: 'mean' -> 'sum'" in resume_conflict(older("wnet_tiny"), spec("wnet_tiny"))
    assert resume_conflict(older("wnet_tiny"), spec("wnet_tiny", wnet={"reconstruction": "mean"})) is None
    assert resume_conflict(older("segmenter_t16_mask"), spec("segmenter_t16_mask")) is None  # resolved at start
    assert "'imagenet' -> 'vit'" in resume_conflict(older("segmenter_t16_mask"),
                                                   spec("segmenter_t16_mask", data={"train": "x", "normalization": "vit"}))
    assert resume_conflict(older("dino_vits16"), spec("dino_vits16")) is None  # neither key applies to DINO
    # They coloured in the loader: "auto" is checked once resolved, an explicit "device" is refused up front.
    assert resume_conflict(older("dino_vits16"), spec("dino_vits16", data={"train": "x", "photometric": "device"}))
    assert resume_conflict(older("wnet_tiny"), spec("wnet_tiny", wnet={"reconstruction": "mean"},
                                                    data={"train": "x", "photometric": "device"})) is None


def test_image_only_validation_shards_are_refused_before_training(synth_copy, shard_root, tmp_path, capsys):
    """Evaluation needs labels: image-only shards as data.val stop the run before its first step (not at its
    final evaluation), and `segjobs eval --split` on them exits 2 as well."""
    import shutil

    shutil.rmtree(synth_copy / "annotations" / "validation")
    shards = tmp_path / "image_only"
    assert segjobs(["shard", "ade20k", str(synth_copy), str(shards)]) == 0
    spec = write_spec(tmp_path, shard_root, "segmenter", name="unlabelled", data={"val": str(shards / "validation")})
    capsys.readouterr()
    assert segjobs(["train", str(spec)]) == 2
    assert "data.val" in capsys.readouterr().err and not (tmp_path / "unlabelled").exists()
    trained = write_spec(tmp_path, shard_root, "segmenter", name="labelled", train={"max_steps": 1})
    assert segjobs(["train", str(trained)]) == 0
    capsys.readouterr()
    assert segjobs(["eval", str(tmp_path / "labelled"), "--set", f"data.val={shards / 'validation'}"]) == 2
    assert "image-only shards" in capsys.readouterr().err
