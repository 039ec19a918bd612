"""W-Net post-processing: the dense CRF against a full N x N restatement, its approximation against its exact
path, and segment merging against a plain-loop restatement."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image

from models import crf
from models.crf import dense_crf, merge_segments


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=0))
    return e / e.sum(axis=0)


def naive_dense_crf(probs: np.ndarray, image: np.ndarray, iterations: int = 5, spatial_sxy: float = 3.0,
                    spatial_compat: float = 3.0, bilateral_sxy: float = 80.0, bilateral_srgb: float = 13.0,
                    bilateral_compat: float = 10.0) -> np.ndarray:
    """Mean field with both kernels as full N x N matrices, the spatial one cut off at 4 sigma per axis."""
    k, h, w = probs.shape
    ys, xs = np.mgrid[:h, :w]
    pixels, rgb = np.stack([ys.ravel(), xs.ravel()], axis=1), image.reshape(-1, 3).astype(float)
    offsets = pixels[:, None] - pixels[None]
    positions = (offsets**2).sum(axis=-1)
    colours = ((rgb[:, None] - rgb[None]) ** 2).sum(axis=-1)
    inside = (np.abs(offsets) <= round(4 * spatial_sxy)).all(axis=-1)
    spatial = np.exp(-positions / (2 * spatial_sxy**2)) * inside
    bilateral = np.exp(-positions / (2 * bilateral_sxy**2) - colours / (2 * bilateral_srgb**2))
    np.fill_diagonal(spatial, 0)
    np.fill_diagonal(bilateral, 0)
    unary = -np.log(np.clip(probs.reshape(k, -1), 1e-5, None))
    q = softmax(-unary)
    for _ in range(iterations):
        q = softmax(-unary + spatial_compat * q @ spatial + bilateral_compat * q @ bilateral)
    return q.reshape(k, h, w)


def noisy_probs(image: np.ndarray, num_labels: int, seed: int) -> torch.Tensor:
    """A noisy softmax labelling: luminance quantiles as labels, logits 2 * one-hot plus N(0, 1.5^2) noise."""
    generator = torch.Generator().manual_seed(seed)
    luminance = torch.as_tensor(image).double().mean(dim=-1)
    edges = torch.quantile(luminance.flatten(), torch.linspace(0, 1, num_labels + 1, dtype=torch.float64)[1:-1])
    one_hot = torch.nn.functional.one_hot(torch.bucketize(luminance, edges), num_labels).permute(2, 0, 1)
    noise = torch.randn(num_labels, *luminance.shape, generator=generator, dtype=torch.float64)
    return torch.softmax(2.0 * one_hot + 1.5 * noise, dim=0).float()


def photo(height: int, width: int) -> np.ndarray:
    """matplotlib's sample photograph (Grace Hopper, 512 x 600), resized."""
    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return np.array(Image.open(path).convert("RGB").resize((width, height)))


@pytest.fixture
def small_scene() -> tuple[np.ndarray, np.ndarray]:
    """A 20 x 28 image (not square: catches swapped axes) and K = 3 probabilities, float64."""
    rng = np.random.default_rng(0)
    image = np.zeros((20, 28, 3), np.uint8)
    image[:, :14] = (200, 60, 40)
    image[8:, 10:] = (30, 90, 210)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    return softmax(rng.normal(0, 4.0, (3, 20, 28))), image  # wide: some probabilities under the 1e-5 clip


PARAMETERS = [{}, dict(iterations=3, spatial_sxy=1.5, spatial_compat=2.0, bilateral_sxy=10.0, bilateral_srgb=30.0,
                       bilateral_compat=4.0)]


@pytest.mark.parametrize("parameters", PARAMETERS, ids=["pydensecrf-defaults", "other"])
def test_dense_crf_equals_the_full_matrix_mean_field(small_scene, parameters):
    probs, image = small_scene
    out = dense_crf(torch.from_numpy(probs), image, **parameters)
    expected = naive_dense_crf(probs, image, **parameters)
    assert np.abs(expected - probs).max() > 0.3  # the CRF does change the labelling
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)


def test_dense_crf_in_chunks_equals_the_full_matrix_mean_field(small_scene, monkeypatch):
    monkeypatch.setattr(crf, "KERNEL_BUDGET", 5000)  # 8 rows of 560 at a time, the last chunk short
    probs, image = small_scene
    out = dense_crf(torch.from_numpy(probs), torch.from_numpy(image))
    np.testing.assert_allclose(out.numpy(), naive_dense_crf(probs, image), rtol=0, atol=1e-5)


def test_approximate_bilateral_message_keeps_the_exact_labels():
    image = photo(384, 450)[50:170, 170:290]  # 120 x 120: face, collar and background
    probs = noisy_probs(image, num_labels=5, seed=0)
    exact = dense_crf(probs, image, max_cells=120 * 120).argmax(dim=0)
    changed = (exact != probs.argmax(dim=0)).double().mean()
    assert changed > 0.2, f"the CRF changed only {changed:.1%} of labels: no test of the approximation"
    # 4096 cells: 3.5 pixels a cell; 512: 28, nearer the default's 43 or more on a whole 512 x 683 image
    for max_cells in (4096, 512):
        agreement = (dense_crf(probs, image, max_cells=max_cells).argmax(dim=0) == exact).double().mean()
        assert agreement >= 0.97, f"with {max_cells} cells, labels agree with the exact ones on {agreement:.2%}"


def test_dense_crf_cleans_a_noisy_labelling_of_a_two_colour_image():
    rng = np.random.default_rng(1)
    truth = np.zeros((96, 128), np.int64)  # 12,288 pixels: the approximate path
    truth[:, 70:] = 1
    truth[30:60, 20:45] = 1
    image = np.where(truth[..., None] == 1, (40, 60, 190), (190, 70, 40)) + rng.normal(0, 10, (96, 128, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    noisy = np.where(rng.random(truth.shape) < 0.3, 1 - truth, truth)
    probs = torch.from_numpy(np.where(np.arange(2)[:, None, None] == noisy, 0.65, 0.35)).float()
    before = (noisy == truth).mean()
    after = (dense_crf(probs, image).argmax(dim=0).numpy() == truth).mean()
    assert before < 0.75 and after > 0.99


def test_dense_crf_takes_seconds_on_a_whole_ade20k_sized_image():
    image = photo(512, 683)
    probs = torch.softmax(torch.randn(20, 512, 683, generator=torch.Generator().manual_seed(0)), dim=0)
    start = time.perf_counter()
    out = dense_crf(probs, image)
    seconds = time.perf_counter() - start
    assert out.shape == probs.shape and torch.allclose(out.sum(dim=0), torch.ones(512, 683))
    assert seconds < 30, f"{seconds:.1f} s for 512 x 683, K = 20 (about 2 s on 2 CPU cores)"


def test_dense_crf_explains_bad_arguments():
    with pytest.raises(ValueError, match="H x W x 3"):
        dense_crf(torch.full((3, 8, 9), 1 / 3), np.zeros((9, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="K x H x W"):
        dense_crf(torch.full((8, 9), 1.0), np.zeros((8, 9, 3), np.uint8))
    with pytest.raises(ValueError, match="max_cells"):
        dense_crf(torch.full((3, 8, 9), 1 / 3), np.zeros((8, 9, 3), np.uint8), max_cells=0)


def naive_merge(segments: np.ndarray, image: np.ndarray, target: int) -> np.ndarray:
    """The merging rule with plain loops, adjacency and means recomputed from the pixels at every merge."""
    segments = segments.copy()
    while len(np.unique(segments)) > target:
        touching = set()
        for a, b in zip(np.r_[segments[:, :-1].ravel(), segments[:-1].ravel()],
                        np.r_[segments[:, 1:].ravel(), segments[1:].ravel()]):
            if a != b:
                touching.add((min(a, b), max(a, b)))
        mean = {label: image[segments == label].mean(axis=0) for label in np.unique(segments)}
        a, b = min(touching, key=lambda pair: (np.linalg.norm(mean[pair[0]] - mean[pair[1]]), pair))
        keep, drop = (a, b) if (segments == a).sum() >= (segments == b).sum() else (b, a)
        segments[segments == drop] = keep
    return segments


QUADRANTS = {57: (slice(0, 20), slice(0, 20)), 8: (slice(0, 20), slice(20, 40)),
             40: (slice(20, 40), slice(0, 20)), 71: (slice(20, 40), slice(20, 40))}  # by their largest piece


def four_blocks_in_ten_pieces() -> tuple[np.ndarray, np.ndarray]:
    """A 40 x 40 image of 4 flat-ish colour blocks, each cut into pieces, the largest over half its block."""
    rng = np.random.default_rng(2)
    image = np.zeros((40, 40, 3))
    for block, colour in zip(QUADRANTS.values(), [(220, 30, 30), (30, 200, 40), (40, 40, 220), (230, 220, 40)]):
        image[block] = colour
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    segments = np.zeros((40, 40), np.int64)
    segments[0:20, 0:20], segments[0:5, 0:20], segments[5:20, 0:4] = 57, 3, 11  # 240 of 400 pixels for 57
    segments[0:20, 20:40], segments[14:20, 20:40] = 8, 90
    segments[20:40, 0:20], segments[20:40, 15:20], segments[20:25, 0:15] = 40, 2, 64
    segments[20:40, 20:40], segments[30:40, 35:40] = 71, 5
    return segments, image


def test_merge_recovers_four_colour_blocks_from_ten_pieces():
    segments, image = four_blocks_in_ten_pieces()
    assert len(np.unique(segments)) == 10
    merged = merge_segments(segments, image, target=4).numpy()
    assert sorted(np.unique(merged)) == sorted(QUADRANTS)  # each block keeps its largest piece's label
    for label, block in QUADRANTS.items():
        assert (merged[block] == label).all()


@pytest.mark.parametrize("target", [1, 3, 8, 20])
def test_merge_follows_the_rule_on_random_label_maps(target):
    rng = np.random.default_rng(target)
    coarse = rng.choice(rng.choice(1000, 30, replace=False), size=(6, 8))  # labels repeat: segments not connected
    segments = np.kron(coarse, np.ones((5, 5), np.int64))[:, :37]
    palette = {label: rng.integers(0, 256, 3) for label in np.unique(segments)}
    image = np.array([[palette[label] for label in row] for row in segments]) + rng.integers(-20, 21, (30, 37, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    merged = merge_segments(torch.from_numpy(segments), torch.from_numpy(image), target=target)
    assert merged.dtype == torch.int64
    np.testing.assert_array_equal(merged.numpy(), naive_merge(segments, image, target))
    assert set(np.unique(merged.numpy())) <= set(np.unique(segments))
    assert len(np.unique(merged.numpy())) == min(target, len(np.unique(segments)))


def test_merge_never_joins_labels_that_do_not_touch():
    segments = np.full((30, 30), 1)
    segments[10:20, 10:20] = 2  # an island inside 1, near the colour of 3 but touching only 1
    segments[:, 25:] = 3
    image = np.zeros((30, 30, 3), np.uint8)
    image[segments == 1] = (250, 250, 250)
    image[segments == 2] = (20, 20, 20)
    image[segments == 3] = (0, 0, 0)  # 2 and 3 the closest pair, 1 and 2 the closest pair that touches
    merged = merge_segments(segments, image, target=2).numpy()
    assert set(np.unique(merged)) == {1, 3}  # the island went into its neighbour, not into its near twin
    assert (merged[10:20, 10:20] == 1).all()


def test_merge_keeps_the_input_when_target_allows_every_label():
    segments, image = four_blocks_in_ten_pieces()
    np.testing.assert_array_equal(merge_segments(segments, image, target=10).numpy(), segments)
    np.testing.assert_array_equal(merge_segments(segments, image, target=64).numpy(), segments)
