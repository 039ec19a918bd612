"""W-Net as the paper trains it (Xia & Kulis 2017, Algorithm 1): per batch, an N-cut step that updates U-Enc
alone, then a reconstruction step that updates both U-Nets. Two batches through segjobs' task against a
restatement with the loss written from the paper's equations and plain SGD, the step learning-rate decay
included."""

from __future__ import annotations

import copy

import pytest
import torch

from launcher.training.families.base import StepContext
from launcher.training.families.wnet import WNetTask
from launcher.training.trainer import apply_schedules
from tests.jobspecs import parity_task

# Dropout 0: with batch norm over 2 images, dropout amplifies float32 rounding between the two paths beyond any
# useful tolerance; the steps, losses, optimizers and schedule are what is compared.
SPEC = {"name": "parity", "model": {"name": "wnet_tiny", "options": {"base_channels": 8, "levels": 3, "num_segments": 4,
                                                                     "dropout": 0.0}},
        "data": {"train": "unused", "batch_size": 2, "image_size": 16},
        "optim": {"kind": "sgd", "lr": 0.003, "momentum": 0.9},
        "schedule": {"kind": "step", "step_size": 2, "gamma": 0.1},
        "train": {"max_steps": 10, "precision": "no"},
        "wnet": {"radius": 3, "sigma_i": 10, "sigma_x": 4}}


def soft_ncut(probs, image, radius, sigma_i, sigma_x):
    """J_soft-Ncut = K - sum_k (sum_ij w_ij p_ik p_jk) / (sum_ij w_ij p_ik), w_ij = exp(-|F_i - F_j|^2 / sigma_i^2)
    exp(-|X_i - X_j|^2 / sigma_x^2) within `radius` (the paper's equation 3), from the full affinity matrix."""
    batch, k, height, width = probs.shape
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    position = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    distance = torch.cdist(position, position)
    losses = []
    for p, f in zip(probs.flatten(2), image.flatten(2)):
        colour = torch.cdist(f.T, f.T)
        w = torch.exp(-colour.square() / sigma_i**2) * torch.exp(-distance.square() / sigma_x**2) * (distance < radius)
        losses.append(k - sum((p[c] @ w @ p[c]) / (p[c] @ w.sum(1)) for c in range(k)))
    return torch.stack(losses).mean()


def test_two_batches_equal_the_papers_alternating_steps():
    torch.manual_seed(0)
    spec, horizon, accelerator, task = parity_task(WNetTask, SPEC, steps_per_epoch=5, global_batch=2)
    reference = copy.deepcopy(task.model)
    encoder_sgd = torch.optim.SGD(reference.encoder.parameters(), lr=0.003, momentum=0.9)
    both_sgd = torch.optim.SGD(reference.parameters(), lr=0.003, momentum=0.9)
    initial = [p.detach().clone() for p in reference.parameters()]
    generator = torch.Generator().manual_seed(1)
    for step in (1, 2):  # the learning rate is divided by 10 at step 2
        pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=generator)
        apply_schedules(task.optimizers, WNetTask.schedules(spec, horizon), float(step))
        ours = task.train_step({"image": pixels}, StepContext(step=step, epoch=0, position=float(step), accelerator=accelerator))

        lr = 0.003 * 0.1 ** (step // 2)
        for group in [*encoder_sgd.param_groups, *both_sgd.param_groups]:
            group["lr"] = lr
        images = (pixels.float() / 255).contiguous(memory_format=torch.channels_last)  # as the task feeds convolutions
        probs, _ = reference(images, decode=False)
        ncut = soft_ncut(probs, pixels.float(), radius=3, sigma_i=10, sigma_x=4)
        encoder_sgd.zero_grad()
        ncut.backward()
        encoder_sgd.step()
        _, rebuilt = reference(images)
        reconstruction = (images - rebuilt).square().sum() / len(images)  # ||X - U_Dec(U_Enc(X))||^2 per image
        both_sgd.zero_grad()
        reconstruction.backward()
        both_sgd.step()

        assert ours["ncut"].item() == pytest.approx(ncut.item(), abs=1e-5)
        assert ours["reconstruction"].item() == pytest.approx(reconstruction.item(), rel=1e-5)
        assert [g["lr"] for o in task.optimizers for g in o.param_groups] == pytest.approx([lr] * 4)
        # Within 1e-3 of the largest change of any weight since the start (~1: the reconstruction is summed per
        # image), where float32 rounds differently along the two paths: up to 3.5e-4 with one thread, whose
        # convolutions sum in another order, 7e-6 with two. A wrong rate or step is off by its whole change.
        moved = max((theirs - start).abs().max().item() for theirs, start in zip(reference.parameters(), initial))
        for (name, mine), theirs, start in zip(task.model.named_parameters(), reference.parameters(), initial):
            assert not torch.equal(theirs, start) and torch.allclose(mine, theirs, rtol=0, atol=1e-3 * moved), \
                f"{name} after step {step}"
