"""A trained model back from a run or a checkpoint folder, for `segjobs eval` and `segjobs visualize`.

    spec, task, accelerator, checkpoint = restore("runs/demo_segmenter")          # the latest checkpoint
    spec, task, accelerator, checkpoint = restore("/elsewhere/step_00000300", ["data.val=data/shards/validation"])

A checkpoint folder carries its spec in meta.json, so one copied from another machine works on its own; its
data paths may need `--set data.val=...` here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from launcher import checkpoint as layout
from launcher import runs
from launcher.checkpoint import CheckpointError
from launcher.spec import JobSpec, SpecError, parse_spec, read_spec_file
from launcher.training.checkpointer import load_safely
from launcher.training.families import task_for_model
from launcher.training.parallel import build_accelerator
from launcher.training.schedules import Horizon

log = logging.getLogger("segjobs.eval")


def find_checkpoint(target: str) -> Path:
    """A checkpoint folder (step_NNNNNNNN with meta.json), or the newest intact one of a run (name or folder).
    Every file is checked against meta.json first; a damaged checkpoint is never loaded."""
    path = Path(target)
    if layout.is_checkpoint(path):
        problem = layout.verify(path)
        if problem:
            raise CheckpointError(f"{path}: the checkpoint is damaged ({problem}); nothing was loaded.")
        return path
    run_dir = runs.resolve_run(target)
    folder = layout.checkpoints_folder(run_dir)
    steps = layout.steps(folder)
    if not steps:
        raise runs.RunError(f"{run_dir}: no checkpoint yet (checkpoints/step_NNNNNNNN).")
    for step in reversed(steps):
        checkpoint = folder / layout.step_name(step)
        problem = layout.verify(checkpoint)
        if problem is None:
            return checkpoint
        log.warning("%s is damaged (%s): using the checkpoint before it", checkpoint, problem)
    raise CheckpointError(f"{folder}: every checkpoint is damaged; nothing was loaded.")


def output_folder(checkpoint: Path) -> Path:
    """Where eval/ and pictures/ of a checkpoint go: its run directory, or beside a loose checkpoint folder."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def checkpoint_spec(checkpoint: Path, overrides: list[str]) -> JobSpec:
    raw = layout.read_meta(checkpoint).get("spec")
    if raw is None:  # written before checkpoints carried their spec: the run's spec.yaml
        spec_file = checkpoint.parent.parent / "spec.yaml"
        if not spec_file.exists():
            raise SpecError(f"{checkpoint}: no spec in meta.json and no {spec_file}.")
        raw = read_spec_file(spec_file)
    return parse_spec(raw, str(checkpoint), overrides)


def restore(target: str, overrides: list[str] = (), device: str | None = None):
    """(spec, task with the checkpoint's weights in eval mode, accelerator, checkpoint folder). `device`: "cpu"
    or "cuda"; default the GPU when there is one."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device cuda: torch sees no CUDA device here; use --device cpu.")
    checkpoint = find_checkpoint(target)
    spec = checkpoint_spec(checkpoint, list(overrides))
    on_gpu = torch.cuda.is_available() and device != "cpu"
    accelerator = build_accelerator(spec.train.precision if on_gpu else "no", cpu=not on_gpu)
    spec.model.pretrained = None  # the checkpoint holds every weight
    try:
        task_class = task_for_model(spec.model.name)
    except KeyError:
        raise SpecError(f"{checkpoint}: model.name {spec.model.name[:60]!r} in its spec is not a registered model "
                        "(see `segjobs models`).") from None
    task = task_class(spec, accelerator, Horizon(steps_per_epoch=1, steps=1, stop=1, global_batch=1, warmup=0))
    # weights_only: a checkpoint from elsewhere cannot run code when loaded (the RNG files are not read).
    shared = load_safely(checkpoint / "shared.pt", torch.load, map_location="cpu", weights_only=True)
    try:
        task.model.load_state_dict(shared["model"])
        task.load_extra_state(shared["task"])
    except (KeyError, TypeError, RuntimeError) as exc:  # torch explains a mismatch over many lines: keep the first
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"{checkpoint}: its weights are not those of {spec.model.name}, the model its meta.json "
                        f"names ({first}).") from None
    task.parallel_wrap(lambda module, trainable=True: module.to(accelerator.device))  # every network of the task
    task.model.eval()
    return spec, task, accelerator, checkpoint
