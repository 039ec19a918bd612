"""Model families by name: `task_class("dino")`, `task_for_model("dino_vits8")`.

A family module registers its Task with `@register_family("name")`; launcher/training/families/__init__.py
imports the family modules (one line each), as models/__init__.py does for the networks. This module imports
no family, so a family importing `register_family` makes no circle.
"""

from __future__ import annotations

_FAMILIES: dict[str, type] = {}


def register_family(name: str):
    """Class decorator: the Task of the model family `name` (the `family` of models' registry entries)."""
    def decorate(cls: type) -> type:
        if name in _FAMILIES:
            raise ValueError(f"family {name!r} registered twice")
        cls.family = name
        _FAMILIES[name] = cls
        return cls

    return decorate


def family_names() -> list[str]:
    return sorted(_FAMILIES)


def task_class(family: str) -> type:
    """The Task of a model family; KeyError names the registered ones."""
    if family not in _FAMILIES:
        raise KeyError(f"no training family {family!r} (registered: {', '.join(family_names())})")
    return _FAMILIES[family]


def task_for_model(model_name: str) -> type:
    """The Task that trains a registered model variant."""
    import models

    return task_class(models.entry(model_name).family)
