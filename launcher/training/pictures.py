"""Drawing primitives for the pictures of every family: colours, overlays, heat maps, grids of tiles.

Colours: class (or cluster) k is drawn with the bit-interleaved colour map of PASCAL VOC and the ADE20K
toolkits' label images, so the same class has the same colour in every picture; "ignore" pixels show the image.
Tiles are H x W x 3 uint8 arrays; a picture is a PIL image.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = 255


def palette(count: int = 256) -> np.ndarray:
    """count x 3 uint8 colours: the bits of k spread over the high bits of R, G and B (k = 0 is black)."""
    colours = np.zeros((count, 3), dtype=np.uint8)
    for k in range(count):
        value, shift = k, 7
        while value:
            for channel in range(3):
                colours[k, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
    return colours


def colourize(labels: np.ndarray, offset: int = 1) -> np.ndarray:
    """H x W integer map -> H x W x 3 colours; class k gets colour k + offset (0 stays for ignore)."""
    colours = palette(256)
    index = np.where(labels == IGNORE_INDEX, 0, (labels.astype(np.int64) + offset) % 256)
    return colours[index]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    coloured = colourize(labels).astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * coloured
    return np.where((labels == IGNORE_INDEX)[..., None], image, blended.round()).astype(np.uint8)


def heatmap(values: np.ndarray) -> np.ndarray:
    """H x W floats -> H x W x 3 (dark blue to yellow), scaled to the map's own range."""
    low, high = float(values.min()), float(values.max())
    t = (values - low) / (high - low) if high > low else np.zeros_like(values)
    anchors = np.array([[48, 18, 59], [33, 145, 140], [253, 231, 37]], dtype=np.float32)
    position = t * (len(anchors) - 1)
    lower = np.clip(position.astype(int), 0, len(anchors) - 2)
    frac = (position - lower)[..., None]
    return (anchors[lower] * (1 - frac) + anchors[lower + 1] * frac).astype(np.uint8)


def grid(rows: list[list[np.ndarray]], gap: int = 4) -> Image.Image:
    """Tiles (H x W x 3 uint8, sizes may differ) in rows and columns on a white background."""
    heights = [max(t.shape[0] for t in row) for row in rows]
    widths = [max(row[c].shape[1] for row in rows if c < len(row)) for c in range(max(len(r) for r in rows))]
    canvas = Image.new("RGB", (sum(widths) + gap * (len(widths) + 1), sum(heights) + gap * (len(heights) + 1)), "white")
    y = gap
    for row, height in zip(rows, heights):
        x = gap
        for column, tile in enumerate(row):
            canvas.paste(Image.fromarray(tile), (x, y))
            x += widths[column] + gap
        y += height + gap
    return canvas


def to_batch(image: np.ndarray, size: tuple[int, int], device) -> torch.Tensor:
    """H x W x 3 uint8 -> 1 x 3 x h x w uint8 tensor resized to size (h, w)."""
    resized = Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)[None].to(device)
