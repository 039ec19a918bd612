"""Small job specs over the session's synthetic shards, shared by the trainer and SLURM tests."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

TINY = {
    "segmenter": {"model": {"name": "segmenter_t16_linear", "options": {"img_size": 32}},
                  "data": {"crop_size": 32, "scale": [128, 32]}},
    "wnet": {"model": {"name": "wnet_tiny", "options": {"base_channels": 8, "levels": 3, "num_segments": 4}},
             "data": {"image_size": 32}},
    "dino": {"model": {"name": "dino_vits16", "options": {"out_dim": 64, "img_size": 32, "depth": 4, "hidden_dim": 256}},
             "data": {"global_crop_size": 32, "local_crop_size": 16, "local_crops": 2},
             "optim": {"weight_decay": 0.04, "weight_decay_end": 0.4}, "train": {"clip_grad": 3.0}},
}



def write_spec(tmp_path: Path, shard_root: Path, family: str, name: str = "run", **sections) -> Path:
    spec = {
        "name": name, "seed": 1, "output_dir": str(tmp_path / name),
        "data": {"train": str(shard_root / "training"), "val": str(shard_root / "validation"), "batch_size": 4,
                 "num_workers": 0},
        "optim": {"kind": "adamw", "lr": 0.001},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "train": {"max_steps": 8, "precision": "no", "log_every": 1},
        "checkpoint": {"every_steps": 3, "keep": 5},
    }
    for section, values in [*TINY[family].items(), *sections.items()]:
        spec[section] = {**spec.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def same_losses(run_dir: Path, reference: Path) -> bool:
    """The losses of a resumed run against an uninterrupted one, step by step: equal floats on the CPU. On a GPU,
    attention and cross-entropy backward use atomic adds, so two uninterrupted runs already differ by ~1e-7;
    a state lost at resume (an RNG, an optimizer moment) differs by 1e-3 and more."""
    import pytest
    import torch

    resumed, expected = losses(run_dir), losses(reference)
    if torch.cuda.is_available():
        return resumed == pytest.approx(expected, rel=1e-5)
    return resumed == expected


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def parity_task(task_class, raw: dict, steps_per_epoch: int, global_batch: int):
    """A family's task as the step-parity tests drive it: built from `raw` on the CPU, no DDP or FSDP wrapper.
    Returns (spec, horizon, accelerator, task)."""
    import copy

    from launcher.spec import parse_spec
    from launcher.training.parallel import build_accelerator
    from launcher.training.schedules import Horizon

    spec = parse_spec(copy.deepcopy(raw), "parity")
    horizon = Horizon.of(spec, steps_per_epoch=steps_per_epoch, global_batch=global_batch)
    accelerator = build_accelerator("no")
    task = task_class(spec, accelerator, horizon)
    task.parallel_wrap(lambda module, trainable=True: module.to(accelerator.device))
    return spec, horizon, accelerator, task
