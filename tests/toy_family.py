"""A fourth model family that exists only in the tests: a two-layer per-pixel classifier.

It is added the way DESIGN.md says a family is added (a model registered in models' registry, a Task
registered in the families' registry), with nothing else in launcher/ knowing of it. Importing this module
registers both; tests/test_layout.py trains, resumes, evaluates and draws it through the real paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from launcher.training.families.base import StepContext, Task, normalize, to_device
from launcher.training.families.registry import register_family
from launcher.training.metrics import IGNORE_INDEX, SegmentationMetric
from launcher.training.pictures import grid, overlay, to_batch
from models.registry import register
from shards.transforms import SegmenterTrain, WholeImage


@dataclass
class ToyConfig:
    num_classes: int = 150
    width: int = 8


class ToyNet(nn.Module):
    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.features = nn.Conv2d(3, config.width, 3, padding=1)
        self.classify = nn.Conv2d(config.width, config.num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(F.relu(self.features(images)))


@register("toy_pixels", family="toy")
def toy_pixels(**options) -> ToyNet:
    """A per-pixel classifier of two convolutions (tests only)."""
    return ToyNet(ToyConfig(**options))


@register_family("toy")
class ToyTask(Task):
    def __init__(self, spec, accelerator, horizon):
        super().__init__(spec, accelerator, horizon)
        self.num_classes = self.model.config.num_classes

    @staticmethod
    def train_pipeline(spec):
        return SegmenterTrain(crop_size=spec.data.crop_size, scale=tuple(spec.data.scale), ratio_range=tuple(spec.data.ratio_range))

    @staticmethod
    def eval_pipeline(spec):
        return WholeImage()

    def train_step(self, batch: dict, context: StepContext) -> dict[str, torch.Tensor]:
        accelerator = context.accelerator
        images = normalize(to_device(batch["image"], accelerator.device))
        labels = to_device(batch["label"], accelerator.device).long()
        with accelerator.accumulate(self.model), accelerator.autocast():
            loss = F.cross_entropy(self.model(images).float(), labels, ignore_index=IGNORE_INDEX)
            accelerator.backward(loss)
            self.optimizers[0].step()
            self.optimizers[0].zero_grad(set_to_none=True)
        return {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, loader, accelerator) -> dict:
        self.model.eval()
        metric = SegmentationMetric(loader.manifest.num_classes)
        for batch in loader:
            for image, label in zip(list(batch["image"]), list(batch["label"])):
                logits = self.model(normalize(to_device(image[None], accelerator.device)))
                logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear")
                metric.update(logits.argmax(1)[0].cpu(), label)
        self.model.train()
        return metric.compute()

    @torch.no_grad()
    def pictures(self, samples, device) -> dict:
        rows = []
        for image, label in samples:
            logits = self.model(normalize(to_batch(image, image.shape[:2], device)))
            truth = label if label is not None else np.full(image.shape[:2], IGNORE_INDEX)
            rows.append([image, overlay(image, truth), overlay(image, logits.argmax(1)[0].cpu().numpy())])
        return {"toy.png": grid(rows)}
