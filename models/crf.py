"""W-Net post-processing (Xia & Kulis 2017, https://arxiv.org/abs/1711.08506, section 3.3).

The paper smooths U-Enc's K-way softmax output with a fully connected CRF, then merges the resulting segments
hierarchically down to the number a benchmark asks for:

    probs = dense_crf(model.segment(images)[0], image)         # image: that picture, H x W x 3 uint8
    segments = merge_segments(probs.argmax(0), image, target=8)  # H x W labels, 8 of them

`dense_crf` is the CRF of Krähenbühl & Koltun 2011 (https://arxiv.org/abs/1210.5644) with mean-field inference,
written in torch because no maintained CRF package installs from wheels (pydensecrf and SimpleCRF are sdist only).
`merge_segments` is a colour-only stand-in for the paper's merging, which ranks boundaries by contour strength
(gPb-owt-ucm, Arbeláez et al. 2011) and so needs a contour detector this project does not have.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

UNARY_CLIP = 1e-5  # probabilities clamped before -log, as pydensecrf.utils.unary_from_softmax does
SPATIAL_TRUNCATE = 4.0  # the spatial Gaussian is cut off at 4 sigma along each axis (scipy.ndimage's default)
KERNEL_BUDGET = 2**26  # kernel entries held at once: 256 MiB in float32, an 8192-cell kernel whole


def dense_crf(probs: torch.Tensor, image: np.ndarray | torch.Tensor, iterations: int = 5,
              spatial_sxy: float = 3.0, spatial_compat: float = 3.0, bilateral_sxy: float = 80.0,
              bilateral_srgb: float = 13.0, bilateral_compat: float = 10.0, max_cells: int = 8192) -> torch.Tensor:
    """Fully connected CRF smoothing of a softmax segmentation by mean-field inference; K x H x W probabilities.

    `probs` is K x H x W (softmax over dim 0), `image` H x W x 3 RGB in 0..255 (numpy or tensor, uint8 or not).
    The energy has unary -log(max(probs, 1e-5)) and, for every pair of pixels i != j that take different labels,
    Potts penalties with two Gaussian kernels over pixel positions p (in pixels) and colours I:

        spatial, weight spatial_compat:     exp(-|p_i - p_j|^2 / (2 spatial_sxy^2))
        bilateral, weight bilateral_compat: exp(-|p_i - p_j|^2 / (2 bilateral_sxy^2)
                                                - |I_i - I_j|^2 / (2 bilateral_srgb^2))

    Mean field starts from Q = softmax(-U) and repeats `iterations` times
    Q = softmax(-U + spatial_compat * m_spatial + bilateral_compat * m_bilateral), where m(i) = sum_{j != i}
    kernel(i, j) Q(j) per label. The defaults are pydensecrf's common settings (addPairwiseGaussian(sxy=3, compat=3),
    addPairwiseBilateral(sxy=80, srgb=13, compat=10), 5 iterations). `max_cells` bounds the bilateral message's
    cost (see the note). Computed in probs' dtype (float32 unless floating already) and on its device.

    Note:
        Exact messages cost O((HW)^2); two approximations bring a whole 512 x 683 image, K = 20, to about 2 s on
        2 CPU cores.
        - The spatial kernel is a separable convolution cut off at 4 sigma along each axis (a square window of
          radius round(4 * spatial_sxy), 12 pixels by default), with zero padding: pixels outside the image do
          not exist. The cut-off taps weigh at most exp(-8) = 3e-4 of the centre.
        - The bilateral message is exact when H * W <= max_cells. Otherwise pixels are grouped into at most
          max_cells cells, the occupied boxes of a grid over the feature f = (p / bilateral_sxy, I / bilateral_srgb),
          the box width (0.25 * 2^(i/8) kernel widths) the smallest that leaves at most max_cells. Boxes split
          colour as well as position (a sparse bilateral grid), so a cell never mixes distant colours. Each cell
          sends its pixels' summed Q from their mean feature, cells exchange messages exactly, and a pixel gets
          its cell's message m expanded to first order in log about the cell mean c: m(f) = m(c) exp(g . (f - c)),
          with g the gradient of log m at c. The log of one sender's message is quadratic, so the error is second
          order in f - c; messages stay positive; an iteration costs 6 kernel products instead of 1.
          Measured against the exact path on noisy labels that the exact CRF changes on 60-85% of pixels: on a
          256 x 342 photograph, K = 8, labels agree on 98.8% of pixels with 2048 cells (the default's density on
          a whole 512 x 683 image) and 99.6% with 8192; on a 128 x 171 circuit board, K = 20 luminance bins over
          a large flat area, on 67% with 512 cells (again the default's density) and 89% with 2048, mostly by
          whole regions going to the neighbouring bin. A pixel simply taking its cell's message gets 94.0 / 97.6%
          and 60 / 85%; pooling positions alone (2-D blocks of mean colour) 79 / 85% and 17 / 24%. More cells
          cost time: the kernel is M x M.
        - Memory: the M x M cell kernel is held whole while M^2 <= 2^26 (the default's 8192 cells: 256 MiB in
          float32), else recomputed every iteration in blocks of 2^26 entries; besides, a few K x H x W tensors.
    """
    _check_crf_arguments(probs, image, max_cells)
    dtype = probs.dtype if probs.is_floating_point() else torch.float32
    probs = probs.to(dtype)
    image = _as_tensor(image).to(probs.device, dtype)
    unary = -probs.clamp_min(UNARY_CLIP).log()
    bilateral_message = _bilateral_operator(_bilateral_features(image, bilateral_sxy, bilateral_srgb), max_cells)
    q = torch.softmax(-unary, dim=0)
    for _ in range(iterations):
        spatial = _spatial_message(q, spatial_sxy)
        bilateral = bilateral_message(q)
        q = torch.softmax(-unary + spatial_compat * spatial + bilateral_compat * bilateral, dim=0)
    return q


def _check_crf_arguments(probs: torch.Tensor, image: np.ndarray | torch.Tensor, max_cells: int) -> None:
    if max_cells < 1:
        raise ValueError(f"max_cells must be at least 1, got {max_cells}")
    if probs.dim() != 3:
        raise ValueError(f"probs must be K x H x W, got shape {tuple(probs.shape)}")
    _, height, width = probs.shape
    if tuple(image.shape) != (height, width, 3):
        raise ValueError(f"image must be H x W x 3 = {height} x {width} x 3 like probs, got {tuple(image.shape)}")


def _spatial_message(q: torch.Tensor, sxy: float) -> torch.Tensor:
    """sum_{j != i} exp(-|p_i - p_j|^2 / (2 sxy^2)) q(j), the Gaussian cut off at SPATIAL_TRUNCATE sigma."""
    radius = int(SPATIAL_TRUNCATE * sxy + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=q.dtype, device=q.device)
    taps = torch.exp(-offsets.square() / (2 * sxy**2))
    column = taps.view(1, 1, -1, 1).expand(len(q), 1, -1, 1).contiguous()
    blurred = F.conv2d(q[None], column, padding=(radius, 0), groups=len(q))  # depthwise: labels don't mix
    blurred = F.conv2d(blurred, column.transpose(2, 3), padding=(0, radius), groups=len(q))
    return blurred[0] - q  # the centre tap is exp(0) = 1: take out each pixel's message to itself


def _bilateral_features(image: torch.Tensor, sxy: float, srgb: float) -> torch.Tensor:
    """HW x 5 (y / sxy, x / sxy, r / srgb, g / srgb, b / srgb), so the bilateral kernel is exp(-|f_i - f_j|^2 / 2);
    centred, since the kernel ignores a shift and small norms lose less to cancellation in |a|^2 + |b|^2 - 2ab."""
    height, width, _ = image.shape
    ys, xs = torch.meshgrid(torch.arange(height, dtype=image.dtype, device=image.device),
                            torch.arange(width, dtype=image.dtype, device=image.device), indexing="ij")
    features = torch.cat([torch.stack([ys, xs], dim=-1).reshape(-1, 2) / sxy, image.reshape(-1, 3) / srgb], dim=1)
    return features - features.mean(dim=0)


def _bilateral_operator(features: torch.Tensor, max_cells: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """q (K x H x W) -> its bilateral message, for pixels with these features: cells and kernel built once."""
    cell_of_pixel, cell_features = _bilateral_cells(features, max_cells)
    exact = len(cell_features) == len(features)  # each pixel its own cell
    offsets = (features - cell_features[cell_of_pixel]).T  # D x N: from each pixel's cell mean to the pixel
    small = len(cell_features) ** 2 <= KERNEL_BUDGET
    kernel = _gaussian_kernel(cell_features, cell_features) if small else None  # then an iteration is one matmul

    def received(sent: torch.Tensor) -> torch.Tensor:
        return sent @ kernel if small else _gaussian_sums(cell_features, sent)

    def message(q: torch.Tensor) -> torch.Tensor:
        num_labels, q_flat = len(q), q.reshape(len(q), -1)
        cell_q = q_flat.new_zeros(num_labels, len(cell_features)).index_add_(1, cell_of_pixel, q_flat)
        if exact:
            return (received(cell_q) - q_flat).reshape(q.shape)  # less each pixel's message to itself
        # log m(f) to first order about the cell mean: its gradient there is the senders' mean feature, weighted
        # by kernel and q, less the cell's mean feature
        moments = received(torch.cat([cell_q, *(cell_q * f for f in cell_features.T)])).unflatten(0, (-1, num_labels))
        at_mean = moments[0]
        slopes = moments[1:] / at_mean.clamp_min(torch.finfo(q.dtype).tiny) - cell_features.T[:, None]
        log_m = at_mean.log()[:, cell_of_pixel] + sum(slope[:, cell_of_pixel] * d for slope, d in zip(slopes, offsets))
        return (log_m.exp() - q_flat).reshape(q.shape)  # in logs: a tiny m times a large exp could overflow

    return message


def _bilateral_cells(features: torch.Tensor, max_cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cell of each pixel (N,), mean feature of each cell (M x 5)), M <= max_cells; one cell per pixel if N allows.

    Cells are the occupied boxes of a grid in feature space, its width the first of 0.25 * 2^(i/8) kernel widths
    to leave at most max_cells. Grouped with numpy: torch's CPU sort is some 25x slower, and this runs once.
    """
    if len(features) <= max_cells:
        return torch.arange(len(features), device=features.device), features
    points = features.cpu().double().numpy()
    cell_width = 0.25
    while True:
        boxes = np.floor(points / cell_width).astype(np.int64)
        boxes -= boxes.min(axis=0)
        boxes = np.ravel_multi_index(boxes.T, boxes.max(axis=0) + 1)  # one integer per box: a 1-D unique is fast
        cells, cell_of_pixel = np.unique(boxes, return_inverse=True)
        if len(cells) <= max_cells:
            break
        cell_width *= 2**0.125
    cell_of_pixel = torch.from_numpy(cell_of_pixel.reshape(-1)).to(features.device)
    counts = torch.bincount(cell_of_pixel, minlength=len(cells)).to(features.dtype)
    sums = features.new_zeros(len(cells), features.shape[1]).index_add_(0, cell_of_pixel, features)
    return cell_of_pixel, sums / counts[:, None]


def _gaussian_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(-|a_i - b_j|^2 / 2) for every row of a (P x D) and of b (Q x D): P x Q.

    |a|^2 + |b|^2 - 2ab as one matmul of [a, |a|^2, 1] and [-2b, 1, |b|^2], then in place: twice as fast as
    broadcasting the sum."""
    a_norms, b_norms = a.square().sum(dim=1, keepdim=True), b.square().sum(dim=1, keepdim=True)
    a_rows = torch.cat([a, a_norms, torch.ones_like(a_norms)], dim=1)
    b_rows = torch.cat([-2 * b, torch.ones_like(b_norms), b_norms], dim=1)
    squared = a_rows @ b_rows.T
    return squared.clamp_min_(0).mul_(-0.5).exp_()


def _gaussian_sums(features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """values @ kernel(features, features) (K x M) without holding the M x M kernel: at most KERNEL_BUDGET
    entries at a time."""
    out = torch.empty_like(values)
    rows = max(1, KERNEL_BUDGET // len(features))
    for start in range(0, len(features), rows):
        block = slice(start, start + rows)
        out[:, block] = values @ _gaussian_kernel(features, features[block])
    return out


def merge_segments(segments: np.ndarray | torch.Tensor, image: np.ndarray | torch.Tensor,
                   target: int = 8) -> torch.Tensor:
    """Greedily merge touching segments of similar colour until at most `target` labels remain; H x W int64.

    `segments` is an H x W integer label map in which each label is one segment (it need not be connected),
    `image` H x W x 3 RGB. While more than `target` labels remain, of the pairs of labels that touch
    (4-connected) the one whose mean colours are closest (Euclidean, ties to the pair of smallest labels)
    merges: the larger segment's label survives (by pixel count, ties to the smaller label) and the merged
    mean colour is the pixel-weighted mean. The pixel grid is connected, so two labels touch as long as two
    remain: exactly min(target, labels present) come out, a subset of the input's. With target >= the number
    of labels present the output equals the input.

    Note:
        The paper merges by contour strength (gPb-owt-ucm); mean colour is a detector-free stand-in.
        Runs on the CPU. Label distances and adjacency are dense L x L matrices, updated per merge: fine up
        to a few thousand labels (W-Net's K is 20).
    """
    segments = _as_tensor(segments).long().cpu()
    if tuple(image.shape) != (*segments.shape, 3):
        raise ValueError(f"image must be H x W x 3 like segments {tuple(segments.shape)}, got {tuple(image.shape)}")
    if target < 1:
        raise ValueError(f"target must be at least 1, got {target}")
    # labels ascending, ids index them; numpy's unique, as torch's CPU sort is some 25x slower
    labels, ids = (torch.from_numpy(a) for a in np.unique(segments.numpy(), return_inverse=True))
    ids = ids.reshape(segments.shape)
    if len(labels) <= target:
        return segments.clone()
    counts = torch.bincount(ids.flatten(), minlength=len(labels)).double()
    rgb = _as_tensor(image).cpu().reshape(-1, 3).double()
    sums = torch.stack([torch.bincount(ids.flatten(), rgb[:, c], minlength=len(labels)) for c in range(3)], dim=1)
    touching = _touching(ids, len(labels))
    means = sums / counts[:, None]
    distances = torch.where(touching, (means[:, None] - means[None]).norm(dim=-1), math.inf)
    owner = torch.arange(len(labels))
    for _ in range(len(labels) - target):
        a, b = divmod(int(distances.argmin()), len(labels))  # row-major: of equal distances, the smallest labels
        keep, drop = (a, b) if counts[a] >= counts[b] else (b, a)  # a < b: equal counts keep the smaller label
        counts[keep] += counts[drop]
        sums[keep] += sums[drop]
        touching[keep] |= touching[drop]
        touching[keep, keep] = touching[keep, drop] = False
        touching[:, keep] = touching[keep]
        touching[drop] = touching[:, drop] = False
        owner[owner == drop] = keep
        row = (sums / counts[:, None] - sums[keep] / counts[keep]).norm(dim=1)
        distances[keep] = distances[:, keep] = torch.where(touching[keep], row, math.inf)
        distances[drop] = distances[:, drop] = math.inf
    return labels[owner[ids]]


def _touching(ids: torch.Tensor, num_labels: int) -> torch.Tensor:
    """L x L bool: labels a != b with 4-connected neighbouring pixels, from one bincount over neighbour pairs."""
    first = torch.cat([ids[:, :-1].flatten(), ids[:-1].flatten()])
    second = torch.cat([ids[:, 1:].flatten(), ids[1:].flatten()])
    pairs = torch.bincount(first * num_labels + second, minlength=num_labels**2).view(num_labels, num_labels) > 0
    touching = pairs | pairs.T
    touching.fill_diagonal_(False)
    return touching


def _as_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor as is; an array copied (torch warns on read-only arrays, such as PIL images)."""
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.array(array))
