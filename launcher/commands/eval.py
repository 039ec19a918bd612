"""`segjobs eval`: a trained model's numbers on a shard split, as a rich table and eval/step_NNNNNNNN.json.

    segjobs eval demo_segmenter                              # the run's latest checkpoint, validation split
    segjobs eval runs/demo_segmenter/checkpoints/step_00000300 --mode ms-flip --json
    segjobs eval /copied/step_00000300 --set data.val=data/shards/ade20k/validation
    segjobs eval demo_segmenter --submit --mode ms-flip       # its own small SLURM job; `segjobs status` shows the score

Segmenter reports mIoU, mAcc and pixel accuracy (`--mode slide | whole | ms-flip`; slide by default). W-Net and
DINO report unsupervised scores: their clusters (W-Net's K segments; k-means on DINO's teacher patch features
with a cluster per class present in the split) are matched to classes one-to-one (Hungarian) and many-to-one
(each cluster to the class it overlaps most); W-Net adds its reconstruction PSNR and, with wnet.postprocess set,
the post-processed scores (post_*).

`--submit` runs the same evaluation as a SLURM job of one task with at most one GPU, where the run trained
(the partition, account, qos, setup lines and srun arguments its run.json records, or those of `--profile`),
with the run's cpus_per_task, its memory per task and a time limit of at most EVAL_TIMEOUT_MIN. While the run's
own job is still live, the evaluation waits for it to complete (afterok) and evaluates the final checkpoint.
run.json lists the job under `evaluations`; the report goes to the run's eval/ as above.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from launcher import checkpoint as layout
from launcher import runs
from launcher.errors import InputError
from launcher.spec import JobSpec, SpecError, check_labelled, parse_spec

SHOWN_CLASSES = 10
EVAL_TIMEOUT_MIN = 240  # ms-flip of ViT-B on ADE20K's 2000 validation images takes about an hour on one GPU
# What an evaluation job takes from a profile: where to run, not how big.
SITE_KEYS = ("partition", "account", "qos", "constraint", "exclude", "setup", "srun_args", "sbatch")


def split_folder(spec, split: str) -> Path:
    """Shards of `split` beside the spec's validation (or training) shards: <out>/<split>/."""
    anchor = spec.data.val or spec.data.train
    folder = anchor if anchor.name == split else anchor.parent / split
    if not (folder / "manifest.json").is_file():
        raise SpecError(f"--split {split}: {folder} holds no shards (manifest.json); pass --set data.val=FOLDER.")
    check_labelled(folder, f"--split {split}")
    return folder


def evaluate(target: str, split: str = "validation", mode: str | None = None, overrides: list[str] = (),
             reuse: bool = False) -> dict:
    """Evaluate a run's latest checkpoint (or a checkpoint folder) and write eval/step_NNNNNNNN.json beside it.
    With `reuse`, the scores already written there for this checkpoint (by the trainer's final evaluation or an
    earlier `segjobs eval`) are taken instead of evaluating again."""
    from launcher.training.restore import output_folder, restore
    from shards.loader import build_loader

    spec, task, accelerator, checkpoint = restore(target, overrides)
    mode = mode or task.eval_mode  # the family's default, which the trainer's evaluations use too
    if mode not in task.eval_modes:
        raise SpecError(f"--mode {mode}: {spec.model.name} evaluates in {' or '.join(task.eval_modes)} mode only.")
    default_mode, task.eval_mode = task.eval_mode, mode
    # The trainer's final evaluation (validation, the default mode) has the same name: the same numbers, fewer fields.
    suffix = "" if (split, mode) == ("validation", default_mode) else f"_{split}_{mode}"
    out = output_folder(checkpoint) / "eval" / f"{checkpoint.name}{suffix}.json"
    folder = split_folder(spec, split)
    loader = build_loader(folder, task.eval_pipeline(spec), batch_size=spec.data.eval_batch_size, rank=0, world_size=1,
                          train=False, seed=spec.seed, num_workers=spec.data.num_workers)
    stored = stored_scores(out, checkpoint) if reuse else None
    start = time.perf_counter()
    try:
        result = stored or task.evaluate(loader, accelerator)
    finally:
        loader.close()
    seconds = None if stored else round(time.perf_counter() - start, 2)  # null: scores reused, not evaluated now
    step = layout.read_meta(checkpoint)["step"]  # a copied checkpoint folder may have any name
    report = {"checkpoint": str(checkpoint), "model": spec.model.name, "family": task.family, "step": step,
              "split": split, "mode": mode, "samples": loader.stream.num_samples,
              "seconds": seconds, "unsupervised": not task.supervised,
              "class_names": loader.manifest.names(), **result}
    # JSON has no NaN: classes absent from the split are null
    report["iou"] = [None if v is None or math.isnan(v) else v for v in report["iou"]]
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    report["path"] = str(out)
    return report


REPORT_FIELDS = ("checkpoint", "model", "family", "step", "split", "mode", "samples", "seconds", "unsupervised",
                 "class_names", "path")


def stored_scores(path: Path, checkpoint: Path) -> dict | None:
    """The scores in an evaluation file written after `checkpoint`, or None: no such file, an older one, or one
    that does not read as scores (numbers, but per-class IoUs in "iou" and W-Net's "postprocess" name)."""
    try:
        if path.stat().st_size > 1 << 20 or path.stat().st_mtime < (checkpoint / "meta.json").stat().st_mtime:
            return None
        scores = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: nesting too deep for the parser
        return None
    if not isinstance(scores, dict):
        return None
    scores = {key: value for key, value in scores.items() if key not in REPORT_FIELDS}

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    per_class = isinstance(scores.get("iou"), list) and all(v is None or number(v) for v in scores["iou"])
    named = isinstance(scores.get("postprocess", ""), str)
    others = all(number(value) for key, value in scores.items() if key not in ("iou", "postprocess"))
    return scores if per_class and named and others and "miou" in scores else None


def ranked_classes(iou: list[float | None], names: list[str]) -> list[tuple[str, float]]:
    """(class name, IoU) of the classes present in the split, best first."""
    present = [(names[i] if i < len(names) else str(i), v) for i, v in enumerate(iou) if v is not None]
    return sorted(present, key=lambda item: -item[1])


def summary_rows(report: dict) -> list[tuple[str, str]]:
    """(key, label) of the scores the report holds, in reading order."""
    matching = " (Hungarian)" if report["unsupervised"] else ""
    labels = {"miou": f"mIoU{matching}", "macc": f"mAcc{matching}", "pixel_acc": f"pixel accuracy{matching}",
              "many_to_one_miou": "mIoU (many-to-one)", "many_to_one_macc": "mAcc (many-to-one)",
              "many_to_one_pixel_acc": "pixel accuracy (many-to-one)", "psnr": "reconstruction PSNR",
              "jaccard_mean_heads": "attention Jaccard, mean of heads", "jaccard_best_head": "attention Jaccard, best head",
              "untrained_jaccard_mean_heads": "attention Jaccard, mean of heads, untrained",
              "untrained_jaccard_best_head": "attention Jaccard, best head, untrained"}
    rows = [(key, label) for key, label in labels.items() if key in report]
    post = report.get("postprocess", "post-processed")
    return rows + [(f"post_{key}", f"{label}, {post}") for key, label in labels.items() if f"post_{key}" in report]


def show(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    summary = Table(show_header=False)
    for key, label in summary_rows(report):
        summary.add_row(label, f"{report[key]:.2f} dB" if key.endswith("psnr") else f"{report[key]:.4f}")
    ranked = ranked_classes(report["iou"], report["class_names"])
    classes = Table(title=f"classes by IoU ({len(ranked)} present)", title_justify="left")
    classes.add_column("best", style="green")
    classes.add_column("IoU", justify="right")
    classes.add_column("worst", style="red")
    classes.add_column("IoU", justify="right")
    best, worst = ranked[:SHOWN_CLASSES], ranked[::-1][:SHOWN_CLASSES]
    for index in range(max(len(best), len(worst))):
        left = best[index] if index < len(best) else ("", math.nan)
        right = worst[index] if index < len(worst) else ("", math.nan)
        classes.add_row(left[0], f"{left[1]:.4f}" if left[0] else "", right[0], f"{right[1]:.4f}" if right[0] else "")
    console = Console()
    console.print(f"[bold]{report['model']}[/] step {report['step']} on {report['split']} "
                  f"({report['samples']} images, {report['mode']}): {report['checkpoint']}")
    console.print(summary)
    console.print(classes)
    console.print(f"written {report['path']}")


def main(target: str, split: str, mode: str, as_json: bool, overrides: list[str]) -> int:
    report = evaluate(target, split, mode, overrides)
    if as_json:
        print(json.dumps(report))
    else:
        show(report)
    return 0


class EvaluationJob:
    """What an evaluation job runs (`segjobs eval RUN --submit`): `evaluate` in one task, on the checkpoint
    that is the latest when the job starts (or the one named). Submitit pickles it; it imports torch only there."""

    def __init__(self, target: str, split: str, mode: str | None, overrides: list[str]):
        self.target, self.split, self.mode, self.overrides = target, split, mode, list(overrides)

    def __call__(self) -> str:
        os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        report = evaluate(self.target, self.split, self.mode, self.overrides)
        for key, label in summary_rows(report):
            print(f"{label}: {report[key]:.4f}")
        print(f"written {report['path']}")
        return report["path"]


def evaluation_spec(spec: JobSpec, overrides: list[str], profile_name: str | None, source: str) -> JobSpec:
    """The run's spec with the resources of an evaluation job: one task, at most one GPU, the run's site keys
    (or the profile's), then --set."""
    from launcher.cluster import profiles
    from launcher.cluster.sbatch import tasks_per_node

    raw = spec.model_dump(mode="json")
    resources = raw["resources"]
    tasks = tasks_per_node(spec)
    resources.update(nodes=1, tasks_per_node=1, gpus_per_node=min(spec.resources.gpus_per_node, 1), max_requeues=0,
                     timeout_min=min(spec.resources.timeout_min, EVAL_TIMEOUT_MIN),
                     mem_gb=spec.resources.mem_gb / tasks if spec.resources.mem_gb else None)
    profile = profiles.select(profile_name) if profile_name else None
    if profile is not None:
        resources.update({key: value for key, value in profile.values.items() if key in SITE_KEYS})
    raw["name"] = f"{spec.name}-eval"
    return parse_spec(raw, source, overrides)  # --set once more: it wins over the profile too


def submit(target: str, split: str, mode: str | None, overrides: list[str], profile_name: str | None) -> int:
    """Submit the evaluation of a run (its latest checkpoint when the job starts) or of one of its checkpoints."""
    from submitit.core.utils import FailedJobError

    from launcher.cluster import queue
    from launcher.cluster.sbatch import check_sbatch_safe
    from launcher.cluster.submit import SubmitError, choose_cluster, make_executor
    from launcher.training.families import task_for_model

    path = Path(target)
    if (path / "meta.json").is_file() and path.parent.name == "checkpoints":
        run_dir, target = path.resolve().parent.parent, str(path.resolve())
    else:
        run_dir = runs.resolve_run(target)
        target = str(run_dir)
    record = runs.read_run(run_dir)
    source = str(run_dir / "run.json")
    if record.get("spec") is None:
        raise runs.RunError(f"{source}: no spec recorded (a run trained before run.json kept it); evaluate it here "
                            f"with `segjobs eval {target}`.")
    spec = parse_spec(record["spec"], source, overrides)
    modes = task_for_model(spec.model.name).eval_modes
    if mode is not None and mode not in modes:
        raise SpecError(f"--mode {mode}: {spec.model.name} evaluates in {' or '.join(modes)} mode only.")
    mode = mode or modes[0]  # the family's default, as `segjobs eval` here
    split_folder(spec, split)
    job = runs.latest_job(record)
    live = None
    if job is not None and job["cluster"] == "slurm" and record.get("state") in runs.ACTIVE_STATES:
        seen = queue.poll_slurm([job["job_id"]]).job(job)
        live = job["job_id"] if seen is not None and seen.state in runs.ACTIVE_STATES else None
    if live is None and layout.latest(layout.checkpoints_folder(run_dir)) is None:
        raise InputError(f"{run_dir}: no checkpoint to evaluate and no live job that will write one.")
    if choose_cluster("auto") != "slurm":
        raise InputError(f"eval --submit: no SLURM controller answers here; evaluate on this machine with "
                         f"`segjobs eval {target}`.")
    job_spec = evaluation_spec(spec, overrides, profile_name, source)
    folder = run_dir / "logs"
    check_sbatch_safe(job_spec, folder)
    dependency = f"afterok:{live}" if live else None
    executor = make_executor("slurm", folder, job_spec, dependency=dependency)
    try:
        submitted = executor.submit(EvaluationJob(target, split, mode, overrides))
    except FailedJobError as exc:
        raise SubmitError(f"SLURM refused the evaluation of {spec.name}: {str(exc).strip()}") from None
    runs.evaluation_submitted(run_dir, {"job_id": str(submitted.job_id), "time": time.time(), "cluster": "slurm",
                                        "log_folder": str(folder), "job_name": job_spec.name, "target": target,
                                        "split": split, "mode": mode, "after": dependency})
    waits = f"\tafter job {live}" if live else ""
    print(f"{job_spec.name}\tjob {submitted.job_id}\tslurm\t{run_dir / 'eval'}{waits}")
    return 0
