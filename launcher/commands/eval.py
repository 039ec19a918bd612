"""`segjobs eval`: a trained model's numbers on a shard split, as a rich table and eval/step_NNNNNNNN.json.

    segjobs eval demo_segmenter                              # the run's latest checkpoint, validation split
    segjobs eval runs/demo_segmenter/checkpoints/step_00000300 --mode ms-flip --json
    segjobs eval /copied/step_00000300 --set data.val=data/shards/ade20k/validation

Segmenter reports mIoU, mAcc and pixel accuracy (`--mode slide | whole | ms-flip`; slide by default). W-Net and
DINO report unsupervised scores: their clusters (W-Net's K segments; k-means on DINO's teacher patch features
with a cluster per class present in the split) are matched to classes one-to-one (Hungarian) and many-to-one
(each cluster to the class it overlaps most); W-Net adds its reconstruction PSNR and, with wnet.postprocess set,
the post-processed scores (post_*).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from launcher import checkpoint as layout
from launcher.spec import SpecError, check_labelled

SHOWN_CLASSES = 10


def split_folder(spec, split: str) -> Path:
    """Shards of `split` beside the spec's validation (or training) shards: <out>/<split>/."""
    anchor = spec.data.val or spec.data.train
    folder = anchor if anchor.name == split else anchor.parent / split
    if not (folder / "manifest.json").is_file():
        raise SpecError(f"--split {split}: {folder} holds no shards (manifest.json); pass --set data.val=FOLDER.")
    check_labelled(folder, f"--split {split}")
    return folder


def evaluate(target: str, split: str = "validation", mode: str | None = None, overrides: list[str] = ()) -> dict:
    """Evaluate a run's latest checkpoint (or a checkpoint folder) and write eval/step_NNNNNNNN.json beside it."""
    from launcher.training.restore import output_folder, restore
    from shards.loader import build_loader

    spec, task, accelerator, checkpoint = restore(target, overrides)
    mode = mode or task.eval_mode  # the family's default, which the trainer's evaluations use too
    if mode not in task.eval_modes:
        raise SpecError(f"--mode {mode}: {spec.model.name} evaluates in {' or '.join(task.eval_modes)} mode only.")
    default_mode, task.eval_mode = task.eval_mode, mode
    folder = split_folder(spec, split)
    loader = build_loader(folder, task.eval_pipeline(spec), batch_size=spec.data.eval_batch_size, rank=0, world_size=1,
                          train=False, seed=spec.seed, num_workers=spec.data.num_workers)
    start = time.perf_counter()
    try:
        result = task.evaluate(loader, accelerator)
    finally:
        loader.close()
    step = layout.read_meta(checkpoint)["step"]  # a copied checkpoint folder may have any name
    report = {"checkpoint": str(checkpoint), "model": spec.model.name, "family": task.family, "step": step,
              "split": split, "mode": mode, "samples": loader.stream.num_samples,
              "seconds": round(time.perf_counter() - start, 2), "unsupervised": not task.supervised,
              "class_names": loader.manifest.names(), **result}
    report["iou"] = [None if math.isnan(v) else v for v in report["iou"]]  # JSON has no NaN: absent classes are null
    # The trainer's final evaluation (validation, the default mode) has the same name: the same numbers, more fields.
    suffix = "" if (split, mode) == ("validation", default_mode) else f"_{split}_{mode}"
    out = output_folder(checkpoint) / "eval" / f"{checkpoint.name}{suffix}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    report["path"] = str(out)
    return report


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
