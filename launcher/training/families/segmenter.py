"""Segmenter as rstrudel/segmenter trains and evaluates it: per-pixel cross-entropy (ignore 255) on mmseg's ADE20K
pipeline, inputs normalised with the backbone's statistics and padded with 0 after normalising; mIoU, mAcc and
pixel accuracy by the reference's protocols; pictures of image | ground truth | prediction, and of image |
prediction for every frame of a video.

Evaluation modes (`segjobs eval --mode`), each from the image at its original size, normalised on the device:
- whole: mmseg's keep-ratio Resize to data.scale (2048 x 512), one forward, logits bilinear to the label's size.
- slide: the reference's protocol (segm/model/utils.py inference): the same resize, windows of data.crop_size
  (512) at a stride of the window, the last aligned to the border, logits averaged, bilinear to the label's size.
- ms-flip: slide at the scales 0.5 .. 1.75 of data.scale, each flipped and not, softmax averaged (segm's
  set_multiscale_mode), as the paper's multi-scale tables report.
Images are resized with torch's bilinear (align_corners=False), which is OpenCV's INTER_LINEAR that mmcv uses,
on normalised floats rather than rounded uint8.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from launcher.spec import SpecError
from launcher.training.families.base import (NORMALIZATION, StepContext, Task, normalize, photometric_on_device, to_device,
                                             transformer_blocks)
from launcher.training.families.registry import register_family
from launcher.training.metrics import IGNORE_INDEX, SegmentationMetric
from launcher.training.pictures import grid, overlay, to_batch
from models.pretrained import normalization_of
from models.segmenter import sliding_window_logits
from shards.ade20k import COLOURS
from shards.photometric import mmseg_photometric
from shards.transforms import SegmenterTrain, WholeImage, rescale_size

MS_FLIP_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # segm/data/base.py set_multiscale_mode

log = logging.getLogger("segjobs.train")


@register_family("segmenter")
class SegmenterTask(Task):
    eval_modes = ("slide", "whole", "ms-flip")  # slide: the protocol segm evaluates with, in training too
    shortcut_spec = "jobs/segmenter_tiny16.yaml"
    prediction_files = ("classes.png", "labels.png")  # segjobs predict writes <image stem>_<name>

    def __init__(self, spec, accelerator, horizon):
        super().__init__(spec, accelerator, horizon)
        self.num_classes = self.model.config.num_classes
        if spec.data.normalization is None:  # resolved once, then recorded in spec.yaml and every checkpoint
            spec.data.normalization = normalization_of(spec.model.pretrained)
            log.info("data.normalization: %s, from model.pretrained (%s)", spec.data.normalization, spec.model.pretrained)
        self.mean, self.std = NORMALIZATION[spec.data.normalization]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std)

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
        return SegmenterTrain(crop_size=data.crop_size, scale=tuple(data.scale), ratio_range=tuple(data.ratio_range),
                              photometric_on_device=photometric_on_device(spec))

    @staticmethod
    def eval_pipeline(spec):
        return WholeImage()

    def train_step(self, batch: dict, context: StepContext) -> dict[str, torch.Tensor]:
        accelerator = context.accelerator
        images = to_device(batch["image"], accelerator.device)
        if "photometric" in batch:  # data.photometric: device; mmseg distorts before it normalises and pads
            images = mmseg_photometric(images.float(), to_device(batch["photometric"], accelerator.device))
        images = zero_padding(self.normalize(images), to_device(batch["valid"], accelerator.device))
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
        """mIoU, mAcc and pixel accuracy at the label's resolution, in self.eval_mode (module docstring)."""
        self.model.eval()
        metric = SegmentationMetric(self.num_classes)
        for batch in loader:
            images = batch["image"] if isinstance(batch["image"], list) else list(batch["image"])
            labels = batch["label"] if isinstance(batch["label"], list) else list(batch["label"])
            for image, label in zip(images, labels):
                with accelerator.autocast():
                    probs = self.predict(self.normalize(to_device(image[None], accelerator.device)))
                metric.update(probs.argmax(1)[0].cpu(), label)
        if loader.stream.world_size > 1:  # each rank saw its share of the split
            metric.all_reduce()
        self.model.train()
        return metric.compute()

    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class probabilities (1, classes, H, W) of a normalised image (1, 3, H, W) at its own size."""
        height, width = pixels.shape[-2:]
        multi = self.eval_mode == "ms-flip"
        views = [(ratio, flip) for ratio in MS_FLIP_RATIOS for flip in (False, True)] if multi else [(1.0, False)]
        window, (long_side, short_side) = self.spec.data.crop_size, self.spec.data.scale
        probs = torch.zeros(1, self.num_classes, height, width, device=pixels.device)
        for ratio, flip in views:
            size = rescale_size(width, height, (int(long_side * ratio), int(short_side * ratio)))[::-1]
            view = F.interpolate(pixels, size=size, mode="bilinear")
            view = view.flip(-1) if flip else view
            if self.eval_mode == "whole":
                logits = self.model(view)
            else:
                logits = sliding_window_logits(self.model, view, window=window, stride=window)
            logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear")
            probs += (logits.flip(-1) if flip else logits).softmax(1)
        return probs / len(views)

    @torch.no_grad()
    def pictures(self, samples, device) -> dict:
        """image | ground truth | prediction (in the evaluation mode, slide unless set) per sample, each class in its colour."""
        rows = []
        for image, label in samples:
            prediction = self.predict(self.normalize(to_batch(image, image.shape[:2], device))).argmax(1)[0].cpu().numpy()
            truth = label if label is not None else np.full(image.shape[:2], IGNORE_INDEX)
            rows.append([image, overlay(image, truth), overlay(image, prediction)])
        return {"segmenter.png": grid(rows)}

    @torch.no_grad()
    def video_frame(self, image, device):
        """image | prediction (in the evaluation mode, slide unless set), each class in its colour."""
        prediction = self.predict(self.normalize(to_batch(image, image.shape[:2], device))).argmax(1)[0].cpu().numpy()
        return grid([[image, overlay(image, prediction)]])

    @torch.no_grad()
    def predictions(self, images, device, label_offset: int = 1) -> list[dict]:
        """Per image, in the evaluation mode (slide unless set), the class map as the dataset numbers its labels
        (class k -> label k + label_offset): classes.png with ADE20K's colours (a palette PNG: the pixel values
        are the labels) and labels.png (greyscale, the same values; 16-bit beyond 255). One image at a time:
        the sliding windows of one image already go through the network together."""
        written = []
        for image in images:
            classes = self.predict(self.normalize(to_batch(image, image.shape[:2], device))).argmax(1)[0].cpu().numpy()
            written.append(label_pictures(classes.astype(np.int64) + label_offset))
        return written


def label_pictures(labels: np.ndarray) -> dict[str, Image.Image]:
    """classes.png (palette: label k in ADE20K's colour k, label 0 black) and labels.png of a label map."""
    if labels.max(initial=0) > 255:  # a palette PNG holds 256 labels at most
        return {"labels.png": Image.fromarray(labels.astype(np.uint16))}
    classes = Image.fromarray(labels.astype(np.uint8), mode="P")
    colours = [0, 0, 0, *(value for colour in COLOURS for value in colour)]
    classes.putpalette(colours + [0] * (768 - len(colours)))
    return {"classes.png": classes, "labels.png": Image.fromarray(labels.astype(np.uint8), mode="L")}


def zero_padding(images: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Set to 0 what lies outside each image's valid (height, width): mmseg pads after normalising."""
    rows = torch.arange(images.shape[-2], device=images.device).view(1, -1, 1) < valid[:, :1, None]
    columns = torch.arange(images.shape[-1], device=images.device).view(1, 1, -1) < valid[:, 1:, None]
    return images * (rows & columns)[:, None]
