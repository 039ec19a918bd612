"""Every model variant by name: `create("segmenter_t16_mask")`, `list_models()`.

A family file registers its constructors with `@register(name, family)`; a constructor takes keyword options
(e.g. num_classes, drop_path_rate) and returns a plain nn.Module. This module imports no family:
models/__init__.py imports them (one line each), as timm does, so every `import models` registers them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str  # "wnet" | "segmenter" | "dino"
    build: Callable[..., nn.Module]
    description: str


_MODELS: dict[str, ModelEntry] = {}


def register(name: str, family: str):
    def decorate(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = ModelEntry(name, family, build, (build.__doc__ or "").strip().splitlines()[0] if build.__doc__ else "")
        return build

    return decorate


def entries() -> list[ModelEntry]:
    return [_MODELS[name] for name in sorted(_MODELS)]


def list_models() -> list[str]:
    return [entry.name for entry in entries()]


def entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise KeyError(name)
    return _MODELS[name]
