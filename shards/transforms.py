"""The papers' data pipelines, as pure functions of (image, label, rng).

Every random choice comes from the numpy Generator passed in, which the loader seeds per sample from
(seed, epoch, sample index): augmentation does not depend on which worker or rank decodes a sample, and a
resumed run draws exactly what an uninterrupted one would. Outputs are uint8 CHW arrays (labels uint8 HW,
255 = ignore); normalisation to float happens on the device, which moves 4x fewer bytes to the GPU.

- SegmenterTrain: mmsegmentation's ADE20K pipeline (Strudel et al. 2021 train with it).
- WholeImage: the image and label as they are, for evaluations that resize on the device (Segmenter, W-Net).
- DinoMultiCrop: DINO's DataAugmentationDINO (Caron et al. 2021, main_dino.py).
- WNetCrop: resize + crop to a fixed size, flips (Xia & Kulis 2017 train on 224x224 crops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

IGNORE_INDEX = 255


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K's 0 ("other") -> 255 (ignored), k -> k - 1: models see classes 0..149."""
    return (label.astype(np.int16) - 1).astype(np.uint8)  # 0 - 1 wraps to 255 in uint8


def to_chw(image: Image.Image | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side <= max(scale) and short side <= min(scale)."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def resize_pair(image: Image.Image, label: np.ndarray | None, size: tuple[int, int]):
    """Bilinear for the image, nearest for the label (labels are indices: never interpolate them)."""
    image = image.resize(size, Image.BILINEAR)
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    return image, label


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg PhotoMetricDistortion: brightness +-32, contrast 0.5..1.5 (before or after the HSV steps),
    saturation 0.5..1.5, hue +-18 (OpenCV's 0..180 hue scale), each with probability 0.5.
    Each step clips to 0..255 and rounds to uint8, as mmseg does."""

    def affine(img: np.ndarray, alpha: float, beta: float) -> np.ndarray:
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if rng.random() < 0.5:
        image = affine(image, 1.0, rng.uniform(-32, 32))
    contrast_first = rng.integers(2) == 1
    if contrast_first and rng.random() < 0.5:
        image = affine(image, rng.uniform(0.5, 1.5), 0.0)
    saturate, hue = rng.random() < 0.5, rng.random() < 0.5
    saturation, hue_delta = rng.uniform(0.5, 1.5), int(rng.integers(-18, 19))
    if saturate or hue:
        hsv = np.asarray(Image.fromarray(image).convert("HSV")).copy()
        if saturate:
            hsv[..., 1] = np.clip(hsv[..., 1].astype(np.float32) * saturation, 0, 255).astype(np.uint8)
        if hue:  # PIL's hue runs 0..255 where OpenCV's runs 0..180
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(hue_delta * 256 / 180)) % 256
        image = np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    if not contrast_first and rng.random() < 0.5:
        image = affine(image, rng.uniform(0.5, 1.5), 0.0)
    return image


@dataclass
class SegmenterTrain:
    """mmseg ADE20K training: RandomResize(scale=(2048, 512), ratio 0.5..2.0, keep ratio), RandomCrop(512,
    cat_max_ratio=0.75, up to 10 tries), RandomFlip(0.5), PhotoMetricDistortion, Pad(512; label with 255).

    mmseg pads after Normalize, so the padded pixels are 0 in the model's input (the mean colour). The image is
    padded here with 0 in uint8 and `valid` (height, width of the crop) goes with it: the device zeroes what lies
    outside after normalising (launcher.training.families.segmenter)."""

    crop_size: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True

    def __call__(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        ratio = rng.uniform(*self.ratio_range)
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        image, label = resize_pair(image, label, rescale_size(*image.size, target))
        top, left = self._crop_origin(label, rng)
        size = self.crop_size
        pixels = np.asarray(image)[top : top + size, left : left + size]
        label = label[top : top + size, left : left + size]
        if rng.random() < self.flip_prob:
            pixels, label = pixels[:, ::-1], label[:, ::-1]
        if self.photometric:
            pixels = photometric_distortion(np.ascontiguousarray(pixels), rng)
        padded_image = np.zeros((size, size, 3), np.uint8)
        padded_label = np.full((size, size), IGNORE_INDEX, np.uint8)
        padded_image[: pixels.shape[0], : pixels.shape[1]] = pixels
        padded_label[: label.shape[0], : label.shape[1]] = label
        return {"image": to_chw(padded_image), "label": padded_label, "valid": np.array(label.shape, np.int64)}

    def _crop_origin(self, label: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
        """A crop origin whose largest class covers < cat_max_ratio of the crop (last try kept otherwise)."""
        height, width = label.shape
        size = self.crop_size
        for _ in range(10):
            top = int(rng.integers(0, max(height - size, 0) + 1))
            left = int(rng.integers(0, max(width - size, 0) + 1))
            if self.cat_max_ratio >= 1.0:
                break
            counts = np.bincount(label[top : top + size, left : left + size].ravel(), minlength=256)[:IGNORE_INDEX]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return top, left


@dataclass
class WholeImage:
    """The image and label at their original resolution, for evaluations that work on the device: Segmenter
    normalises and then resizes to each scale it evaluates at (mmseg's keep-ratio Resize, times each ratio of a
    multi-scale evaluation); W-Net segments the whole image. Predictions are scored at the label's size."""

    def __call__(self, image: Image.Image, label: np.ndarray | None, rng: np.random.Generator) -> dict[str, np.ndarray]:
        out = {"image": to_chw(image)}
        if label is not None:
            out["label"] = label
        return out


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameters: (left, top, w, h) covering `scale` of the area."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height  # fallback: a centre crop at the nearest allowed aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def color_jitter(image: Image.Image, rng: np.random.Generator, brightness=0.4, contrast=0.4, saturation=0.2,
                 hue=0.1) -> Image.Image:
    """torchvision ColorJitter: the four adjustments in a random order, factors drawn uniformly."""
    factors = [rng.uniform(1 - brightness, 1 + brightness), rng.uniform(1 - contrast, 1 + contrast),
               rng.uniform(1 - saturation, 1 + saturation), rng.uniform(-hue, hue)]
    for op in rng.permutation(4):
        if op == 0:
            image = ImageEnhance.Brightness(image).enhance(factors[0])
        elif op == 1:
            image = ImageEnhance.Contrast(image).enhance(factors[1])
        elif op == 2:
            image = ImageEnhance.Color(image).enhance(factors[2])
        else:
            hsv = np.asarray(image.convert("HSV")).copy()
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(factors[3] * 255)) % 256
            image = Image.fromarray(hsv, mode="HSV").convert("RGB")
    return image


@dataclass
class DinoMultiCrop:
    """DINO multi-crop: 2 global crops (224, scale 0.4..1.0) and N local crops (96, scale 0.05..0.4), each
    flipped (0.5), colour-jittered (0.8: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1), greyscaled
    (0.2) and blurred (radius 0.1..2: p 1.0 / 0.1 for the globals, 0.5 for locals); the second global crop is
    solarized with p 0.2. Bicubic resizing, as the reference."""

    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    local_crops: int = 8

    def __call__(self, image: Image.Image, label: np.ndarray | None, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
        crops = [
            self._view(image, rng, self.global_size, self.global_scale, blur_p=1.0, solarize_p=0.0),
            self._view(image, rng, self.global_size, self.global_scale, blur_p=0.1, solarize_p=0.2),
        ]
        crops += [self._view(image, rng, self.local_size, self.local_scale, blur_p=0.5, solarize_p=0.0)
                  for _ in range(self.local_crops)]
        return {"crops": crops}

    def _view(self, image, rng, size, scale, blur_p, solarize_p) -> np.ndarray:
        left, top, w, h = random_resized_crop_box(*image.size, scale, rng)
        view = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            view = ImageOps.mirror(view)
        if rng.random() < 0.8:
            view = color_jitter(view, rng)
        if rng.random() < 0.2:
            view = view.convert("L").convert("RGB")
        if rng.random() < blur_p:
            view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
        if rng.random() < solarize_p:
            view = ImageOps.solarize(view, threshold=128)
        return to_chw(view)


@dataclass
class WNetCrop:
    """Resize the short side to `size`, then crop `size` x `size` (random + flips when training, centred
    otherwise). The label, when present, follows with nearest resizing (used for unsupervised mIoU)."""

    size: int = 224
    train: bool = True

    def __call__(self, image: Image.Image, label: np.ndarray | None, rng: np.random.Generator) -> dict[str, np.ndarray]:
        width, height = image.size
        factor = self.size / min(width, height)
        image, label = resize_pair(image, label, (max(self.size, round(width * factor)), max(self.size, round(height * factor))))
        width, height = image.size
        if self.train:
            left, top = int(rng.integers(0, width - self.size + 1)), int(rng.integers(0, height - self.size + 1))
        else:
            left, top = (width - self.size) // 2, (height - self.size) // 2
        pixels = np.asarray(image)[top : top + self.size, left : left + self.size]
        if label is not None:
            label = label[top : top + self.size, left : left + self.size]
        if self.train and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
            label = label[:, ::-1] if label is not None else None
        out = {"image": to_chw(pixels)}
        if label is not None:
            out["label"] = np.ascontiguousarray(label)
        return out
