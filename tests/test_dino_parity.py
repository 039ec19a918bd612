"""DINO as main_dino.py trains it: one optimizer step through segjobs' trainer code against a functional
restatement of the reference's train_one_epoch step, and `segjobs plan` against the reference's schedules."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from launcher.cli import main as segjobs
from launcher.spec import parse_spec
from launcher.training.families.base import StepContext, normalize
from launcher.training.families.dino import DinoTask
from launcher.training.parallel import build_accelerator
from launcher.training.schedules import Horizon
from launcher.training.trainer import apply_schedules
from tests.jobspecs import parity_task, write_spec

REPO = Path(__file__).resolve().parents[1]


# ---- the reference, restated (facebookresearch/dino: utils.py, main_dino.py) --------------------------------
def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


def get_params_groups(model):
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or len(param.shape) == 1 else regularized).append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def dino_loss(student_output, teacher_output, center, temp, ncrops, student_temp=0.1):
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / temp, dim=-1).detach().chunk(2)
    total, terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            terms += 1
    return total / terms


def reference_step(student, teacher, center, images, it, epoch, lr_schedule, wd_schedule, momentum_schedule,
                   teacher_temps, clip, freeze_last_layer, optimizer):
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr_schedule[it]
        if i == 0:  # only the first group is regularized
            group["weight_decay"] = wd_schedule[it]
    teacher_output = teacher(images[:2])
    student_output = student(images)
    loss = dino_loss(student_output, teacher_output, center, teacher_temps[epoch], len(images))
    optimizer.zero_grad()
    loss.backward()
    for p in student.parameters():  # utils.clip_gradients
        if p.grad is not None:
            clip_coef = clip / (p.grad.data.norm(2) + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    if epoch < freeze_last_layer:  # utils.cancel_gradients_last_layer
        for name, p in student.named_parameters():
            if "last_layer" in name:
                p.grad = None
    optimizer.step()
    with torch.no_grad():
        m = momentum_schedule[it]
        for param_q, param_k in zip(student.parameters(), teacher.parameters()):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    return loss, center * 0.9 + batch_center * 0.1


# ---- one step, both ways --------------------------------------------------------------------------------------
SPEC = {"name": "parity", "model": {"name": "dino_vits16", "options": {"out_dim": 64, "img_size": 32}},
        "data": {"train": "unused", "batch_size": 4, "global_crop_size": 32, "local_crop_size": 16, "local_crops": 2},
        "optim": {"kind": "adamw", "lr": 0.0005, "lr_scaling": "linear256", "weight_decay": 0.04, "weight_decay_end": 0.4},
        "schedule": {"kind": "cosine", "warmup_epochs": 1, "min_lr": 1e-6},
        "train": {"epochs": 3, "precision": "no", "clip_grad": 3.0},
        "dino": {"teacher_temp": 0.07, "warmup_teacher_temp": 0.04, "warmup_teacher_temp_epochs": 2,
                 "momentum_teacher": 0.996, "freeze_last_layer": 1}}


@pytest.mark.parametrize("epoch", [0, 1], ids=["last layer frozen", "last layer trained"])
def test_one_step_equals_the_reference_step(epoch):
    torch.manual_seed(0)
    spec, horizon, accelerator, task = parity_task(DinoTask, SPEC, steps_per_epoch=5, global_batch=4)
    device = accelerator.device
    it = epoch * horizon.steps_per_epoch + 2

    student, teacher = copy.deepcopy(task.model), copy.deepcopy(task.teacher)
    center = task.loss.center.clone()
    reference_optimizer = torch.optim.AdamW(get_params_groups(student))
    generator = torch.Generator().manual_seed(1)
    crops = [torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=generator) for size in (32, 32, 16, 16)]

    torch.manual_seed(5)  # drop path in the student: both paths draw the same masks
    apply_schedules(task.optimizers, DinoTask.schedules(spec, horizon), float(it))
    segjobs_loss = task.train_step({"crops": crops}, StepContext(step=it, epoch=epoch, position=float(it), accelerator=accelerator))

    epochs, per_epoch = spec.train.epochs, horizon.steps_per_epoch
    lr_schedule = cosine_scheduler(0.0005 * 4 / 256, 1e-6, epochs, per_epoch, warmup_epochs=1)
    wd_schedule = cosine_scheduler(0.04, 0.4, epochs, per_epoch)
    momentum_schedule = cosine_scheduler(0.996, 1, epochs, per_epoch)
    teacher_temps = np.concatenate((np.linspace(0.04, 0.07, 2), np.ones(epochs - 2) * 0.07))
    torch.manual_seed(5)
    reference_loss, reference_center = reference_step(
        student, teacher, center, [normalize(c.to(device)) for c in crops], it, epoch, lr_schedule, wd_schedule,
        momentum_schedule, teacher_temps, 3.0, 1, reference_optimizer)

    assert segjobs_loss["loss"].item() == pytest.approx(reference_loss.item(), abs=1e-6)
    for (name, ours), theirs in zip(task.model.named_parameters(), student.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-5), f"student {name}"
    for (name, ours), theirs in zip(task.teacher.named_parameters(), teacher.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-5), f"teacher {name}"
    assert torch.allclose(task.loss.center, reference_center, atol=1e-6)
    last_layer = [n for n, p in task.model.named_parameters() if "last_layer" in n and p.requires_grad]
    assert last_layer and all((task.optimizers[0].state.get(p) is not None) == (epoch >= 1)
                              for n, p in task.model.named_parameters() if n in last_layer)


def test_the_teacher_is_built_without_drop_path():
    spec = parse_spec(copy.deepcopy(SPEC), "parity")
    task = DinoTask(spec, build_accelerator("no"), Horizon.of(spec, steps_per_epoch=5, global_batch=4))
    images = [torch.randn(2, 3, 32, 32)] * 2
    with torch.no_grad():
        assert torch.equal(task.teacher(images), task.teacher(images))  # train mode, yet deterministic
        assert not torch.equal(task.model(images), task.model(images))  # the student keeps drop path 0.1
    assert all(torch.equal(a, b) for a, b in zip(task.teacher.state_dict().values(), task.model.state_dict().values()))


def test_parameter_groups_are_the_references():
    spec = parse_spec(copy.deepcopy(SPEC), "parity")
    task = DinoTask(spec, build_accelerator("no"), Horizon.of(spec, steps_per_epoch=5, global_batch=4))
    task.parallel_wrap(lambda module, trainable=True: module)
    ours = [{id(p) for p in g["params"]} for g in task.optimizers[0].param_groups]
    theirs = [{id(p) for p in g["params"]} for g in get_params_groups(task.model)]
    assert ours == theirs
    names = {id(p): n for n, p in task.model.named_parameters()}
    assert {names[i] for i in ours[0]} >= {"backbone.pos_embed", "backbone.cls_token"}  # they decay, as in main_dino.py


# ---- segjobs plan ----------------------------------------------------------------------------------------------
def test_plan_of_the_paper_recipe_is_main_dinos_schedules(capsys):
    """jobs/dino_vits16.yaml on ADE20K's 20,210 training images with the paper's 16 GPUs."""
    assert segjobs(["plan", str(REPO / "jobs" / "dino_vits16.yaml"), "--samples", "20210", "--world-size", "16", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["global_batch"], plan["steps_per_epoch"], plan["total_steps"], plan["epochs"]) == (1024, 19, 1900, 100.0)
    hyper = plan["hyper"]
    assert hyper["lr"] == 0.0005 and hyper["lr_peak"] == pytest.approx(0.002) and hyper["warmup_epochs"] == 10
    expected = {"lr": cosine_scheduler(0.0005 * 1024 / 256, 1e-6, 100, 19, warmup_epochs=10),
                "weight_decay": cosine_scheduler(0.04, 0.4, 100, 19),
                "teacher_momentum": cosine_scheduler(0.996, 1, 100, 19),
                "teacher_temp": np.repeat(np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07)), 19)}
    assert set(plan["schedules"]) == set(expected)
    for name, values in expected.items():
        assert plan["schedules"][name] == pytest.approx(values, abs=1e-12), name
    lr = np.array(plan["schedules"]["lr"])
    assert lr.argmax() == 189 and lr[-1] < 1e-5  # warms up over 10 epochs, then decays to min_lr


def test_what_plan_shows_is_what_runs_and_max_steps_stops_on_the_curve(shard_root, tmp_path, capsys):
    """With epochs and max_steps, the horizon is the epochs' and training stops early on that curve."""
    spec = write_spec(tmp_path, shard_root, "segmenter", name="early",
                      train={"epochs": 3, "max_steps": 6, "precision": "no", "log_every": 1},
                      schedule={"kind": "poly", "warmup_steps": 3}, resources={"gpus_per_node": 1})
    assert segjobs(["plan", str(spec), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["world_size"], plan["steps_per_epoch"], plan["total_steps"], plan["stop_step"]) == (1, 10, 30, 6)
    assert segjobs(["train", str(spec)]) == 0
    records = [json.loads(line) for line in (tmp_path / "early" / "metrics.jsonl").read_text().splitlines()]
    trained = [r["lr"] for r in records if "loss" in r]
    assert trained == plan["schedules"]["lr"][:6]
    # The decay spans the horizon (27 steps after the warmup), not max_steps: poly power 0.9 from 0.001.
    assert plan["schedules"]["lr"][29] == pytest.approx(0.001 * (1 - 26 / 27) ** 0.9, rel=1e-12)
    assert segjobs(["plan", str(spec), "--plot", str(tmp_path / "plan.png")]) == 0
    assert (tmp_path / "plan.png").stat().st_size > 10_000


def test_a_resume_refuses_another_lr_scaling_or_schedule_kind(shard_root, tmp_path, capsys):
    spec = write_spec(tmp_path, shard_root, "segmenter", name="kinds", train={"max_steps": 2, "precision": "no"})
    assert segjobs(["train", str(spec)]) == 0
    for change, key in (("optim.lr_scaling=linear256", "optim.lr_scaling"), ("schedule.kind=poly", "schedule.kind")):
        assert segjobs(["train", str(spec), "--set", change, "--set", "train.max_steps=4"]) == 2
        assert f"{key} changed since the checkpoint" in capsys.readouterr().err


def test_plan_refuses_what_cannot_run(capsys):
    assert segjobs(["plan", str(REPO / "jobs" / "dino_vits16.yaml"), "--samples", "100", "--world-size", "16"]) == 2
    assert "make no batch of 64 on each of 16 processes" in capsys.readouterr().err
