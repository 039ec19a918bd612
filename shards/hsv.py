"""Pillow's 8-bit HSV round trip (RGB -> HSV, adjust hue and saturation, -> RGB) by table lookup.

torchvision's adjust_hue on PIL images (DINO's ColorJitter) and segjobs' mmseg photometric distortion convert to
Pillow's "HSV" mode and back. Each conversion is a pure function of a pixel's three bytes, so two tables of all
2^24 byte triples, made by Pillow's own conversions, give exactly Pillow's bytes: one gather per direction, 4 to 5
times faster than converting a 224 x 224 crop twice (tools/bench_loader.py).

The tables take 128 MiB and about a second to build, once per process, at the first call (`tables()`); a loader
that builds them before it forks its workers shares them.

A packed pixel is a uint32 whose bytes are the three channels in order, so that RGB pixels index the first table
directly. HSV pixels are packed the other way round (V lowest, H highest): adding a hue shift to the top byte and
masking to 24 bits is the hue's wrap modulo 256.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

TRIPLES = 1 << 24
MASK = np.uint32(TRIPLES - 1)


def packed_bytes(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) uint32 with channel 0 in the lowest byte."""
    out = np.zeros((*pixels.shape[:-1], 4), np.uint8)
    out[..., :3] = pixels
    return out.view(np.uint32)[..., 0]


def packed_image(image: Image.Image) -> np.ndarray:
    """An RGB image's pixels, row by row, as uint32 with its first band in the lowest byte."""
    return np.frombuffer(image.tobytes("raw", "RGBX"), np.uint32) & MASK  # the pad byte is 255


@functools.cache
def tables() -> tuple[np.ndarray, np.ndarray]:
    """(to_hsv, to_rgb): to_hsv[r | g << 8 | b << 16] = v | s << 8 | h << 16 and to_rgb[v | s << 8 | h << 16] =
    r | g << 8 | b << 16, as Pillow's convert("HSV") and convert("RGB") compute them."""
    every = Image.frombuffer("RGBX", (4096, 4096), np.arange(TRIPLES, dtype=np.uint32), "raw", "RGBX", 0, 1)
    low, middle, high, _ = every.split()  # pixel i's bytes, lowest first
    hue, saturation, value = every.convert("HSV").split()
    to_hsv = packed_image(Image.merge("RGB", (value, saturation, hue)))
    to_rgb = packed_image(Image.merge("HSV", (high, middle, low)).convert("RGB"))
    return to_hsv, to_rgb


def shifted(packed: np.ndarray, hue_shift: int = 0, saturation: float | None = None) -> np.ndarray:
    """Packed RGB pixels (uint32, r | g << 8 | b << 16) through Pillow's HSV: hue + `hue_shift` modulo 256,
    saturation times `saturation` (float32, clipped to 0..255, truncated, as mmseg scales it), back to packed RGB."""
    to_hsv, to_rgb = tables()
    hsv = to_hsv.take(packed)
    if saturation is not None:
        scaled = np.clip(np.arange(256, dtype=np.float32) * np.float32(saturation), 0, 255).astype(np.uint32)
        hsv = (hsv & np.uint32(0xFF00FF)) | (scaled.take((hsv >> 8) & 0xFF) << 8)
    hsv += np.uint32((hue_shift % 256) << 16)
    hsv &= MASK
    return to_rgb.take(hsv)


def adjust(pixels: np.ndarray, hue_shift: int = 0, saturation: float | None = None) -> np.ndarray:
    """`shifted` on H x W x 3 uint8 RGB pixels."""
    return shifted(packed_bytes(pixels), hue_shift, saturation).view(np.uint8).reshape(*pixels.shape[:-1], 4)[..., :3]


def adjust_image(image: Image.Image, hue_shift: int) -> Image.Image:
    """torchvision's adjust_hue on an RGB PIL image (`shifted` without copies through numpy's channel layout)."""
    return Image.frombytes("RGB", image.size, shifted(packed_image(image), hue_shift), "raw", "RGBX")
