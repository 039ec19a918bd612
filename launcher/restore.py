"""A trained model back from a run or a checkpoint folder, for `segjobs eval` and `segjobs visualize`.

    spec, task, accelerator, checkpoint = restore("runs/demo_segmenter")          # the latest checkpoint
    spec, task, accelerator, checkpoint = restore("/elsewhere/step_00000300", ["data.val=data/shards/validation"])

A checkpoint folder carries its spec in meta.json, so one copied from another machine works on its own; its
data paths may need `--set data.val=...` here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from launcher import runs
from launcher.checkpoint import STEP_DIR
from launcher.spec import JobSpec, SpecError, parse_spec


def find_checkpoint(target: str) -> Path:
    """A checkpoint folder (step_NNNNNNNN with meta.json), or the latest complete one of a run (name or folder)."""
    path = Path(target)
    if (path / "meta.json").is_file() and (path / "shared.pt").is_file():
        return path
    run_dir = runs.resolve_run(target)
    steps = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if STEP_DIR.match(p.name))
    if not steps:
        raise runs.RunError(f"{run_dir}: no checkpoint yet (checkpoints/step_NNNNNNNN).")
    return steps[-1]


def output_folder(checkpoint: Path) -> Path:
    """Where eval/ and pictures/ of a checkpoint go: its run directory, or beside a loose checkpoint folder."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def checkpoint_spec(checkpoint: Path, overrides: list[str]) -> JobSpec:
    meta = json.loads((checkpoint / "meta.json").read_text())
    raw = meta.get("spec")
    if raw is None:  # written before checkpoints carried their spec: the run's spec.yaml
        import yaml

        spec_file = checkpoint.parent.parent / "spec.yaml"
        if not spec_file.exists():
            raise SpecError(f"{checkpoint}: no spec in meta.json and no {spec_file}.")
        raw = yaml.safe_load(spec_file.read_text())
    return parse_spec(raw, str(checkpoint), overrides)


def restore(target: str, overrides: list[str] = ()):
    """(spec, task with the checkpoint's weights in eval mode, accelerator, checkpoint folder)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    import models
    from launcher.tasks import task_class

    checkpoint = find_checkpoint(target)
    spec = checkpoint_spec(checkpoint, list(overrides))
    cuda = torch.cuda.is_available()
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    precision = spec.train.precision if cuda else "no"
    accelerator = Accelerator(cpu=not cuda, mixed_precision=precision)
    spec.model.pretrained = None  # the checkpoint holds every weight
    task = task_class(models.entry(spec.model.name).family)(spec, accelerator, 1, 1)
    # weights_only: a checkpoint from elsewhere cannot run code when loaded (the RNG files are not read).
    shared = torch.load(checkpoint / "shared.pt", map_location="cpu", weights_only=True)
    task.model.load_state_dict(shared["model"])
    task.load_extra_state(shared["task"])
    task.parallel_wrap(lambda module, trainable=True: module.to(accelerator.device))  # every network of the task
    task.model.eval()
    return spec, task, accelerator, checkpoint
