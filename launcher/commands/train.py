"""`segjobs train`: a job spec trained in this process (one rank of several under torchrun).

    segjobs train jobs/demo_segmenter.yaml --set train.max_steps=100
    segjobs train --model segmenter --batch-size 16 --epochs 30 --learning-rate 0.001 --pretrained

`--model FAMILY` starts from the family's own job spec (its Task's `shortcut_spec`), with the shortcut flags
turned into --set overrides; explicit --set overrides win.
"""

from __future__ import annotations

from pathlib import Path

from launcher.spec import SpecError, load_spec

REPOSITORY = Path(__file__).resolve().parents[2]


def shortcut(family: str, batch_size: int | None, epochs: int | None, lr: float | None, pretrained: str | None,
             overrides: list[str]) -> tuple[str, list[str]]:
    """The family's job spec and the overrides the shortcut flags stand for."""
    from launcher.training.families import family_names, task_class

    try:
        task = task_class(family)
    except KeyError:
        raise SpecError(f"--model {family}: expected one of {', '.join(family_names())}.") from None
    if task.shortcut_spec is None:
        raise SpecError(f"--model {family}: the family has no job spec to start from; pass a spec file.")
    extra = []
    if batch_size is not None:
        extra.append(f"data.batch_size={batch_size}")
    if epochs is not None:
        extra += [f"train.epochs={epochs}", "train.max_steps=null"]
    if lr is not None:
        extra.append(f"optim.lr={lr}")
    if pretrained is not None:
        extra += task.shortcut_pretrained(pretrained)
    else:  # the shortcut trains from random weights unless --pretrained is given
        extra.append("model.pretrained=null")
    return str(REPOSITORY / task.shortcut_spec), extra + overrides


def main(spec_path: str | None, overrides: list[str], family: str | None = None, batch_size: int | None = None,
         epochs: int | None = None, lr: float | None = None, pretrained: str | None = None) -> int:
    from launcher.cluster.queue import slurm_job_running
    from launcher.training.trainer import run_spec

    if family:
        spec_path, overrides = shortcut(family, batch_size, epochs, lr, pretrained, overrides)
    elif spec_path is None:
        raise SpecError("segjobs train: pass a job spec (e.g. jobs/demo_segmenter.yaml) or --model.")
    result = run_spec(load_spec(spec_path, overrides), spec_path, job_running=slurm_job_running)
    if result.get("eval") and result["main"]:
        print(f"step {result['step']}: mIoU {result['eval']['miou']:.4f}, pixel accuracy {result['eval']['pixel_acc']:.4f}")
    return 0
