"""W-Net: A Deep Model for Fully Unsupervised Image Segmentation (Xia & Kulis 2017,
https://arxiv.org/abs/1711.08506).

Two U-Nets back to back: U-Enc maps an image to a K-way softmax segmentation, U-Dec reconstructs the image
from it. Each U-Net has 9 modules (18 in all) of two 3x3 convolutions, each followed by ReLU and batch
norm; all but the first and last module of each U-Net use depthwise-separable convolutions. Modules are
joined by 2x2 max pooling, 2x2 transposed convolutions and skip connections, as in U-Net.

Training alternates (the W-Net task runs the schedule): a soft normalized-cut step on U-Enc, then a
reconstruction step on both. `soft_ncut_loss` here is the exact loss, computed window offset by window
offset without building the HW x HW affinity matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import register


@dataclass(frozen=True)
class WNetConfig:
    num_segments: int = 20  # K
    in_channels: int = 3
    base_channels: int = 64  # paper: 64, 128, 256, 512, 1024 down the U
    levels: int = 5  # modules down the contracting path, bottom included
    dropout: float = 0.65  # the paper's rate
    # How the 3x3 convolutions pad: the paper does not say; zeros is what PyTorch W-Nets that follow it closely
    # use (AsWali/WNet, gr-b/W-Net: padding=1), fkodom/wnet-unsupervised-image-segmentation replicates.
    # reflect or replicate: no band of extra segments and off colours along the image borders, as zeros drew in
    # the demo (jobs/demo_wnet.yaml).
    padding_mode: str = "zeros"  # zeros | reflect | replicate
    # U-Dec's rate when not None (the paper: one rate after every module of both U-Nets). Dropout before U-Dec's
    # last 1x1 convolution makes the least-squares optimum shrink its weights: muted colours after training.
    decoder_dropout: float | None = None


class Module(nn.Module):
    """Two 3x3 convolutions, each followed by ReLU and BN; depthwise-separable when `separable`."""

    def __init__(self, in_channels: int, out_channels: int, separable: bool, dropout: float, padding_mode: str = "zeros"):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            if separable:
                layers += [nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, padding_mode=padding_mode),
                           nn.Conv2d(c_in, out_channels, 1)]
            else:
                layers.append(nn.Conv2d(c_in, out_channels, 3, padding=1, padding_mode=padding_mode))
            layers += [nn.ReLU(inplace=True), nn.BatchNorm2d(out_channels)]
        layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, base: int, levels: int, dropout: float,
                 padding_mode: str = "zeros"):
        super().__init__()
        widths = [base * 2**i for i in range(levels)]
        count = 2 * levels - 1
        self.down = nn.ModuleList(
            Module(in_channels if i == 0 else widths[i - 1], widths[i], separable=i != 0, dropout=dropout,
                   padding_mode=padding_mode)
            for i in range(levels)
        )
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(levels - 1)))
        self.merge = nn.ModuleList(
            Module(2 * widths[i], widths[i], separable=levels + k != count - 1, dropout=dropout,
                   padding_mode=padding_mode)
            for k, i in enumerate(reversed(range(levels - 1)))
        )
        self.out = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for index, module in enumerate(self.down):
            if index:
                x = F.max_pool2d(x, 2)
            x = module(x)
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([skips.pop(), up(x)], dim=1))
        return self.out(x)


class WNet(nn.Module):
    """`forward(images) -> (segmentation probabilities (B, K, H, W), reconstruction (B, C, H, W))`.

    Any H, W: inputs are padded (replicating edges) to a multiple of 2^(levels-1) and outputs cropped back.
    """

    def __init__(self, config: WNetConfig):
        super().__init__()
        self.config = config
        if config.padding_mode not in ("zeros", "reflect", "replicate"):
            raise ValueError(f"padding_mode must be zeros, reflect or replicate, got {config.padding_mode!r}")
        decoder_dropout = config.dropout if config.decoder_dropout is None else config.decoder_dropout
        self.encoder = UNet(config.in_channels, config.num_segments, config.base_channels, config.levels,
                            config.dropout, config.padding_mode)
        self.decoder = UNet(config.num_segments, config.in_channels, config.base_channels, config.levels,
                            decoder_dropout, config.padding_mode)
        # Images come in 0..1: start U-Dec at mid-grey. From a zero bias Adam moves the output by about lr per
        # step, so a short run reconstructs nearly black images whatever its segments are.
        nn.init.constant_(self.decoder.out.bias, 0.5)

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """U-Enc only: segmentation probabilities (B, K, H, W)."""
        padded, (height, width) = self._pad(images)
        return self.encoder(padded).softmax(dim=1)[..., :height, :width]

    def forward(self, images: torch.Tensor, decode: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`decode=False` runs U-Enc only (reconstruction None): the N-cut step, through the same forward so
        that a DDP wrapper sees it."""
        padded, (height, width) = self._pad(images)
        probs = self.encoder(padded).softmax(dim=1)
        if not decode:
            return probs[..., :height, :width], None
        reconstruction = self.decoder(probs)
        return probs[..., :height, :width], reconstruction[..., :height, :width]

    def _pad(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        multiple = 2 ** (self.config.levels - 1)
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % multiple, -width % multiple
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
        return images, (height, width)


def window_offsets(radius: float) -> list[tuple[int, int]]:
    """Half of the offsets (dy, dx) != 0 with dy^2 + dx^2 < radius^2: one of each (o, -o) pair (W is symmetric)."""
    reach = math.ceil(radius)
    return [(dy, dx) for dy in range(0, reach + 1) for dx in range(-reach, reach + 1)
            if 0 < dy * dy + dx * dx < radius * radius and (dy > 0 or dx > 0)]


class _SoftNCut(torch.autograd.Function):
    """Exact soft N-cut with a hand-written backward.

    With A = W p and D = W 1 (degrees): num_k = p_k . A_k, den_k = p_k . D, loss = K - sum_k num_k / den_k.
    W symmetric gives d num_k / d p_k = 2 A_k and d den_k / d p_k = D, so backward needs only A and D:
    memory about 2 x B*K*H*W, never one tensor per window offset, never HW x HW.
    """

    @staticmethod
    def forward(ctx, probs, image, radius, sigma_i, sigma_x):
        batch, k, height, width = probs.shape
        affinity_sum = probs.clone()  # the centre term: w_ii = 1
        degree = probs.new_ones(batch, 1, height, width)
        for dy, dx in window_offsets(radius):
            rows_i, rows_j = slice(0, height - dy), slice(dy, height)
            cols_i = slice(max(0, -dx), width - max(0, dx))
            cols_j = slice(max(0, dx), width + min(0, dx))
            diff = image[..., rows_i, cols_i] - image[..., rows_j, cols_j]
            weight = torch.exp(diff.square().sum(dim=1, keepdim=True) * (-1 / sigma_i**2) - (dy * dy + dx * dx) / sigma_x**2)
            affinity_sum[..., rows_i, cols_i].addcmul_(weight, probs[..., rows_j, cols_j])
            affinity_sum[..., rows_j, cols_j].addcmul_(weight, probs[..., rows_i, cols_i])
            degree[..., rows_i, cols_i] += weight
            degree[..., rows_j, cols_j] += weight
        num = torch.einsum("bkhw,bkhw->bk", probs, affinity_sum)
        den = torch.einsum("bkhw,bhw->bk", probs, degree[:, 0])
        ctx.save_for_backward(affinity_sum, degree, num, den)
        ctx.consumed = False
        return (k - (num / den).sum(dim=1)).mean()

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.consumed:
            raise RuntimeError("soft_ncut_loss supports a single backward per forward (no retain_graph)")
        ctx.consumed = True
        affinity_sum, degree, num, den = ctx.saved_tensors
        num, den = num[..., None, None], den[..., None, None]
        # d loss / d p_k = (num_k D - 2 A_k den_k) / den_k^2, built in A's memory: no new B*K*H*W tensor
        grad = affinity_sum.mul_(-2 * den).addcmul_(num, degree).div_(den.square())
        return grad.mul_(grad_output / affinity_sum.shape[0]), None, None, None, None


def soft_ncut_loss(probs: torch.Tensor, image: torch.Tensor, radius: float = 5, sigma_i: float = 10.0,
                   sigma_x: float = 4.0) -> torch.Tensor:
    """The soft normalized cut of Xia & Kulis, exact, averaged over the batch.

    w_ij = exp(-||F_i - F_j||^2 / sigma_i^2) * exp(-||X_i - X_j||^2 / sigma_x^2) for ||X_i - X_j|| < radius,
    else 0; loss = K - sum_k (sum_ij w_ij p_ik p_jk) / (sum_ij w_ij p_ik).

    probs: B x K x H x W (softmax output); image: B x C x H x W in the units sigma_i assumes (the paper's
    sigma_i = 10 is for 0..255 pixel values). The image receives no gradient. Computed in float32.
    """
    return _SoftNCut.apply(probs.float(), image.detach().float(), radius, sigma_i, sigma_x)


def dense_soft_ncut_loss(probs: torch.Tensor, image: torch.Tensor, radius: float = 5, sigma_i: float = 10.0,
                         sigma_x: float = 4.0) -> torch.Tensor:
    """The same loss from the full HW x HW affinity matrix: O((HW)^2) memory, a reference for tests and
    benchmarks on small images only."""
    batch, k, height, width = probs.shape
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], dim=1).to(probs)
    spatial = torch.cdist(coords, coords).square()
    features = image.flatten(2).transpose(1, 2).to(probs)  # B, HW, C
    weights = torch.exp(-torch.cdist(features, features).square() / sigma_i**2) * torch.exp(-spatial / sigma_x**2)
    weights = weights * (spatial < radius**2)
    p = probs.flatten(2)  # B, K, HW
    num = torch.einsum("bki,bij,bkj->bk", p, weights, p)
    den = torch.einsum("bki,bij->bk", p, weights)
    return (k - (num / den).sum(dim=1)).mean()


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """The squared error between the U-Dec output and the input (B x C x H x W).

    sum: ||X - U_Dec(U_Enc(X))||^2 summed over pixels and channels as the paper writes it, averaged over the
    batch like the N-cut term. mean: over every value, C x H x W times smaller (150,528 for a 224 crop)."""
    if reduction == "mean":
        return F.mse_loss(reconstruction, images)
    return (reconstruction - images).square().sum() / images.shape[0]


@register("wnet", "wnet")
def wnet(**options) -> WNet:
    """W-Net with the paper's widths (64 base channels, K = 20)."""
    return WNet(WNetConfig(**options))


@register("wnet_tiny", "wnet")
def wnet_tiny(**options) -> WNet:
    """W-Net with 16 base channels and dropout 0.2: trains on a CPU in minutes."""
    return WNet(WNetConfig(**{"base_channels": 16, "dropout": 0.2, **options}))
