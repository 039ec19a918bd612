"""Segmenter as rstrudel/segmenter trains it: two optimizer steps through segjobs' task against a restatement
of segm/engine.py's step (cross-entropy ignoring 255, timm's `sgd`, which is Nesterov, PolynomialLR), on inputs
normalised with the ViT statistics and padded with 0 after normalising, as mmseg's Pad after Normalize."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import models
from launcher.spec import parse_spec
from launcher.training.families.base import StepContext
from launcher.training.families.segmenter import SegmenterTask, zero_padding
from launcher.training.parallel import build_accelerator
from launcher.training.schedules import Horizon
from launcher.training.trainer import apply_schedules
from tests import reference_impls as ref
from tests.jobspecs import parity_task

SPEC = {"name": "parity", "model": {"name": "segmenter_t16_mask", "options": {"img_size": 32, "num_classes": 5}},
        "data": {"train": "unused", "batch_size": 3, "crop_size": 32, "normalization": "vit"},
        "optim": {"kind": "sgd", "lr": 0.001, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0},
        "schedule": {"kind": "poly", "power": 0.9, "min_lr": 1e-5, "warmup_steps": 0},
        "train": {"epochs": 2, "precision": "no"}}


def polynomial_lr(base_lr, iteration, iter_max, power=0.9, min_lr=1e-5):
    """segm/optim/scheduler.py PolynomialLR without warmup (iter_warmup 0)."""
    return (base_lr - min_lr) * (1 - iteration / iter_max) ** power + min_lr


def reference_step(model, optimizer, images, labels, iteration, iter_max):
    for group in optimizer.param_groups:
        group["lr"] = polynomial_lr(0.001, iteration, iter_max)
    loss = torch.nn.CrossEntropyLoss(ignore_index=255)(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def test_two_steps_equal_the_reference_steps():
    torch.manual_seed(0)
    spec, horizon, accelerator, task = parity_task(SegmenterTask, SPEC, steps_per_epoch=5, global_batch=3)
    reference = copy.deepcopy(task.model)
    initial_cls_emb = task.model.decoder.cls_emb.detach().clone()
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.001, momentum=0.9, nesterov=True, weight_decay=0.0)

    generator = torch.Generator().manual_seed(1)
    valid = torch.tensor([[32, 32], [20, 28], [32, 9]])
    for iteration in (3, 4):
        images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 5, (3, 32, 32), generator=generator)
        normalised = (images.float() / 255 - 0.5) / 0.5  # segm's "vit" statistics
        for index, (height, width) in enumerate(valid.tolist()):  # the crop padded after Normalize
            labels[index, height:], labels[index, :, width:] = 255, 255
            normalised[index, :, height:], normalised[index, :, :, width:] = 0.0, 0.0
            images[index, :, height:], images[index, :, :, width:] = 0, 0  # what SegmenterTrain ships

        torch.manual_seed(10 + iteration)  # drop path and dropout draw the same masks both ways
        apply_schedules(task.optimizers, SegmenterTask.schedules(spec, horizon), float(iteration))
        ours = task.train_step({"image": images, "label": labels.to(torch.uint8), "valid": valid},
                               StepContext(step=iteration, epoch=0, position=float(iteration), accelerator=accelerator))
        torch.manual_seed(10 + iteration)
        theirs = reference_step(reference, reference_optimizer, normalised, labels, iteration, iter_max=10)

        assert ours["loss"].item() == pytest.approx(theirs.item(), abs=1e-6)
        assert task.optimizers[0].param_groups[0]["lr"] == pytest.approx(polynomial_lr(0.001, iteration, 10), rel=1e-12)
        for (name, mine), other in zip(task.model.named_parameters(), reference.parameters()):
            assert torch.allclose(mine, other, atol=1e-5), f"{name} after iteration {iteration}"
    assert not torch.equal(task.model.decoder.cls_emb, initial_cls_emb)  # the steps did train


def test_decoders_start_as_the_reference_initialises_them():
    """segm/model/utils.py init_weights on every decoder layer; class embeddings truncated normal 0.02."""
    torch.manual_seed(0)
    mask = SegmenterTask(parse_spec(copy.deepcopy(SPEC), "init"), build_accelerator("no"),
                         Horizon.of(parse_spec(copy.deepcopy(SPEC), "init"), 5, 3)).model.decoder
    linears = [m for m in mask.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in mask.modules() if isinstance(m, torch.nn.LayerNorm)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05) and weights.abs().max() <= 2.0
    assert all(not m.bias.any() for m in linears)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in norms)
    assert mask.cls_emb.std().item() == pytest.approx(0.02, rel=0.2) and mask.cls_emb.abs().max() <= 2.0
    linear = models.create("segmenter_t16_linear", img_size=32).decoder.head
    assert linear.weight.std().item() == pytest.approx(0.02, rel=0.05) and not linear.bias.any()


def test_padding_is_zeroed_after_normalising():
    out = zero_padding(torch.full((2, 3, 4, 5), 200.0), torch.tensor([[2, 3], [4, 5]]))
    assert out[0, :, :2, :3].eq(200).all() and out[0, :, 2:].eq(0).all() and out[0, :, :, 3:].eq(0).all()
    assert out[1].eq(200).all()


def mmcv_rescale_size(width, height, scale):
    """mmcv.rescale_size with a (long, short) scale, as mmseg's keep-ratio Resize calls it."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(width * factor + 0.5), int(height * factor + 0.5)


@pytest.mark.parametrize("mode", ["slide", "ms-flip"])
def test_evaluation_is_the_references_protocol(mode):
    """slide: the keep-ratio resize to data.scale, then segm's inference; ms-flip: the same at the ratios
    0.5 .. 1.75, flipped and not, softmax averaged (segm's multiscale mode)."""
    torch.manual_seed(0)
    raw = {**copy.deepcopy(SPEC), "data": {**SPEC["data"], "scale": [128, 32]}}
    spec = parse_spec(raw, "eval")
    task = SegmenterTask(spec, build_accelerator("no"), Horizon.of(spec, 5, 3))
    task.model.eval()
    task.eval_mode = mode
    image = torch.randn(1, 3, 40, 70)
    with torch.no_grad():
        ours = task.predict(image)
        views = [(r, f) for r in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) for f in (False, True)] if mode == "ms-flip" else [(1.0, False)]
        theirs = torch.zeros(5, 40, 70)
        for ratio, flip in views:
            width, height = mmcv_rescale_size(70, 40, (int(128 * ratio), int(32 * ratio)))  # Resize(img_ratios)
            view = F.interpolate(image, size=(height, width), mode="bilinear")
            probs = ref.segm_inference(task.model, view.flip(-1) if flip else view, 32, 32, (40, 70))
            theirs += probs.flip(-1) if flip else probs
    assert torch.allclose(ours[0], theirs / len(views), atol=1e-5)
