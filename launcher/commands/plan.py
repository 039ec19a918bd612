"""`segjobs plan`: what a spec will do, before it spends GPU hours.

    segjobs plan jobs/dino_vits16.yaml                      # the training manifest, resources' world size
    segjobs plan jobs/dino_vits16.yaml --samples 20210 --world-size 16 --json   # on a login node without the data
    segjobs plan jobs/dino_vits16.yaml --plot plan.png      # every schedule against the step

The numbers come from the functions the trainer evaluates (launcher.training.schedules and the family's
`schedules`), for the world size asked: global batch, steps per epoch, the horizon, the effective peak
learning rate, the warmup, and every schedule's value at every optimizer step.
"""

from __future__ import annotations

import json
from pathlib import Path

from launcher.cluster.sbatch import tasks_per_node
from launcher.errors import WorkFailed
from launcher.spec import SpecError, load_spec
from shards import manifest as shard_manifest

MAX_PLOTTED = 20_000  # points per curve in --plot (the JSON keeps every step)
MAX_STEPS_PLANNED = 2_000_000  # DINO's 800 ImageNet epochs at batch 1024 are 1M steps


def plan(spec_path: str, overrides: list[str] = (), world_size: int | None = None, samples: int | None = None) -> dict:
    """The resolved plan as `--json` prints it."""
    import models
    from launcher.training.families import task_for_model
    from launcher.training.schedules import Horizon

    spec = load_spec(spec_path, list(overrides))
    if spec.model.name not in models.list_models():
        raise SpecError(f"{spec_path}: model.name: {spec.model.name!r} is not a registered model (see `segjobs models`).")
    world = spec.resources.nodes * tasks_per_node(spec) if world_size is None else world_size
    if world < 1 or (samples is not None and samples < 1):
        raise SpecError(f"--world-size and --samples must be positive, got {world} and {samples}.")
    if samples is None:
        if not (spec.data.train / shard_manifest.MANIFEST).is_file():
            raise SpecError(f"{spec_path}: data.train: {spec.data.train} holds no manifest.json; pass --samples N to plan "
                            "without the data (ADE20K's training split: 20210).")
        samples = shard_manifest.load(spec.data.train).num_samples
    if samples < world * spec.data.batch_size:
        raise SpecError(f"{spec_path}: {samples} training samples make no batch of {spec.data.batch_size} on each of "
                        f"{world} processes.")
    horizon = Horizon.for_samples(spec, samples, world)
    if horizon.steps > MAX_STEPS_PLANNED:
        raise SpecError(f"{spec_path}: the horizon is {horizon.steps:,} steps; `plan` lists at most {MAX_STEPS_PLANNED:,}.")
    task = task_for_model(spec.model.name)
    schedules = task.schedules(spec, horizon)
    return {"model": spec.model.name, "family": task.family, "world_size": world, "global_batch": horizon.global_batch,
            "samples": samples, "steps_per_epoch": horizon.steps_per_epoch, "epochs": horizon.epochs,
            "total_steps": horizon.steps, "stop_step": horizon.stop, "hyper": task.hyper(spec, horizon),
            "schedules": {name: [f(step) for step in range(horizon.steps)] for name, f in schedules.items()}}


def show(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    summary = Table(show_header=False, title=f"{result['model']} ({result['family']})", title_justify="left")
    for key in ("world_size", "global_batch", "samples", "steps_per_epoch", "epochs", "total_steps", "stop_step"):
        value = result[key]
        summary.add_row(key.replace("_", " "), f"{value:.2f}" if isinstance(value, float) else f"{value:,}")
    for key, value in result["hyper"].items():
        summary.add_row(key.replace("_", " "), f"{value:.4g}" if isinstance(value, float) else str(value))
    curves = Table(title="schedules", title_justify="left")
    for column in ("schedule", "step 0", "end of warmup", "middle", "last step"):
        curves.add_column(column, justify="left" if column == "schedule" else "right")
    warmup, total = result["hyper"]["warmup_iters"], result["total_steps"]
    for name, values in result["schedules"].items():
        picks = [0, max(warmup - 1, 0), total // 2, total - 1]
        curves.add_row(name, *(f"{values[i]:.4g}" for i in picks))
    console = Console()
    console.print(summary)
    console.print(curves)


def plot(result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["schedules"])
    figure, axes = plt.subplots(len(names), 1, figsize=(8, 2.2 * len(names)), dpi=100, sharex=True, squeeze=False)
    stride = max(1, result["total_steps"] // MAX_PLOTTED)
    for axis, name in zip(axes[:, 0], names):
        values = result["schedules"][name][::stride]
        axis.plot(range(0, result["total_steps"], stride), values)
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
        for epoch_end in range(result["steps_per_epoch"], result["total_steps"], result["steps_per_epoch"]):
            if result["epochs"] <= 40:  # epoch boundaries, while they stay readable
                axis.axvline(epoch_end, color="grey", alpha=0.2, linewidth=0.5)
    axes[-1, 0].set_xlabel(f"optimizer step ({result['steps_per_epoch']} per epoch, global batch {result['global_batch']})")
    figure.suptitle(f"{result['model']}: {result['total_steps']:,} steps on {result['world_size']} processes")
    figure.tight_layout()
    try:
        with open(out, "xb") as f:  # exclusive: a file that appeared meanwhile is not overwritten either
            figure.savefig(f, format="png")
    except OSError as exc:
        raise WorkFailed(f"--plot {out}: cannot write the picture ({exc.strerror}).") from None
    finally:
        plt.close(figure)
    return out


def check_plot_file(out: Path) -> None:
    """A new .png file in an existing folder: plan never overwrites a file."""
    if out.suffix.lower() != ".png":
        raise SpecError(f"--plot {out}: the picture is a PNG; name it FILE.png.")
    if out.exists() or out.is_symlink():
        raise SpecError(f"--plot {out}: the file exists; plan does not overwrite files. Choose another name.")
    if not out.parent.is_dir():
        raise SpecError(f"--plot {out}: {out.parent} is not an existing folder.")


def main(spec_path: str, overrides: list[str], world_size: int | None, samples: int | None, as_json: bool,
         plot_file: Path | None) -> int:
    if plot_file is not None:
        check_plot_file(plot_file)
    result = plan(spec_path, overrides, world_size, samples)
    if as_json:
        print(json.dumps(result))
    else:
        show(result)
    if plot_file is not None:
        print(plot(result, plot_file))
    return 0
