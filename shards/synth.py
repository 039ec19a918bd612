"""A synthetic ADE20K: the release's exact folder layout, filled with scenes a small model can learn.

Each image is a background region plus a few ellipses and polygons. A region's class decides its colour and
its stripe texture (orientation and period), so the label is predictable from local appearance: a small
Segmenter reaches a high mIoU in minutes on a CPU, and W-Net and DINO have segments to find. Some regions are
labelled 0 ("other", ignored in training) and drawn in a random grey, as unlabelled stuff is in ADE20K.

The synthetic clip (`segjobs synth video`) moves shapes of those classes, textures and all, over a background
of another class: they bounce off the borders and pass in front of one another in a fixed depth order, so
a frame has occlusions and the next frame the same objects a few pixels on.

Same arguments -> byte-identical files (JPEG and PNG encoding in Pillow are deterministic, and so is the MP4
encoding of shards.mp4 with one FFmpeg build).
Does not import torch: `segjobs synth` stays fast to start.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from shards.ade20k import NUM_CLASSES, object_info_lines, split_prefix
from shards.mp4 import write_mp4

JPEG_QUALITY = 90
# Grey levels the stripes add and take: visible texture, yet a region drawn in its mean colour still scores
# 10 log10(255^2 / (20^2 / 2 + 6^2)) = 24.4 dB PSNR (with the noise of sigma 6), a ceiling W-Net's
# segment-wise reconstruction can approach (amplitude 35 capped it at 20.0 dB).
STRIPE_AMPLITUDE = 20


def class_ids(num_classes: int) -> list[int]:
    """Label values used by the synthetic set: spread over 1..150 so the whole label range is exercised."""
    if not 1 <= num_classes <= NUM_CLASSES:
        raise ValueError(f"num_classes must be in 1..{NUM_CLASSES}, got {num_classes}")
    if num_classes == 1:
        return [1]
    return [1 + (i * (NUM_CLASSES - 1)) // (num_classes - 1) for i in range(num_classes)]


def class_appearance(label: int) -> tuple[np.ndarray, float, float]:
    """(RGB base colour, stripe angle in radians, stripe period in pixels) of a class, fixed per label."""
    rng = np.random.default_rng([7, label])
    colour = rng.uniform(40, 215, size=3)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(4, 16)
    return colour, angle, period


def striped(colour: np.ndarray, angle: float, period: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """A class's texture at the given coordinates (relative to whatever it moves with): N x 3 float."""
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
    return colour + STRIPE_AMPLITUDE * np.sin(phase)[:, None]


def render_scene(rng: np.random.Generator, height: int, width: int, labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (RGB uint8 H x W x 3, label uint8 H x W)."""
    label_map = Image.new("L", (width, height), int(rng.choice(labels)))
    draw = ImageDraw.Draw(label_map)
    for _ in range(int(rng.integers(2, 6))):
        value = 0 if rng.random() < 0.15 else int(rng.choice(labels))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.1, 0.35) * width, rng.uniform(0.1, 0.35) * height
        if rng.random() < 0.5:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=value)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(3, 8))))
            points = [(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles]
            draw.polygon(points, fill=value)
    label = np.asarray(label_map)

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    for value in np.unique(label):
        mask = label == value
        if value == 0:
            image[mask] = rng.uniform(60, 200)
            continue
        image[mask] = striped(*class_appearance(int(value)), xx[mask], yy[mask])
    image += rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def encode(image: np.ndarray, label: np.ndarray) -> tuple[bytes, bytes]:
    jpg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(image).save(jpg, format="JPEG", quality=JPEG_QUALITY)
    Image.fromarray(label, mode="L").save(png, format="PNG")
    return jpg.getvalue(), png.getvalue()


def write_ade20k(out: Path, *, train: int, val: int, height: int, width: int, seed: int, num_classes: int = 8) -> dict[str, int]:
    """Write a synthetic ADEChallengeData2016 folder; returns the number of images per split."""
    labels = class_ids(num_classes)
    pixels = np.zeros(NUM_CLASSES + 1, np.int64)
    images_with = {split: np.zeros(NUM_CLASSES + 1, np.int64) for split in ("training", "validation")}
    counts = {"training": train, "validation": val}
    for split_index, (split, count) in enumerate(counts.items()):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([seed, split_index, i])
            image, label = render_scene(rng, height, width, labels)
            jpg, png = encode(image, label)
            stem = f"{split_prefix(split)}{i + 1:08d}"
            (out / "images" / split / f"{stem}.jpg").write_bytes(jpg)
            (out / "annotations" / split / f"{stem}.png").write_bytes(png)
            histogram = np.bincount(label.ravel(), minlength=NUM_CLASSES + 1)
            pixels += histogram
            images_with[split] += histogram > 0
    ratio = (pixels[1:] / max(1, pixels.sum())).tolist()
    lines = object_info_lines(ratio, images_with["training"][1:].tolist(), images_with["validation"][1:].tolist())
    (out / "objectInfo150.txt").write_text("\n".join(lines) + "\n")
    return counts


# ---- the synthetic clip -----------------------------------------------------------------------------------
CLIP_SHAPES = 4


def render_clip(frames: int, height: int, width: int, seed: int) -> Iterator[np.ndarray]:
    """The clip's frames, H x W x 3 uint8 each: CLIP_SHAPES textured shapes moving over a striped background."""
    rng = np.random.default_rng([seed, 1])
    labels = [int(v) for v in rng.permutation(class_ids(8))[: CLIP_SHAPES + 1]]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = striped(*class_appearance(labels[0]), xx.ravel(), yy.ravel()).reshape(height, width, 3)
    shapes = []
    for label in labels[1:]:
        speed, direction = rng.uniform(1.5, 4.0), rng.uniform(0, 2 * np.pi)
        shapes.append({
            "label": label, "kind": rng.choice(["ellipse", "rectangle", "triangle"]),
            "radius": (rng.uniform(0.12, 0.25) * width, rng.uniform(0.12, 0.25) * height),
            "centre": np.array([rng.uniform(0, width), rng.uniform(0, height)]),
            "velocity": speed * np.array([np.cos(direction), np.sin(direction)]),
        })
    for index in range(frames):
        image = background.copy()
        for shape in shapes:  # in a fixed depth order: later shapes pass in front of earlier ones
            (cx, cy), (rx, ry) = shape["centre"], shape["radius"]
            mask_image = Image.new("L", (width, height), 0)
            draw = ImageDraw.Draw(mask_image)
            if shape["kind"] == "ellipse":
                draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
            elif shape["kind"] == "rectangle":
                draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
            else:
                draw.polygon([(cx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry)], fill=1)
            mask = np.asarray(mask_image).astype(bool)
            image[mask] = striped(*class_appearance(shape["label"]), xx[mask] - cx, yy[mask] - cy)
            shape["centre"] = shape["centre"] + shape["velocity"]
            for axis, limit in enumerate((width, height)):  # bounce off the borders
                if not 0 <= shape["centre"][axis] <= limit:
                    shape["velocity"][axis] *= -1
                    shape["centre"][axis] = np.clip(shape["centre"][axis], 0, limit)
        image += np.random.default_rng([seed, 2, index]).normal(0, 4, size=image.shape)
        yield np.clip(image, 0, 255).astype(np.uint8)


def write_video(out: Path, *, frames: int, height: int, width: int, fps: float, seed: int) -> str:
    """Write the synthetic clip as an MP4 at `fps`; returns the encoder used (shards.mp4)."""
    pictures = (Image.fromarray(frame) for frame in render_clip(frames, height, width, seed))
    return write_mp4(out, pictures, Fraction(fps).limit_denominator(1001))
