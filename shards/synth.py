"""A synthetic ADE20K: the release's exact folder layout, filled with scenes a small model can learn.

Each image is a background region plus a few ellipses and polygons. A region's class decides its colour and
its stripe texture (orientation and period), so the label is predictable from local appearance: a small
Segmenter reaches a high mIoU in minutes on a CPU, and W-Net and DINO have segments to find. Some regions are
labelled 0 ("other", ignored in training) and drawn in a random grey, as unlabelled stuff is in ADE20K.

Same arguments -> byte-identical files (JPEG and PNG encoding in Pillow are deterministic).
Does not import torch: `segjobs synth` stays fast to start.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from shards.ade20k import NUM_CLASSES, object_info_lines, split_prefix

JPEG_QUALITY = 90


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
        colour, angle, period = class_appearance(int(value))
        phase = (xx[mask] * np.cos(angle) + yy[mask] * np.sin(angle)) * (2 * np.pi / period)
        image[mask] = colour + 35 * np.sin(phase)[:, None]
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
