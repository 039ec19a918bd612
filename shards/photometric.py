"""The photometric augmentations as batched torch functions, for the accelerator: the loader draws each sample's
parameters (shards.transforms, the same draws as its Pillow path) and ships them as small float arrays; the
family's train_step applies them after the batch is on the device, before normalising.

    views = dino_photometric(crops.float(), params)      # B x 3 x H x W in 0..255, params B x len(DINO_COLUMNS)
    images = mmseg_photometric(images.float(), params)   # params B x len(MMSEG_COLUMNS)

Each function restates the Pillow operation the loader would run, Pillow's integer quirks included: every step
rounds to whole grey levels as Pillow's uint8 images do (ImageEnhance blends truncate; the greyscale is Pillow's
integer ITU-R 601-2 luma; contrast blends with the crop's rounded mean luma; hue and saturation go through
Pillow's 8-bit HSV, hue 0..255 per turn). The Gaussian blur is Pillow's: three passes of an extended box
(Gwosdek et al. 2011) whose width follows sigma, in each direction, each rounded.

Note: results match the Pillow path within a fraction of a grey level on average, not bit for bit: Pillow
computes in 24-bit fixed point and C floats where torch uses float32, so a value that lands on a rounding
boundary may go the other way, and later steps (contrast, the blur) carry such a level on
(tests/test_photometric.py states the bounds). Everything runs on any device without host synchronisation; per-sample choices are
`torch.where` selections, so each op is computed for the whole batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# One row per DINO view: the ColorJitter draws (applied or not, the factors, the random order of the four
# adjustments: 0 brightness, 1 contrast, 2 saturation, 3 hue), greyscale, blur sigma (0: none), solarize.
DINO_COLUMNS = ("jitter", "brightness", "contrast", "saturation", "hue_shift", "order0", "order1", "order2", "order3",
                "grey", "blur_sigma", "solarize")
# One row per Segmenter sample: mmseg PhotoMetricDistortion's draws, neutral values where a step is not drawn.
MMSEG_COLUMNS = ("brightness_delta", "contrast_before", "hsv", "saturation", "hue_shift", "contrast_after")
MAX_BLUR_SIGMA = 2.0  # DINO's largest blur radius: Pillow's boxes then reach 2 pixels either side
BOX_REACH = 2
BLUR_PASSES = 3


def dino_row(jitter: tuple[float, float, float, int] | None, order: tuple[int, ...], grey: bool, blur_sigma: float,
             solarize: bool) -> np.ndarray:
    """A view's draws as one float32 row of DINO_COLUMNS; a view without jitter carries neutral factors."""
    factors = jitter if jitter is not None else (1.0, 1.0, 1.0, 0)
    if not 0.0 <= blur_sigma <= MAX_BLUR_SIGMA:
        raise ValueError(f"blur sigma {blur_sigma} outside 0..{MAX_BLUR_SIGMA}")
    return np.array([jitter is not None, *factors, *order, grey, blur_sigma, solarize], np.float32)


def mmseg_row(brightness_delta: float, contrast_before: float, hsv: bool, saturation: float, hue_shift: int,
              contrast_after: float) -> np.ndarray:
    """A sample's PhotoMetricDistortion as one float32 row of MMSEG_COLUMNS."""
    return np.array([brightness_delta, contrast_before, hsv, saturation, hue_shift, contrast_after], np.float32)


def column(params: torch.Tensor, names: tuple[str, ...], name: str) -> torch.Tensor:
    """A column as B x 1 x 1 x 1, to broadcast over B x 3 x H x W images."""
    return params[:, names.index(name)].view(-1, 1, 1, 1)


def luma(images: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, as B x 1 x H x W (exact in float32)."""
    r, g, b = images.unbind(1)
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536).unsqueeze(1)


def blend(base: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's Image.blend(base, images, factor) of uint8 images: truncated and clipped to 0..255."""
    return torch.floor((base + factor * (images - base)).clamp(0, 255))


def shift_hsv(images: torch.Tensor, hue_shift: torch.Tensor, saturation: torch.Tensor) -> torch.Tensor:
    """RGB -> Pillow's 8-bit HSV -> hue + hue_shift (mod 256), saturation x factor (clipped) -> RGB."""
    r, g, b = images.unbind(1)
    value, low = images.amax(1), images.amin(1)
    chroma = value - low
    grey = chroma == 0
    safe_chroma, safe_value = chroma.masked_fill(grey, 1), value.masked_fill(value == 0, 1)
    rc, gc, bc = (value - r) / safe_chroma, (value - g) / safe_chroma, (value - b) / safe_chroma
    hue = torch.where(r == value, bc - gc, torch.where(g == value, 2 + rc - bc, 4 + gc - rc))
    hue = torch.where(grey, 0, torch.floor(torch.remainder(hue / 6 + 1, 1) * 255))
    sat = torch.where(grey, 0, torch.floor(chroma / safe_value * 255))
    hue = torch.remainder(hue + hue_shift.view(-1, 1, 1), 256)
    sat = torch.floor((sat * saturation.view(-1, 1, 1)).clamp(0, 255))
    sector = torch.floor(hue * 6 / 255)
    frac, fs = hue * 6 / 255 - sector, sat / 255
    p = torch.floor(value * (1 - fs) + 0.5)
    q = torch.floor(value * (1 - fs * frac) + 0.5)
    t = torch.floor(value * (1 - fs * (1 - frac)) + 0.5)
    sector = torch.remainder(sector, 6)
    choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    out = []
    for channel in range(3):
        picked = choices[5][channel]
        for index in range(5):
            picked = torch.where(sector == index, choices[index][channel], picked)
        out.append(torch.where(sat == 0, value, picked))
    return torch.stack(out, 1)


def box_kernels(sigma: torch.Tensor) -> torch.Tensor:
    """B x 5 kernels: the extended box Pillow's GaussianBlur(sigma) passes three times in each direction: l whole
    pixels either side and a fraction a of the next (Gwosdek et al. 2011, as Pillow's ImagingGaussianBlur
    computes them in C floats), weighted in Pillow's 24-bit fixed point. Sigma 0 gives the identity."""
    sigma = sigma.float()  # Pillow takes the radius as a C float; the steps below round as its C code does
    variance = sigma * sigma / BLUR_PASSES
    length = torch.sqrt(12.0 * variance.double() + 1.0).float()
    whole = torch.floor((length.double() - 1.0) / 2.0).float()
    part = (2 * whole + 1) * (whole * (whole + 1) - 3 * variance)
    part = part / (6 * (variance - (whole + 1) * (whole + 1)))
    unit = float(1 << 24)
    inner = torch.floor(unit / ((whole + part) * 2 + 1))  # the weight of each whole pixel, in 2^-24
    outer = torch.floor((unit - (2 * whole + 1) * inner) / 2)  # the weight of the two partial pixels
    offsets = torch.arange(-BOX_REACH, BOX_REACH + 1, device=sigma.device, dtype=torch.float32).abs()
    box = torch.where(offsets <= whole[:, None], inner[:, None], torch.where(offsets == whole[:, None] + 1, outer[:, None], 0.0))
    identity = (offsets == 0).float().expand_as(box)
    return torch.where((sigma > 0)[:, None], box / unit, identity)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Pillow's GaussianBlur per sample: three box passes along rows, then three along columns, each with the
    edge pixel repeated and the result rounded to a grey level, as Pillow's uint8 passes do."""
    batch, channels, height, width = images.shape
    kernels = box_kernels(sigma).repeat_interleave(channels, 0)  # one per (sample, channel) plane
    planes = images.reshape(1, batch * channels, height, width)
    width_taps = 2 * BOX_REACH + 1
    along_rows, along_columns = kernels.view(-1, 1, 1, width_taps), kernels.view(-1, 1, width_taps, 1)
    for weights, padding in ((along_rows, (BOX_REACH, BOX_REACH, 0, 0)), (along_columns, (0, 0, BOX_REACH, BOX_REACH))):
        for _ in range(BLUR_PASSES):
            planes = torch.floor(F.conv2d(F.pad(planes, padding, mode="replicate"), weights, groups=batch * channels) + 0.5)
    return planes.reshape(batch, channels, height, width)


def dino_photometric(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """DINO's colour jitter (in each sample's order), greyscale, blur and solarize on B x 3 x H x W float images
    in 0..255; returns the same, whole grey levels. `params`: B x len(DINO_COLUMNS), rows of dino_row."""
    params = params.to(images.device, torch.float32)

    def get(name: str) -> torch.Tensor:
        return column(params, DINO_COLUMNS, name)

    jitter = get("jitter") > 0
    factors = torch.cat([get("brightness"), get("contrast"), get("saturation")], 1)  # B x 3 x 1 x 1
    for position in range(4):
        op = get(f"order{position}").long()
        grey_level = luma(images)
        mean = torch.floor(grey_level.mean((1, 2, 3), keepdim=True) + 0.5)
        # Brightness blends with black, contrast with the mean grey, saturation with the pixel's own grey.
        base = torch.where(op == 0, 0.0, torch.where(op == 1, mean, grey_level))
        factor = torch.where(op == 3, 1.0, factors.gather(1, op.clamp(max=2)))
        blended = blend(base, images, factor)
        hue = jitter & (op == 3)
        shifted = shift_hsv(images, get("hue_shift").flatten(), torch.ones(len(images), device=images.device))
        images = torch.where(hue, shifted, blended)
    images = torch.where(get("grey") > 0, luma(images).expand_as(images), images)
    images = gaussian_blur(images, get("blur_sigma").flatten())
    return torch.where((get("solarize") > 0) & (images >= 128), 255 - images, images)


def mmseg_photometric(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on B x 3 x H x W float images in 0..255 (Segmenter's padded crops: the
    padding is zeroed after normalising anyway); `params`: B x len(MMSEG_COLUMNS), rows of mmseg_row."""
    params = params.to(images.device, torch.float32)

    def get(name: str) -> torch.Tensor:
        return column(params, MMSEG_COLUMNS, name)

    def affine(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
        return torch.floor((x * alpha + beta).clamp(0, 255))  # numpy's clip, then astype(uint8)

    images = affine(images, 1.0, get("brightness_delta"))
    images = affine(images, get("contrast_before"), 0.0)
    shifted = shift_hsv(images, get("hue_shift").flatten(), get("saturation").flatten())
    images = torch.where(get("hsv") > 0, shifted, images)
    return affine(images, get("contrast_after"), 0.0)
