"""The papers' data pipelines, as pure functions of (image, label, rng).

Every random choice comes from the numpy Generator passed in, which the loader seeds per sample from
(seed, epoch, sample index): augmentation does not depend on which worker or rank decodes a sample, and a
resumed run draws exactly what an uninterrupted one would. Outputs are uint8 CHW arrays (labels uint8 HW,
255 = ignore); normalisation to float happens on the device, which moves 4x fewer bytes to the GPU. With
`photometric_on_device` (data.photometric: device), DinoMultiCrop and SegmenterTrain make the same draws but
leave their photometric steps undone and return the draws as float32 rows under "photometric", which
shards.photometric applies to the batch on the device.

- SegmenterTrain: mmsegmentation's ADE20K pipeline (Strudel et al. 2021 train with it).
- WholeImage: the image and label as they are, for evaluations that resize on the device (Segmenter, W-Net).
- DinoMultiCrop: DINO's DataAugmentationDINO (Caron et al. 2021, main_dino.py).
- WNetCrop: resize + crop to a fixed size, flips (Xia & Kulis 2017 train on 224x224 crops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter

from shards import hsv
from shards.photometric import dino_row, mmseg_row

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


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resizing to `size` (width, height): labels are indices, never interpolated."""
    return np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))


def resized(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """`image` resized to `size` (width, height), bilinear with antialiasing, by torch's uint8 kernel: Pillow's
    BILINEAR up to rounding (under a hundredth of a grey level on average), 5 times faster on one core.
    H x W x 3 uint8."""
    source = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
    return F.interpolate(source, size=size[::-1], mode="bilinear", antialias=True)[0].permute(1, 2, 0).numpy()


@dataclass(frozen=True)
class Distortion:
    """The draws of one mmseg PhotoMetricDistortion; neutral values stand for steps not drawn."""

    brightness_delta: float = 0.0
    contrast_before: float = 1.0
    saturation: float | None = None
    hue_shift: int | None = None  # Pillow's hue units: 256 per turn
    contrast_after: float = 1.0

    def row(self) -> np.ndarray:
        """The draws as the device applies them (shards.photometric.mmseg_photometric)."""
        hsv = self.saturation is not None or self.hue_shift is not None
        return mmseg_row(self.brightness_delta, self.contrast_before, hsv, self.saturation or 1.0, self.hue_shift or 0,
                         self.contrast_after)


def draw_distortion(rng: np.random.Generator) -> Distortion:
    """mmseg PhotoMetricDistortion: brightness +-32, contrast 0.5..1.5 (before or after the HSV steps),
    saturation 0.5..1.5, hue +-18 (OpenCV's 0..180 hue scale), each with probability 0.5."""
    brightness = rng.uniform(-32, 32) if rng.random() < 0.5 else 0.0
    contrast_first = rng.integers(2) == 1
    before = rng.uniform(0.5, 1.5) if contrast_first and rng.random() < 0.5 else 1.0
    saturate, hue = rng.random() < 0.5, rng.random() < 0.5
    saturation, hue_delta = rng.uniform(0.5, 1.5), int(rng.integers(-18, 19))
    after = rng.uniform(0.5, 1.5) if not contrast_first and rng.random() < 0.5 else 1.0
    # PIL's hue runs 0..255 where OpenCV's runs 0..180
    return Distortion(brightness, before, saturation if saturate else None,
                      round(hue_delta * 256 / 180) if hue else None, after)


def apply_distortion(image: np.ndarray, draws: Distortion) -> np.ndarray:
    """Each step clips to 0..255 and rounds to uint8, as mmseg does (H x W x 3 uint8 in and out)."""

    def affine(img: np.ndarray, alpha: float, beta: float) -> np.ndarray:
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if draws.brightness_delta:
        image = affine(image, 1.0, draws.brightness_delta)
    if draws.contrast_before != 1.0:
        image = affine(image, draws.contrast_before, 0.0)
    if draws.saturation is not None or draws.hue_shift is not None:
        image = hsv.adjust(image, draws.hue_shift or 0, draws.saturation)
    if draws.contrast_after != 1.0:
        image = affine(image, draws.contrast_after, 0.0)
    return image


def resized_region(image: Image.Image, size: tuple[int, int], region: tuple[int, int, int, int]) -> Image.Image:
    """`region` (left, top, width, height) of `image` resized to `size`, bilinear, computed alone: Pillow places
    each output pixel's filter from the box at the whole resize's scale, reading pixels past the box as the whole
    resize would, so the result is the whole resize's crop up to rounding (a few percent of the pixels move by a
    level: positions come from the box in floats), without resizing the rest (4x the crop's area at ratio 2)."""
    left, top, width, height = region
    scale_x, scale_y = image.width / size[0], image.height / size[1]
    box = (left * scale_x, top * scale_y, (left + width) * scale_x, (top + height) * scale_y)
    return image.resize((width, height), Image.BILINEAR, box=box)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg PhotoMetricDistortion drawn from `rng` and applied (draw_distortion, apply_distortion)."""
    return apply_distortion(image, draw_distortion(rng))


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
    photometric_on_device: bool = False  # draw the distortion, return it as "photometric" (a Distortion.row())

    def __post_init__(self):
        if self.photometric and not self.photometric_on_device:
            hsv.tables()  # built before the loader forks its workers, which then share them

    def __call__(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        ratio = rng.uniform(*self.ratio_range)
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        width, height = rescale_size(*image.size, target)
        label = resize_label(label, (width, height))
        top, left = self._crop_origin(label, rng)
        size = self.crop_size
        label = label[top : top + size, left : left + size]
        pixels = np.asarray(resized_region(image, (width, height), (left, top, label.shape[1], label.shape[0])))
        if rng.random() < self.flip_prob:
            pixels, label = pixels[:, ::-1], label[:, ::-1]
        out = {}
        if self.photometric and self.photometric_on_device:
            out["photometric"] = draw_distortion(rng).row()
        elif self.photometric:
            pixels = photometric_distortion(np.ascontiguousarray(pixels), rng)
        padded_image = np.zeros((size, size, 3), np.uint8)
        padded_label = np.full((size, size), IGNORE_INDEX, np.uint8)
        padded_image[: pixels.shape[0], : pixels.shape[1]] = pixels
        padded_label[: label.shape[0], : label.shape[1]] = label
        return {"image": to_chw(padded_image), "label": padded_label, "valid": np.array(label.shape, np.int64), **out}

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


@dataclass(frozen=True)
class ViewDraws:
    """The random draws of one DINO view, in the order DataAugmentationDINO makes them."""

    box: tuple[int, int, int, int]  # left, top, width, height in the decoded image's pixels
    flip: bool
    jitter: tuple[float, float, float, int] | None  # brightness, contrast, saturation factors; hue shift (1/255 turn)
    order: tuple[int, int, int, int]  # ColorJitter's random order: 0 brightness, 1 contrast, 2 saturation, 3 hue
    grey: bool
    blur_sigma: float  # Pillow's GaussianBlur radius (its sigma); 0: no blur
    solarize: bool

    def row(self) -> np.ndarray:
        """The photometric draws as the device applies them (shards.photometric.dino_photometric)."""
        return dino_row(self.jitter, self.order, self.grey, self.blur_sigma, self.solarize)


def draw_view(width: int, height: int, scale: tuple[float, float], blur_p: float, solarize_p: float,
              rng: np.random.Generator, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1) -> ViewDraws:
    """One view's draws: RandomResizedCrop, flip 0.5, ColorJitter p 0.8 (factors uniform around 1, hue +-`hue`
    turn, then a random order of the four), greyscale 0.2, blur p `blur_p`, solarize p `solarize_p`. A draw
    happens only when its step does, as each torchvision transform draws its own."""
    box = random_resized_crop_box(width, height, scale, rng)
    flip = bool(rng.random() < 0.5)
    jitter, order = None, (0, 1, 2, 3)
    if rng.random() < 0.8:
        factors = (rng.uniform(1 - brightness, 1 + brightness), rng.uniform(1 - contrast, 1 + contrast),
                   rng.uniform(1 - saturation, 1 + saturation), rng.uniform(-hue, hue))
        jitter = (*factors[:3], int(factors[3] * 255))
        order = tuple(int(op) for op in rng.permutation(4))
    grey = bool(rng.random() < 0.2)
    blur_sigma = rng.uniform(0.1, 2.0) if rng.random() < blur_p else 0.0
    solarize = bool(rng.random() < solarize_p)
    return ViewDraws(box, flip, jitter, order, grey, blur_sigma, solarize)


def colour(view: Image.Image, draws: ViewDraws) -> Image.Image:
    """ColorJitter, RandomGrayscale, GaussianBlur and Solarization of a view as torchvision computes them on
    PIL images (ImageEnhance's blends, Pillow's HSV, greyscale and blur, ImageOps.solarize's table): the same
    grey levels. A blend with a flat image is a table of each byte value (blend_table, applied by `mapped`), the
    HSV round trip two tables of every colour (shards.hsv). A greyscale view is blurred as one channel before it
    becomes RGB again."""
    if draws.jitter is not None:
        for op in draws.order:
            factor = draws.jitter[op]
            if op == 0:  # ImageEnhance.Brightness: a blend with black
                view = mapped(view, blend_table(0, factor))
            elif op == 1:  # ImageEnhance.Contrast: a blend with the rounded mean of the greyscale view
                histogram = np.array(view.convert("L").histogram())
                view = mapped(view, blend_table(int(histogram @ np.arange(256) / histogram.sum() + 0.5), factor))
            elif op == 2:
                view = ImageEnhance.Color(view).enhance(factor)
            else:
                view = hsv.adjust_image(view, factor)
    blur = ImageFilter.GaussianBlur(radius=draws.blur_sigma) if draws.blur_sigma else None
    if draws.grey:
        grey = view.convert("L")
        view = (grey.filter(blur) if blur else grey).convert("RGB")
    elif blur:
        view = view.filter(blur)
    if draws.solarize:
        view = mapped(view, SOLARIZE_TABLE)
    return view


SOLARIZE_TABLE = bytes(i if i < 128 else 255 - i for i in range(256)) * 3  # ImageOps.solarize(threshold=128)
LEVELS = Image.frombytes("L", (256, 1), bytes(range(256)))


def blend_table(level: int, factor: float) -> bytes:
    """Image.blend(a flat image of `level`, view, factor) for each byte value of the view, by Pillow's own blend
    (float32, truncated): a table for each of the three channels."""
    return Image.blend(Image.new("L", LEVELS.size, level), LEVELS, factor).tobytes() * 3


def mapped(view: Image.Image, table: bytes) -> Image.Image:
    """An RGB `view` through a table of 3 x 256 bytes by the image core's lookup, which Image.point calls after
    rounding the table's 768 entries in Python, on every call: longer than the lookup of a 96 x 96 view. `Image.im`
    and `_new` are Pillow's internals; tests/test_transforms.py holds the result to torchvision's bytes."""
    return view._new(view.im.point(table, None))


def resized_crop(source: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool) -> np.ndarray:
    """The `box` of `source` (1 x 3 x H x W uint8, channels last) resized to size x size, bicubic with
    antialiasing, mirrored if `flip`: H x W x 3 uint8.

    torch's uint8 kernel computes Pillow's BICUBIC resampling (a = -0.5, the support widened by the scale when
    shrinking) in fixed point, 5 to 7 times faster than Pillow on one core; the two differ by under 0.1 grey
    level on average (rounding). The box is copied out channels last first: given a strided region, the kernel
    makes that copy itself and returns planar channels, which takes 1.4 to 1.6 times as long in all."""
    left, top, width, height = box
    region = source[:, :, top : top + height, left : left + width].contiguous(memory_format=torch.channels_last)
    view = F.interpolate(region, size=(size, size), mode="bicubic", antialias=True)[0].permute(1, 2, 0)
    if flip:
        view = view.flip(1)
    return view.contiguous().numpy()


@dataclass
class DinoMultiCrop:
    """DINO multi-crop: 2 global crops (224, scale 0.4..1.0) and N local crops (96, scale 0.05..0.4), each
    flipped (0.5), colour-jittered (0.8: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1), greyscaled
    (0.2) and blurred (radius 0.1..2: p 1.0 / 0.1 for the globals, 0.5 for locals); the second global crop is
    solarized with p 0.2. Bicubic resizing, as the reference.

    Every draw of every view is made first, from the image's size alone, in the reference's order; then the
    crops are resized (resized_crop) and coloured (colour). With `photometric_on_device`, the crops leave
    uncoloured and "photometric" carries each view's draws (ViewDraws.row) for shards.photometric: the same
    draws, so the same augmentation, whichever side computes it."""

    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    local_crops: int = 8
    photometric_on_device: bool = False

    def __post_init__(self):
        if not self.photometric_on_device:
            hsv.tables()  # built before the loader forks its workers, which then share them

    def __call__(self, image: Image.Image, label: np.ndarray | None, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
        width, height = image.size
        views = [(self.global_size, self.global_scale, 1.0, 0.0), (self.global_size, self.global_scale, 0.1, 0.2)]
        views += [(self.local_size, self.local_scale, 0.5, 0.0)] * self.local_crops
        draws = [draw_view(width, height, scale, blur_p, solarize_p, rng) for _, scale, blur_p, solarize_p in views]
        source = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
        crops = [resized_crop(source, d.box, size, d.flip) for d, (size, *_) in zip(draws, views)]
        if self.photometric_on_device:
            return {"crops": [to_chw(c) for c in crops], "photometric": [d.row() for d in draws]}
        return {"crops": [to_chw(colour(Image.fromarray(c), d)) for c, d in zip(crops, draws)]}


@dataclass
class WNetCrop:
    """Resize the short side to `size` (bilinear, `resized`), then crop `size` x `size` (random + flips when
    training, centred otherwise). The label, when present, follows with nearest resizing (used for unsupervised
    mIoU)."""

    size: int = 224
    train: bool = True

    def __call__(self, image: Image.Image, label: np.ndarray | None, rng: np.random.Generator) -> dict[str, np.ndarray]:
        factor = self.size / min(image.size)
        width, height = (max(self.size, round(side * factor)) for side in image.size)
        pixels = resized(image, (width, height))
        if label is not None:
            label = resize_label(label, (width, height))
        if self.train:
            left, top = int(rng.integers(0, width - self.size + 1)), int(rng.integers(0, height - self.size + 1))
        else:
            left, top = (width - self.size) // 2, (height - self.size) // 2
        pixels = pixels[top : top + self.size, left : left + self.size]
        if label is not None:
            label = label[top : top + self.size, left : left + self.size]
        if self.train and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
            label = label[:, ::-1] if label is not None else None
        out = {"image": to_chw(pixels)}
        if label is not None:
            out["label"] = np.ascontiguousarray(label)
        return out

