"""Pretrained weights from local files (compute clusters are often offline): the only file I/O in models/.

Formats recognised, whatever the file name:
- official DINO backbone files (dino_deitsmall8_pretrain.pth, ...): a plain ViT state dict;
- full DINO training checkpoints: {"student", "teacher", ...}, keys prefixed `module.` and `backbone.`/`head.`
  (the teacher is used: it is the network the paper evaluates);
- timm checkpoints (.safetensors or .pth): a plain ViT state dict, classifier `head.*` ignored;
- official Segmenter checkpoints: {"model": {"encoder.*", "decoder.*"}, ...};
- state dicts of segjobs' own models (plain, or under "model");
- `segjobs export` files: a .safetensors file whose metadata entry "segjobs" holds the JSON config
  {"format": "segjobs-export/1", "model", "options", ...}; `create(name, pretrained=FILE)` builds the network
  with those options and loads every tensor exactly (build_exported).
A ViT backbone (DINO, timm) loads into a Segmenter encoder too: the seed's "pretrained" Segmenter.

Position embeddings are resized when the stored grid differs (bilinear for Segmenter, as its reference
does when loading ImageNet weights; bicubic for DINO). Untrusted files load with torch.load(weights_only=True);
the only class allowed beyond tensors and plain values is argparse.Namespace, which main_dino.py stores as the
checkpoint's `args` (torch's safe-globals allowlist: it sets attributes, it runs no code).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.vit import ViT, grid_side

log = logging.getLogger(__name__)

# Official DINO release files, found by name in torch's hub cache when already downloaded there.
HUB_FILES = {
    "dino_vits16": "dino_deitsmall16_pretrain.pth",
    "dino_vits8": "dino_deitsmall8_pretrain.pth",
    "dino_vitb16": "dino_vitbase16_pretrain.pth",
    "dino_vitb8": "dino_vitbase8_pretrain.pth",
}


class PretrainedError(Exception):
    """A pretrained file that cannot be used: missing, unreadable, or not weights for this model."""


@dataclass
class LoadReport:
    source: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.source}"]
        if self.resized:
            parts.append(f"resized {', '.join(self.resized)}")
        if self.missing:
            parts.append(f"{len(self.missing)} left at initialisation ({_abbreviate(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} in the file unused ({_abbreviate(self.unexpected)})")
        return "; ".join(parts)


def _abbreviate(keys: list[str], shown: int = 4) -> str:
    return ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")


def resolve(pretrained: str | Path) -> Path:
    """A file path as given, or an official name found in torch's hub cache; else a clear error."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    name = str(pretrained)
    if name in HUB_FILES:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILES[name]
        if cached.is_file():
            return cached
        raise PretrainedError(
            f"pretrained {name!r}: {HUB_FILES[name]} is not in the torch hub cache ({cached.parent}) and nothing "
            f"is downloaded at run time. Download it once where there is internet and pass the file: "
            f"pretrained=/path/to/{HUB_FILES[name]}."
        )
    raise PretrainedError(f"pretrained {name!r}: no such file (known names: {', '.join(sorted(HUB_FILES))}). Nothing is "
                          "downloaded at run time: fetch the file once where there is internet (README lists each "
                          "recipe's file), or set model.pretrained: null to train from random weights, which is a "
                          "different experiment from the paper's.")


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a checkpoint file and a word for its format."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path)), "safetensors"
        with torch.serialization.safe_globals([argparse.Namespace]):  # main_dino.py's `args`
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the file's fault here
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]  # torch's advice after it is for trusted files
        raise PretrainedError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first_line}).") from None
    if isinstance(obj, dict) and "teacher" in obj:
        state, kind = obj["teacher"], "DINO training checkpoint (teacher)"
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state, kind = obj["model"], "checkpoint with a 'model' entry"
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, kind = obj["state_dict"], "checkpoint with a 'state_dict' entry"
    else:
        state, kind = obj, "state dict"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"{path}: holds no state dict of tensors.")
    return {_strip(k, "module."): v for k, v in state.items()}, kind


def normalization_of(pretrained: str | Path | None) -> str:
    """The input statistics a weights file was trained with: "vit" (mean = std = 0.5) or "imagenet".

    - imagenet: DINO files (official backbones carry no classifier; training checkpoints a teacher; segjobs'
      DINO models name their ViT `backbone.`), DeiT files (a distillation token, or "deit" in the file name:
      a DeiT without distillation is a ViT by its keys), and no weights at all;
    - vit: Google's ViT weights as timm serves them (a ViT with its classifier `head.*`: what Segmenter starts
      from) and Segmenter checkpoints of a ViT encoder.
    A file this cannot tell (a DeiT saved as model.safetensors, say) needs data.normalization set."""
    if not pretrained or str(pretrained) in HUB_FILES:
        return "imagenet"
    path = resolve(pretrained)
    state, kind = read_state_dict(path)
    keys = [_strip(_strip(key, "encoder."), "backbone.") for key in state]
    if kind.startswith("DINO") or any(key.startswith("backbone.") for key in state):
        return "imagenet"
    if "dist_token" in keys or "deit" in path.name.lower():
        return "imagenet"
    if _is_bare_vit(state) and not any(key.startswith("head.") for key in state):
        return "imagenet"
    return "vit"


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def _is_bare_vit(state: dict[str, torch.Tensor]) -> bool:
    return "cls_token" in state and "pos_embed" in state


def adapt_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a checkpoint's keys into `model`'s namespace (backbone. for DINO, encoder. for Segmenter)."""
    targets = model.state_dict().keys()
    vit_prefix = next((p for p in ("backbone.", "encoder.") if f"{p}cls_token" in targets), "")
    if not vit_prefix:
        return state
    if _is_bare_vit(state):
        return {vit_prefix + k: v for k, v in state.items()}
    if vit_prefix == "encoder." and "backbone.cls_token" in state:  # a DINO checkpoint into a Segmenter
        return {"encoder." + k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], mode: str) -> torch.Tensor:
    """(1, 1 + N, D) position embeddings (CLS first) resized to a `grid` of patches."""
    side = grid_side(pos_embed.shape[1] - 1)
    patch_pos = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=grid, mode=mode).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)


def load_pretrained(model: nn.Module, pretrained: str | Path) -> LoadReport:
    """Load a local file (any format above) into `model`; returns and logs what was loaded and what not."""
    path = resolve(pretrained)
    state, kind = read_state_dict(path)
    state = adapt_keys(state, model)
    own = model.state_dict()
    report = LoadReport(source=f"{path} ({kind})", loaded=0)
    usable = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        target = own[key]
        if key.endswith("pos_embed") and value.shape != target.shape:
            vit = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
            mode = "bilinear" if isinstance(vit, ViT) and vit.config.pos_resize == "bilinear" else "bicubic"
            value = resize_pos_embed(value, vit.grid_size, mode)
            report.resized.append(f"{key} {tuple(state[key].shape)} -> {tuple(value.shape)}")
        if value.shape != target.shape:
            raise PretrainedError(
                f"{path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}; "
                f"is the file for another architecture (patch size, width)?"
            )
        usable[key] = value
    if not usable:
        raise PretrainedError(f"{path}: none of its {len(state)} tensors matches this model's parameter names.")
    model.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    report.missing = [k for k in own if k not in usable]
    log.info("pretrained: %s", report.summary())
    return report


# ---- segjobs' own exports ------------------------------------------------------------------------------------
EXPORT_FORMAT = "segjobs-export/1"
EXPORT_KEY = "segjobs"  # the safetensors metadata entry that holds the JSON config
OPTION_TYPES = (str, int, float, bool, type(None))


def read_export(path: str | Path) -> tuple[dict, dict[str, tuple[int, ...]]] | None:
    """(config, tensor name -> shape) of a `segjobs export` file, from its header alone; None for any other file.
    safetensors checks the header (at most 100 MB, every tensor's bytes inside the file) before anything is read."""
    path = resolve(path)
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the file's fault here
        raise PretrainedError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {str(exc)[:200]}).") from None
    if EXPORT_KEY not in metadata:
        return None
    try:
        config = json.loads(metadata[EXPORT_KEY])
    except (ValueError, RecursionError):
        config = None
    options = config.get("options") if isinstance(config, dict) else None
    if (not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT or not isinstance(config.get("model"), str)
            or not isinstance(options, dict) or not all(_plain_option(v) for v in options.values())):
        raise PretrainedError(f"{path}: its '{EXPORT_KEY}' metadata is not a config segjobs writes "
                              f"(format {EXPORT_FORMAT}, a model name, options of plain values).")
    return config, shapes


def _plain_option(value: object) -> bool:
    return isinstance(value, OPTION_TYPES) or (isinstance(value, list) and all(isinstance(v, OPTION_TYPES) for v in value))


def build_exported(path: str | Path, exported: tuple[dict, dict], name: str, build, options: dict) -> nn.Module:
    """The network of a `segjobs export` file (`exported`: read_export's answer): built with the file's options (those passed here win), checked
    against the file's tensor names and shapes on the meta device first (no memory; the build is stopped once it
    registers more tensors than the file holds, so a config asking for a huge network costs nothing), then built
    for real and loaded strictly: every tensor, no resizing. The options are as trusted as a spec's
    model.options: a constructor's own arithmetic on them (W-Net's widths, 2^levels) is not bounded here."""
    path, (config, shapes) = resolve(path), exported
    if config["model"] != name:
        raise PretrainedError(f"{path}: exported from {config['model'][:60]!r}, not {name!r}; "
                              f"create it as models.create({config['model'][:60]!r}, pretrained=...).")
    options = {**config["options"], **options}
    with _bounded_registration(limit=2 * len(shapes) + 16), torch.device("meta"):
        try:
            probe = build(**options)
        except PretrainedError:
            raise
        except Exception as exc:  # noqa: BLE001 - options from the file that do not build this model
            raise PretrainedError(f"{path}: its options {str(options)[:200]} do not build {name} "
                                  f"({type(exc).__name__}: {str(exc)[:200]}).") from None
    expected = {key: tuple(value.shape) for key, value in probe.state_dict().items()}
    if expected != shapes:
        wrong = sorted(set(expected) ^ set(shapes)) or [k for k in expected if expected[k] != shapes[k]]
        key = wrong[0]
        raise PretrainedError(f"{path}: does not hold the tensors of {name} with its options: {key} is "
                              f"{shapes.get(key, 'absent')} in the file, {expected.get(key, 'absent')} in the model "
                              f"({len(wrong)} tensor(s) differ).")
    model = build(**options)
    state, _ = read_state_dict(path)
    model.load_state_dict(state, strict=True)
    log.info("pretrained: loaded %d tensors of %s from %s (segjobs export)", len(state), name, path)
    return model


class _bounded_registration:
    """Stop a model's construction once it has registered more than `limit` parameters and buffers."""

    def __init__(self, limit: int):
        self.limit, self.count, self.handles = limit, 0, []

    def _count(self, *_):
        self.count += 1
        if self.count > self.limit:
            raise PretrainedError(f"the config builds a network of over {self.limit} tensors, more than the file holds.")

    def __enter__(self):
        from torch.nn.modules import module

        self.handles = [module.register_module_parameter_registration_hook(self._count),
                        module.register_module_buffer_registration_hook(self._count)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
