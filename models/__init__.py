"""The networks segjobs trains, as plain nn.Modules, and their losses.

    import models
    model = models.create("segmenter_t16_mask")                       # random init
    model = models.create("dino_vits8", pretrained="dino_deitsmall8_pretrain.pth")
    models.list_models()
"""

from __future__ import annotations

from torch import nn

from models import dino, segmenter, wnet  # noqa: F401 - importing registers their variants
from models.pretrained import LoadReport, PretrainedError, build_exported, load_pretrained, read_export
from models.registry import entries, entry, list_models


def create(name: str, pretrained: str | None = None, **options) -> nn.Module:
    """Build a registered variant; `pretrained` is a local file in any format models.pretrained reads. A file of
    `segjobs export` also supplies the options it was trained with (options given here win)."""
    try:
        build = entry(name).build
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}") from None
    exported = read_export(pretrained) if pretrained else None
    if exported is not None:
        return build_exported(pretrained, exported, name, build, options)
    model = build(**options)
    if pretrained:
        load_pretrained(model, pretrained)
    return model


def parameter_counts(name: str, model: nn.Module) -> dict[str, int | str]:
    """{"name", "family", "params"} plus, for DINO, "backbone_params" and "head_params"."""
    family = entry(name).family
    info: dict[str, int | str] = {"name": name, "family": family, "params": sum(p.numel() for p in model.parameters())}
    if family == "dino":
        info["backbone_params"] = sum(p.numel() for p in model.backbone.parameters())
        info["head_params"] = sum(p.numel() for p in model.head.parameters())
    return info


__all__ = ["create", "entries", "list_models", "load_pretrained", "parameter_counts", "LoadReport", "PretrainedError"]
