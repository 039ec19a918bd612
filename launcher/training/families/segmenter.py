"""Segmenter: per-pixel cross-entropy (ignore 255) on mmseg's ADE20K pipeline; mIoU evaluation; pictures of
image | ground truth | prediction."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from launcher.spec import SpecError
from launcher.training.families.base import StepContext, Task, normalize, to_device, transformer_blocks
from launcher.training.families.registry import register_family
from launcher.training.metrics import IGNORE_INDEX, SegmentationMetric
from launcher.training.pictures import grid, overlay, to_batch
from models.segmenter import sliding_window_logits
from shards.transforms import SegmenterEval, SegmenterTrain, rescale_size

log = logging.getLogger("segjobs.train")


@register_family("segmenter")
class SegmenterTask(Task):
    eval_modes = ("whole", "slide")
    shortcut_spec = "jobs/segmenter_tiny16.yaml"

    def __init__(self, spec, accelerator, horizon):
        super().__init__(spec, accelerator, horizon)
        self.num_classes = self.model.config.num_classes

    @classmethod
    def shortcut_pretrained(cls, pretrained: str) -> list[str]:
        # No DINO backbone has Tiny's width: the pretrained Segmenter is Small/16 on DINO ViT-S/16 weights.
        log.info("--pretrained: training segmenter_s16_mask from DINO ViT-S/16 weights")
        return ["model.name=segmenter_s16_mask", f"model.pretrained={pretrained or 'dino_vits16'}"]

    def check_data(self, manifest) -> None:
        if manifest.num_classes != self.num_classes:
            raise SpecError(f"model.options.num_classes: {self.spec.model.name} predicts {self.num_classes} classes but "
                            f"the training shards ({self.spec.data.train}) have {manifest.num_classes}; "
                            f"set model.options.num_classes={manifest.num_classes}.")

    def shard_units(self, module):
        return transformer_blocks(module)

    @staticmethod
    def train_pipeline(spec):
        data = spec.data
        return SegmenterTrain(crop_size=data.crop_size, scale=tuple(data.scale), ratio_range=tuple(data.ratio_range))

    @staticmethod
    def eval_pipeline(spec):
        return SegmenterEval(scale=tuple(spec.data.scale))

    def train_step(self, batch: dict, context: StepContext) -> dict[str, torch.Tensor]:
        accelerator = context.accelerator
        images = normalize(to_device(batch["image"], accelerator.device))
        labels = to_device(batch["label"], accelerator.device).long()
        with accelerator.accumulate(self.model), accelerator.autocast():
            logits = self.model(images)
            loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
            accelerator.backward(loss)
            if self.spec.train.clip_grad and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.model.parameters(), self.spec.train.clip_grad)
            self.optimizers[0].step()
            self.optimizers[0].zero_grad(set_to_none=True)
        return {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, loader, accelerator) -> dict:
        """mIoU at the label's resolution: logits of the resized image (whole, or slide: windows of the training
        crop with mmseg's 2/3 stride, softmax averaged), upsampled bilinearly."""
        self.model.eval()
        metric = SegmentationMetric(self.num_classes)
        for batch in loader:
            images = batch["image"] if isinstance(batch["image"], list) else list(batch["image"])
            labels = batch["label"] if isinstance(batch["label"], list) else list(batch["label"])
            for image, label in zip(images, labels):
                with accelerator.autocast():
                    pixels = normalize(to_device(image[None], accelerator.device))
                    if self.eval_mode == "slide":
                        crop = self.spec.data.crop_size
                        logits = sliding_window_logits(self.model, pixels, window=crop, stride=max(crop * 2 // 3, 1))
                    else:
                        logits = self.model(pixels)
                logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear")
                metric.update(logits.argmax(1)[0].cpu(), label)
        if loader.stream.world_size > 1:  # each rank saw its share of the split
            metric.all_reduce()
        self.model.train()
        return metric.compute()

    @torch.no_grad()
    def pictures(self, samples, device) -> dict:
        """image | ground truth | prediction per sample, each class in its colour."""
        rows = []
        for image, label in samples:
            width, height = rescale_size(image.shape[1], image.shape[0], tuple(self.spec.data.scale))
            logits = self.model(normalize(to_batch(image, (height, width), device)))
            prediction = F.interpolate(logits.float(), size=image.shape[:2], mode="bilinear").argmax(1)[0].cpu().numpy()
            truth = label if label is not None else np.full(image.shape[:2], IGNORE_INDEX)
            rows.append([image, overlay(image, truth), overlay(image, prediction)])
        return {"segmenter.png": grid(rows)}
