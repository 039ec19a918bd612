"""The device's photometric augmentations (shards.photometric, torch on the CPU, and on CUDA where there is one)
against the Pillow path the loader runs, for the same draws."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from shards.photometric import dino_photometric, gaussian_blur, mmseg_photometric
from shards.transforms import apply_distortion, colour, draw_distortion, draw_view

# Mean absolute difference per image, in grey levels. Not 0: Pillow computes in 24-bit fixed point and C floats,
# torch in float32, so values on a rounding boundary may round the other way, and a later contrast or blur step
# carries that level on. Observed on these images: under 0.01 on average, 0.1 for the worst image (DINO), 0.01
# (mmseg).
TOLERANCE = 0.25


def views(count: int, size: int, seed: int) -> np.ndarray:
    """count x size x size x 3 uint8 views of a textured, saturated scene (the hard case for the HSV steps)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(count):
        colour_ = rng.uniform(0, 255, 3)
        stripes = 60 * np.sin((xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) * rng.uniform(0.2, 1.5))
        out.append(np.clip(colour_ + stripes[..., None] + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8))
    return np.stack(out)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def as_batch(images: np.ndarray, device: str = "cpu") -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().to(device)


def differences(device: torch.Tensor, pillow: list[np.ndarray]) -> np.ndarray:
    got = device.permute(0, 2, 3, 1).cpu().numpy()
    return np.array([np.abs(g - p.astype(np.float32)).mean() for g, p in zip(got, pillow)])


@pytest.mark.parametrize("on", DEVICES)
def test_dino_photometric_on_the_device_matches_pillow(on):
    images = views(96, 40, seed=0)
    rng = np.random.default_rng(0)
    # Globals' and locals' probabilities, the second global's solarize: every step is drawn many times.
    draws = [draw_view(40, 40, (0.4, 1.0), blur_p, solarize_p, rng)
             for blur_p, solarize_p in [(1.0, 0.0), (0.1, 0.2), (0.5, 0.0), (0.5, 0.5)] * 24]
    params = torch.from_numpy(np.stack([d.row() for d in draws]))
    device = dino_photometric(as_batch(images, on), params.to(on))
    pillow = [np.asarray(colour(Image.fromarray(image), d)) for image, d in zip(images, draws)]
    mad = differences(device, pillow)
    assert mad.max() <= TOLERANCE, (mad.max(), draws[int(mad.argmax())])
    assert mad.mean() <= 0.1
    assert (device == device.round()).all() and 0 <= device.min() and device.max() <= 255  # grey levels
    assert sum(d.jitter is not None and d.grey and d.blur_sigma > 0 for d in draws) >= 3  # the steps combine


def test_blur_follows_pillows_three_boxes():
    images = views(8, 48, seed=1)
    sigmas = np.linspace(0.1, 2.0, 8)
    pillow = [np.asarray(Image.fromarray(i).filter(ImageFilter.GaussianBlur(float(s)))) for i, s in zip(images, sigmas)]
    mad = differences(gaussian_blur(as_batch(images), torch.tensor(sigmas, dtype=torch.float32)), pillow)
    assert mad.max() <= 0.15  # observed: 0 for most radii, under 0.1 at a few (fixed-point ties)
    unblurred = gaussian_blur(as_batch(images), torch.zeros(8))
    assert torch.equal(unblurred, as_batch(images))


@pytest.mark.parametrize("on", DEVICES)
def test_mmseg_photometric_on_the_device_matches_pillow(on):
    images = views(64, 40, seed=2)
    rng = np.random.default_rng(2)
    draws = [draw_distortion(rng) for _ in images]
    device = mmseg_photometric(as_batch(images, on), torch.from_numpy(np.stack([d.row() for d in draws])).to(on))
    pillow = [apply_distortion(image, d) for image, d in zip(images, draws)]
    mad = differences(device, pillow)
    assert mad.max() <= TOLERANCE and mad.mean() <= 0.1, mad.max()
    assert sum(d.saturation is not None and d.hue_shift is not None for d in draws) > 5
