"""DINO: Emerging Properties in Self-Supervised Vision Transformers (Caron et al. 2021,
https://arxiv.org/abs/2104.14294).

A student and a teacher (same architecture: ViT backbone + DINOHead) see different crops of an image; the
student learns to match the teacher's centred, sharpened output distribution, and the teacher is an EMA of
the student. The last block's CLS attention segments objects without labels.

Faithful to facebookresearch/dino: LayerNorm eps 1e-6, bicubic pos-embed interpolation by (n + 0.1) / N,
parameter names `backbone.*` / `head.mlp.*` / `head.last_layer.weight_{g,v}`, and the loss, centre, head
and schedules below. Training-loop pieces (EMA, clipping, last-layer freezing) are pure functions here;
the DINO family in launcher/training/families/dino.py calls them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.registry import register
from models.vit import ViT, ViTConfig, vit_config


@dataclass(frozen=True)
class DINOConfig:
    backbone: ViTConfig = field(default_factory=ViTConfig)
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    use_bn_in_head: bool = False
    norm_last_layer: bool = True  # False helps ViT-S reach better results, at some cost in stability (DINO README)


class WeightNormLinear(nn.Module):
    """Linear without bias, weight = g * v / ||v|| per output row: torch's weight_norm(dim=0), with the
    reference's parameter names `weight_g` (out, 1) and `weight_v` (out, in)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=5 ** 0.5)  # nn.Linear's init
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """MLP (hidden 2048, GELU, optional BN) -> bottleneck 256 -> L2 normalise -> weight-normed layer to out_dim."""

    def __init__(self, in_dim: int, config: DINOConfig):
        super().__init__()
        dims = [in_dim] + [config.hidden_dim] * (max(config.head_layers, 1) - 1) + [config.bottleneck_dim]
        layers: list[nn.Module] = []
        for index, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if index < len(dims) - 2:
                if config.use_bn_in_head:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(config.bottleneck_dim, config.out_dim)
        self.last_layer.weight_g.requires_grad = not config.norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class DINO(nn.Module):
    """Backbone + head. `forward(crops)` is the multi-crop wrapper: crops of equal resolution go through the
    backbone together, then all CLS features through the head at once."""

    def __init__(self, config: DINOConfig):
        super().__init__()
        self.config = config
        self.backbone = ViT(config.backbone)
        self.head = DINOHead(config.backbone.embed_dim, config)

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        features, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(features))

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The last block's CLS-to-patch attention per head: (B, heads, num_patches)."""
        return self.backbone.last_attention(images)[:, :, 0, 1:]

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}


def attention_masks(attention: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """Per head, the smallest set of patches holding `mass` of the attention (DINO's visualisation): a bool
    tensor shaped like `attention` (..., num_patches)."""
    values, order = torch.sort(attention, dim=-1)
    cumulative = torch.cumsum(values / values.sum(dim=-1, keepdim=True), dim=-1)
    keep_sorted = cumulative > (1 - mass)
    return torch.gather(keep_sorted, -1, torch.argsort(order, dim=-1))


class DINOLoss(nn.Module):
    """Cross-entropy between the teacher's centred, sharpened softmax over the 2 global crops and the
    student's log-softmax over all crops, skipping same-view pairs, averaged over pairs; then the centre
    moves towards the teacher's batch mean (EMA, all-reduced across ranks).

    The teacher temperature warms up linearly from `warmup_teacher_temp` over `warmup_teacher_temp_epochs`
    (0.04 -> 0.07 over 30 epochs in the paper; above 0.07 training tends to be unstable)."""

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.ncrops, self.student_temp, self.center_momentum = ncrops, student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.warmup_teacher_temp, self.final_teacher_temp = warmup_teacher_temp, teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs

    def teacher_temp(self, epoch: int) -> float:
        return teacher_temperature(epoch, self.warmup_teacher_temp, self.final_teacher_temp, self.warmup_teacher_temp_epochs)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        student = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp(epoch)
        teacher = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total, terms = 0.0, 0
        for t_index, target in enumerate(teacher):
            for s_index, view in enumerate(student):
                if s_index == t_index:
                    continue
                total = total + torch.sum(-target * F.log_softmax(view, dim=-1), dim=-1).mean()
                terms += 1
        self.update_center(teacher_output)
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = teacher_output.sum(dim=0, keepdim=True)
        count = torch.tensor(float(len(teacher_output)), device=teacher_output.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_center / count, alpha=1 - self.center_momentum)


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """The reference's per-epoch array, np.linspace(warmup_temp, temp, warmup_epochs) then temp, as a function:
    nothing is allocated per epoch."""
    if epoch >= warmup_epochs:
        return temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + epoch * ((temp - warmup_temp) / (warmup_epochs - 1))


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """One value per global step: linear warmup, then cosine from `base` to `final` (DINO's cosine_scheduler).
    Used for the learning rate, the weight decay (0.04 -> 0.4) and the teacher momentum (0.996 -> 1)."""
    warmup = np.linspace(warmup_start, base, warmup_epochs * steps_per_epoch)
    steps = np.arange(epochs * steps_per_epoch - len(warmup))
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate((warmup, cosine))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, in one fused pass over all parameters."""
    teacher_params = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(teacher_params, student_params, 1 - momentum)


def clip_gradients(model: nn.Module, clip: float) -> None:
    """Clip each parameter's gradient to norm `clip` separately (the reference's clip_gradients, 3.0 in the
    paper); the norms stay on the device (no host sync)."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.norm(2)
            p.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))


def cancel_last_layer_gradients(model: DINO, epoch: int, freeze_last_layer: int = 1) -> None:
    """Keep the head's last layer fixed during the first `freeze_last_layer` epochs (helps stability)."""
    if epoch < freeze_last_layer:
        for p in model.head.last_layer.parameters():
            p.grad = None


def _dino(size: str, patch_size: int, **options) -> DINO:
    backbone_keys = {"drop_path_rate", "img_size", "depth"}  # depth: fewer blocks, for quick experiments
    backbone_options = {k: options.pop(k) for k in list(options) if k in backbone_keys}
    backbone = vit_config(size, patch_size, layer_norm_eps=1e-6, pos_resize="dino",
                          **{"drop_path_rate": 0.1, **backbone_options})
    return DINO(DINOConfig(backbone=backbone, **options))


@register("dino_vitt16", "dino")
def dino_vitt16(**options) -> DINO:
    """DINO ViT-Tiny/16 (backbone 5.5M) + head: the reference's vit_tiny (192 wide, 3 heads), for small runs."""
    return _dino("tiny", 16, **options)


@register("dino_vitt8", "dino")
def dino_vitt8(**options) -> DINO:
    """DINO ViT-Tiny/8 (backbone 5.5M) + head: a 64 px crop is 8 x 8 patches (the demo's)."""
    return _dino("tiny", 8, **options)


@register("dino_vits16", "dino")
def dino_vits16(**options) -> DINO:
    """DINO ViT-S/16 (backbone 21.7M) + head."""
    return _dino("small", 16, **options)


@register("dino_vits8", "dino")
def dino_vits8(**options) -> DINO:
    """DINO ViT-S/8 (backbone 21.7M) + head: the paper's best attention maps."""
    return _dino("small", 8, **options)


@register("dino_vitb16", "dino")
def dino_vitb16(**options) -> DINO:
    """DINO ViT-B/16 (backbone 85.8M) + head."""
    return _dino("base", 16, **options)


@register("dino_vitb8", "dino")
def dino_vitb8(**options) -> DINO:
    """DINO ViT-B/8 (backbone 85.8M) + head."""
    return _dino("base", 8, **options)
