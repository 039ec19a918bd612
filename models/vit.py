"""The Vision Transformer that Segmenter and DINO share: timm's VisionTransformer (its blocks use fused
scaled_dot_product_attention and drop path), with one backbone API and explicit pos-embed resizing.

Parameter names are timm's, which are also those of the DINO and Segmenter reference code
(`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`,
`norm`), so official checkpoints load without renaming.

Note: the two references differ in details that change outputs, so they are options here, not forks:
- LayerNorm eps: DINO 1e-6, Segmenter 1e-5 (torch's default).
- Pos-embed resizing for other input sizes: Segmenter resizes the grid to the new size with bilinear
  interpolation, and only when the token count changes (`pos_resize="bilinear"`); DINO uses bicubic
  interpolation by a scale factor of (new + 0.1) / old per side, unless the token count is unchanged and
  the image is square (`pos_resize="dino"`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    img_size: int = 224  # the size pos_embed is stored for
    layer_norm_eps: float = 1e-6
    pos_resize: str = "dino"  # "dino" | "bilinear"
    drop_path_rate: float = 0.0
    dropout: float = 0.0  # on attention weights, projections and MLP outputs (Segmenter's `dropout`)


VIT_SIZES = {  # (embed_dim, depth, num_heads): Dosovitskiy et al. 2021; Touvron et al. 2021 for Tiny/Small
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


def vit_config(size: str, patch_size: int, **overrides) -> ViTConfig:
    embed_dim, depth, num_heads = VIT_SIZES[size]
    return ViTConfig(**{"patch_size": patch_size, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads,
                        **overrides})


class ViT(VisionTransformer):
    """A ViT without a classifier; `forward(images)` returns the CLS feature after the final norm (B, D)."""

    def __init__(self, config: ViTConfig):
        super().__init__(
            img_size=config.img_size, patch_size=config.patch_size, num_classes=0, embed_dim=config.embed_dim,
            depth=config.depth, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps), drop_path_rate=config.drop_path_rate,
            proj_drop_rate=config.dropout, attn_drop_rate=config.dropout,
        )
        self.config = config

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.config.img_size // self.config.patch_size
        return side, side

    def resized_pos_embed(self, grid: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
        """pos_embed for a `grid` of patches cut from an image of `image_size`, resized as this model's
        reference does, including when each reference leaves it alone."""
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        old_h, old_w = self.grid_size
        same_count = grid[0] * grid[1] == old_h * old_w
        grid_pos = patch_pos.reshape(1, old_h, old_w, -1).permute(0, 3, 1, 2)
        if self.config.pos_resize == "dino":
            if same_count and image_size[0] == image_size[1]:  # DINO compares the image's sides, not the grid's
                return self.pos_embed
            # DINO's interpolate_pos_encoding: a scale factor with +0.1 to avoid floating-point truncation.
            grid_pos = F.interpolate(grid_pos, scale_factor=((grid[0] + 0.1) / old_h, (grid[1] + 0.1) / old_w), mode="bicubic")
        else:
            if same_count:  # Segmenter resizes only when the token count changes
                return self.pos_embed
            grid_pos = F.interpolate(grid_pos, size=grid, mode="bilinear")
        return torch.cat([cls_pos, grid_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the CLS token prepended and positions added: (B, 1 + h * w, D)."""
        patches = self.patch_embed.proj(images)  # B, D, h, w; a remainder smaller than a patch is dropped
        grid = tuple(patches.shape[-2:])
        tokens = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.pos_drop(tokens + self.resized_pos_embed(grid, tuple(images.shape[-2:])))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: (B, 1 + num_patches, D), CLS first."""
        return self.norm(self.blocks(self.embed(images)))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(images)[:, 0]

    def get_intermediate_layers(self, images: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """The normed tokens of the last `n` blocks (DINO's linear-probe and k-NN features)."""
        x = self.embed(images)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs

    def last_attention(self, images: torch.Tensor) -> torch.Tensor:
        """The last block's attention weights, (B, heads, 1 + N, 1 + N); computed explicitly, since the fused
        attention kernel does not return them (inference only: the last block's MLP is skipped)."""
        x = self.embed(images)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        attn = last.attn
        batch, count, dim = x.shape
        heads = attn.num_heads
        qkv = attn.qkv(last.norm1(x)).reshape(batch, count, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}


def pad_to_patch_multiple(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Zero-pad bottom and right to multiples of the patch size (Segmenter's `padding`)."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % patch_size, -width % patch_size
    return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images


def grid_side(num_patches: int) -> int:
    side = int(math.isqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"{num_patches} position embeddings do not form a square grid")
    return side
