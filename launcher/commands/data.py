"""`segjobs synth` and `segjobs shard`: the data-preparation commands (no torch import here)."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from shards import ade20k, synth as synth_data, video as video_source
from shards.errors import BadSourceError, ShardsError
from shards.reader import verify_split
from shards.ade20k import image_folder_samples
from shards.writer import write_split


def synth(out: Path, train: int, val: int, size: tuple[int, int], classes: int, seed: int, force: bool = False) -> int:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise BadSourceError(f"{out} already exists and is not an empty folder; synth would overwrite what is there. "
                             "Choose a new folder, or pass --force to write into it.")
    if train < 1 or val < 0:
        raise BadSourceError(f"--train must be >= 1 and --val >= 0, got {train} and {val}.")
    if not 1 <= classes <= ade20k.NUM_CLASSES:
        raise BadSourceError(f"--classes must be in 1..{ade20k.NUM_CLASSES}, got {classes}.")
    start = time.perf_counter()
    synth_data.write_ade20k(out, train=train, val=val, height=size[0], width=size[1], seed=seed, num_classes=classes)
    print(f"synthetic ADE20K: {train} training + {val} validation images ({size[0]}x{size[1]}, "
          f"{classes} classes, seed {seed}) in {time.perf_counter() - start:.1f} s -> {out}")
    return 0


def synth_video(out: Path, frames: int, size: tuple[int, int], fps: float, seed: int, force: bool = False) -> int:
    if out.suffix.lower() != ".mp4":
        raise BadSourceError(f"{out}: synth video writes an MP4; give the file a .mp4 name.")
    if out.exists() and not force:
        raise BadSourceError(f"{out} already exists; synth would overwrite it. Choose a new name, or pass --force.")
    if not 1 <= frames <= 100_000 or not 0 < fps <= 240:
        raise BadSourceError(f"--frames must be in 1..100000 and --fps in (0, 240], got {frames} and {fps}.")
    if size[0] % 2 or size[1] % 2:
        raise BadSourceError(f"--size {size[0]}x{size[1]}: both sides must be even (MP4's yuv420p halves the colour resolution).")
    if not out.parent.is_dir():
        raise BadSourceError(f"{out.parent}: no such folder for {out.name}.")
    start = time.perf_counter()
    codec = synth_data.write_video(out, frames=frames, height=size[0], width=size[1], fps=fps, seed=seed)
    print(f"synthetic clip: {frames} frames ({size[0]}x{size[1]}, {fps:g} fps, {codec}, seed {seed}) in "
          f"{time.perf_counter() - start:.1f} s -> {out}")
    return 0


def shard_ade20k(src: Path, out: Path, splits: list[str] | None, **options) -> int:
    root = ade20k.find_root(src)
    if splits is None:
        splits = [s for s in ade20k.SPLITS if (root / "images" / s).is_dir()]
        if not splits:
            raise BadSourceError(f"{root}: found neither images/training nor images/validation.")
    listed = [(split, *ade20k.list_split(root, split)) for split in splits]  # all layout errors before writing
    rejected = 0
    for split, samples, labelled in listed:
        num_classes, names = (ade20k.NUM_CLASSES, list(ade20k.CLASSES)) if labelled else (0, None)
        manifest = _shard(samples, out / split, "ade20k", split, num_classes, names, options)
        rejected += len(manifest.rejected)
    if rejected:
        print(f"{rejected} sample(s) rejected: reasons are listed under \"rejected\" in each manifest.json")
    return 0


def shard_images(src: Path, out: Path, split: str, dataset: str, **options) -> int:
    if not dataset or "-" in dataset or "/" in dataset or not split or "/" in split:
        raise BadSourceError(f"--dataset and --split must be plain names without '-' or '/', got {dataset!r}, {split!r}.")
    _shard(image_folder_samples(src), out / split, dataset, split, 0, None, options)
    return 0


def shard_video(files: list[Path], out: Path, split: str, dataset: str, fps: float | None, short_side: int,
                **options) -> int:
    """The kept frames of each video, image-only shards in <out>/<split>/ (shards.video says which frames, how
    scaled, and their keys). Videos that give no frames are listed under "rejected" with the reason; when
    every one is, nothing is written and the command fails with exit status 2."""
    if not dataset or "-" in dataset or "/" in dataset or not split or "/" in split:
        raise BadSourceError(f"--dataset and --split must be plain names without '-' or '/', got {dataset!r}, {split!r}.")
    if fps is not None and not 0 < fps <= 1000:
        raise BadSourceError(f"--fps must be in (0, 1000] frames per second, got {fps}.")
    if short_side < 32:
        raise BadSourceError(f"--short-side must be at least 32 pixels, got {short_side}.")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise BadSourceError(f"no such video file: {', '.join(missing[:8])}; nothing was written.")
    if out.exists() and not out.is_dir():
        raise BadSourceError(f"{out} is a file, not an output folder: the last argument of shard video is the folder "
                             "to write the shards into.")
    split_dir = out / split
    created = [d for d in (out, split_dir) if not d.exists()]
    staging = split_dir / ".video-frames"  # a fixed name: the writer's fingerprints include the frame files' paths
    try:
        samples, rejected = video_source.stage_frames(files, staging, fps, short_side)
        if not samples:
            reasons = "; ".join(f"{r.source}: {r.reason}" for r in rejected)
            raise BadSourceError(f"none of the {len(files)} video file(s) gives frames, so nothing was written: {reasons}.")
        for rejection in rejected:
            print(f"{rejection.source}: rejected, {rejection.reason}", file=sys.stderr)
        print(f"{len(samples)} frames of {len(files) - len(rejected)} video(s) "
              f"({'every frame' if fps is None else f'{fps:g} per second'}, shorter side at most {short_side})")
        _shard(samples, split_dir, dataset, split, 0, None, {**options, "rejected": rejected})
    except OSError as exc:  # decoding rejects what it cannot read; this is the staging folder
        raise ShardsError(f"{exc.filename or staging}: cannot write the frames ({exc.strerror}).") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):  # the output folders this command made, when it wrote nothing there
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return 0


def _shard(samples, split_dir: Path, dataset: str, split: str, num_classes: int, class_names: list[str] | None,
           options: dict):
    try:
        with progress_reporter(len(samples), f"{dataset}/{split}") as progress:
            manifest, summary = write_split(samples, split_dir, dataset=dataset, split=split, num_classes=num_classes,
                                            class_names=class_names, progress=progress, **options)
    except OSError as exc:  # source files that cannot be read are rejected inside; this is the output
        raise ShardsError(f"{exc.filename or split_dir}: cannot write the shards ({exc.strerror}).") from None
    print(summary.line())
    return manifest


def verify(directory: Path) -> int:
    """Verify one split folder, or every split folder (one with a manifest.json) under `directory`."""
    if (directory / "manifest.json").is_file():
        split_dirs = [directory]
    else:
        split_dirs = sorted(p.parent for p in directory.glob("*/manifest.json"))
    if not split_dirs:
        raise BadSourceError(f"{directory}: no manifest.json here or in its sub-folders; is it a shard folder?")
    problems = [problem for split_dir in split_dirs for problem in verify_split(split_dir)]
    for split_dir in split_dirs:
        print(f"{split_dir}: {'FAILED' if any(p.startswith(str(split_dir)) for p in problems) else 'ok'}")
    if problems:
        raise ShardsError("shard verification failed: " + "; ".join(problems))
    return 0


# ---- what a person watches -------------------------------------------------------------------------------
def progress_reporter(total: int, description: str):
    """A rich progress bar on a terminal (samples, MB/s); a no-op context otherwise."""
    if not sys.stderr.isatty():
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return _RichProgress(
        Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[mb_s]:.1f} MB/s"), TimeRemainingColumn(), transient=True,
        ),
        total,
        description,
    )


class _NoProgress:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _RichProgress:
    def __init__(self, progress, total: int, description: str):
        self.progress, self.total, self.description = progress, total, description

    def __enter__(self) -> Callable[[int, int], None]:
        self.progress.start()
        task = self.progress.add_task(self.description, total=self.total, mb_s=0.0)
        start = time.perf_counter()

        def update(samples: int, written: int) -> None:
            mb_s = written / 1e6 / max(time.perf_counter() - start, 1e-9)
            self.progress.update(task, completed=samples, mb_s=mb_s)

        return update

    def __exit__(self, *exc):
        self.progress.stop()
        return False
