"""Segmenter: Transformer for Semantic Segmentation (Strudel et al. 2021, https://arxiv.org/abs/2105.05633).

A ViT encoder (timm's, see models/vit.py) turns the image into patch tokens; a decoder turns them into
per-class masks at patch resolution, upsampled bilinearly to the input size:
- linear: one Linear from the token width to the classes.
- mask transformer: n_cls learnable class embeddings join the patch tokens through 2 transformer blocks;
  masks are the dot products of L2-normalised patch and class projections, LayerNorm-ed over classes.

Faithful to rstrudel/segmenter: same parameter names (`encoder.*`, `decoder.*`), LayerNorm eps 1e-5,
bilinear pos-embed resizing, inputs zero-padded to a patch multiple and logits cropped back, encoder drop path
0.1, decoder dropout 0.1. The reference's unused 1000-class encoder head is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from models.registry import register
from models.vit import ViT, ViTConfig, pad_to_patch_multiple, vit_config

LAYER_NORM_EPS = 1e-5  # torch's default, which the reference uses throughout


@dataclass(frozen=True)
class SegmenterConfig:
    encoder: ViTConfig = field(default_factory=ViTConfig)
    decoder: str = "mask"  # "mask" | "linear"
    num_classes: int = 150
    decoder_depth: int = 2
    decoder_dropout: float = 0.1


def init_weights(module: nn.Module) -> None:
    """The reference's decoder initialisation: Linear weights truncated normal (std 0.02, cut at +-2), zero
    biases; LayerNorm weight 1, bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class LinearDecoder(nn.Module):
    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.head = nn.Linear(width, num_classes)
        self.apply(init_weights)

    def forward(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        logits = self.head(patches)  # B, h * w, classes
        return logits.transpose(1, 2).reshape(patches.shape[0], -1, *grid)


class MaskTransformer(nn.Module):
    def __init__(self, width: int, num_classes: int, depth: int, dropout: float):
        super().__init__()
        heads = width // 64
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(width, width)
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, width))
        norm = partial(nn.LayerNorm, eps=LAYER_NORM_EPS)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio=4.0, qkv_bias=True, proj_drop=dropout, attn_drop=dropout, norm_layer=norm)
            for _ in range(depth)
        )
        scale = width ** -0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(width, width))
        self.proj_classes = nn.Parameter(scale * torch.randn(width, width))
        self.decoder_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mask_norm = nn.LayerNorm(num_classes, eps=LAYER_NORM_EPS)
        self.apply(init_weights)  # the blocks' layers too; proj_patch and proj_classes keep scale x N(0, 1)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = torch.cat([self.proj_dec(patches), self.cls_emb.expand(patches.shape[0], -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patch_feats = x[:, : -self.num_classes] @ self.proj_patch
        class_feats = x[:, -self.num_classes :] @ self.proj_classes
        patch_feats = patch_feats / patch_feats.norm(dim=-1, keepdim=True)
        class_feats = class_feats / class_feats.norm(dim=-1, keepdim=True)
        masks = self.mask_norm(patch_feats @ class_feats.transpose(1, 2))  # B, h * w, classes
        return masks.transpose(1, 2).reshape(patches.shape[0], self.num_classes, *grid)

    def no_weight_decay(self) -> set[str]:
        return {"cls_emb"}


class Segmenter(nn.Module):
    """`forward(images) -> logits (B, num_classes, H, W)` at the input's resolution, for any H, W."""

    def __init__(self, config: SegmenterConfig):
        super().__init__()
        self.config = config
        self.patch_size = config.encoder.patch_size
        self.encoder = ViT(config.encoder)
        width = config.encoder.embed_dim
        if config.decoder == "linear":
            self.decoder = LinearDecoder(width, config.num_classes)
        elif config.decoder == "mask":
            self.decoder = MaskTransformer(width, config.num_classes, config.decoder_depth, config.decoder_dropout)
        else:
            raise ValueError(f"decoder must be 'linear' or 'mask', got {config.decoder!r}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        padded = pad_to_patch_multiple(images, self.patch_size)
        grid = (padded.shape[-2] // self.patch_size, padded.shape[-1] // self.patch_size)
        patches = self.encoder.tokens(padded)[:, 1:]
        masks = self.decoder(patches, grid)
        masks = F.interpolate(masks, size=padded.shape[-2:], mode="bilinear")
        return masks[..., :height, :width]

    def no_weight_decay(self) -> set[str]:
        names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        if isinstance(self.decoder, MaskTransformer):
            names |= {f"decoder.{n}" for n in self.decoder.no_weight_decay()}
        return names


@torch.no_grad()
def sliding_window_logits(model: nn.Module, images: torch.Tensor, window: int = 512, stride: int = 512,
                          batch: int = 8) -> torch.Tensor:
    """The reference's sliding-window inference (segm/model/utils.py: resize, sliding_window, merge_windows).

    The short side is first brought up to `window` when smaller (bilinear, keeping the aspect ratio); windows of
    `window` x `window` start every `stride` pixels, the last one aligned to the border; where windows overlap
    their logits are averaged. Returns logits (B, classes, H', W') at the possibly enlarged size: the caller
    resizes them to the label's size (bilinear) before the softmax, as the reference does.
    """
    height, width = images.shape[-2:]
    if min(height, width) < window:
        ratio = max(height, width) / min(height, width)
        size = (window, int(ratio * window)) if height < width else (int(ratio * window), window)
        images = F.interpolate(images, size=size, mode="bilinear")
        height, width = size
    tops = [t for t in range(0, height, stride) if t < height - window] + [height - window]
    lefts = [x for x in range(0, width, stride) if x < width - window] + [width - window]
    anchors = [(top, left) for top in tops for left in lefts]
    counts = images.new_zeros(height, width)
    for top, left in anchors:
        counts[top : top + window, left : left + window] += 1
    logits = None  # sized by the first windows' output: `model` may be wrapped (DDP, FSDP)
    for index, image in enumerate(images):
        for first in range(0, len(anchors), batch):
            chunk = anchors[first : first + batch]
            crops = torch.stack([image[:, top : top + window, left : left + window] for top, left in chunk])
            crop_logits = model(crops).float()
            if logits is None:
                logits = crop_logits.new_zeros(images.shape[0], crop_logits.shape[1], height, width)
            for (top, left), window_logits in zip(chunk, crop_logits):
                logits[index, :, top : top + window, left : left + window] += window_logits
    return logits / counts


def _segmenter(size: str, patch_size: int, decoder: str, img_size: int = 512, **options) -> Segmenter:
    encoder_keys = {"drop_path_rate", "dropout"}
    encoder_options = {k: options.pop(k) for k in list(options) if k in encoder_keys}
    encoder = vit_config(size, patch_size, img_size=img_size, layer_norm_eps=LAYER_NORM_EPS, pos_resize="bilinear",
                         **{"drop_path_rate": 0.1, **encoder_options})
    return Segmenter(SegmenterConfig(encoder=encoder, decoder=decoder, **options))


@register("segmenter_t16_linear", "segmenter")
def segmenter_t16_linear(**options) -> Segmenter:
    """Seg-T/16, linear decoder: the "Tiny" variant (patch 16, width 192)."""
    return _segmenter("tiny", 16, "linear", **options)


@register("segmenter_t16_mask", "segmenter")
def segmenter_t16_mask(**options) -> Segmenter:
    """Seg-T-Mask/16: the "Tiny" variant with the mask transformer."""
    return _segmenter("tiny", 16, "mask", **options)


@register("segmenter_s16_linear", "segmenter")
def segmenter_s16_linear(**options) -> Segmenter:
    return _segmenter("small", 16, "linear", **options)


@register("segmenter_s16_mask", "segmenter")
def segmenter_s16_mask(**options) -> Segmenter:
    return _segmenter("small", 16, "mask", **options)


@register("segmenter_b16_mask", "segmenter")
def segmenter_b16_mask(**options) -> Segmenter:
    return _segmenter("base", 16, "mask", **options)


@register("segmenter_b8_linear", "segmenter")
def segmenter_b8_linear(**options) -> Segmenter:
    """Seg-B/8, linear decoder: the "Standard" variant (patch 8, width 768)."""
    return _segmenter("base", 8, "linear", **options)


@register("segmenter_b8_mask", "segmenter")
def segmenter_b8_mask(**options) -> Segmenter:
    """Seg-B-Mask/8: the "Standard" variant with the mask transformer."""
    return _segmenter("base", 8, "mask", **options)


@register("segmenter_l16_mask", "segmenter")
def segmenter_l16_mask(**options) -> Segmenter:
    """Seg-L-Mask/16, trained at 640x640 in the paper."""
    return _segmenter("large", 16, "mask", **{"img_size": 640, **options})
