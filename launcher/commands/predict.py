"""`segjobs predict`: a trained model on image files, writing the family's prediction of each into a folder.

    segjobs predict demo_segmenter photos/*.jpg --out predictions     # <stem>_classes.png, <stem>_labels.png
    segjobs predict runs/demo_wnet/checkpoints/step_00000060 a.png b.jpg --out seg --batch-size 16
    segjobs predict demo_dino frames/*.png --out attention --device cpu

What each family writes per image (its Task's `predictions`):
- Segmenter: <stem>_classes.png, a palette PNG with ADE20K's colours whose pixel values are the labels as the
  dataset numbers them (ADE20K: class k is label k + 1, 0 = "other" is never predicted; the offset comes from the
  run's shard manifest, reduce_zero_label), and <stem>_labels.png, the same values as a greyscale PNG;
- W-Net: <stem>_segments.png, a palette PNG of the segment indices 0 .. K-1 in the pictures' cluster colours;
- DINO: <stem>_attention.png (image | mean attention of the teacher's heads | 60%-mass mask) and <stem>_heads.png.

Images may have any size; they are decoded --batch-size at a time (the memory held), and a family puts the
images of one size through the network together where it can (W-Net). Every image is checked before the
model is loaded: a missing file or one that is not an image is exit 2 naming it.

Files in --out: segjobs records what it writes in <out>/predictions.json (file name -> sha256). A file already
there is replaced only when that record lists it with its current content (segjobs wrote it and nobody changed
it since); any other file in the way is refused (exit 2, nothing written) unless --force.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from launcher.errors import InputError
from launcher.files import read_bounded

log = logging.getLogger("segjobs.predict")
RECORD = "predictions.json"
RECORD_FORMAT = "segjobs-predictions/1"
MAX_RECORD_BYTES = 64 << 20
IMAGE_ERRORS = (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError)


class PredictError(InputError):
    """An image, an output folder or a file in it that predict cannot use (exit status 2)."""


def check_images(paths: list[Path]) -> None:
    """Every path an image Pillow reads (its header; decoding waits for its batch), stems all different."""
    stems: dict[str, Path] = {}
    for path in paths:
        if not path.is_file():
            raise PredictError(f"{path}: no such file{' (a folder: pass its images, e.g. DIR/*.jpg)' if path.is_dir() else ''}; nothing was written.")
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018 - the header is read on open; an unreadable one raises
        except IMAGE_ERRORS as exc:
            raise PredictError(f"{path}: not an image Pillow reads ({type(exc).__name__}: {str(exc)[:120]}); nothing was written.") from None
        if path.stem in stems:
            raise PredictError(f"{stems[path.stem]} and {path} would write the same files (<stem>_...png); "
                               "predict them into different --out folders. Nothing was written.")
        stems[path.stem] = path


def decode(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except IMAGE_ERRORS as exc:
        raise PredictError(f"{path}: cannot be decoded ({type(exc).__name__}: {str(exc)[:120]}); the images before it "
                           "were written.") from None


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_record(out: Path, force: bool) -> dict[str, str]:
    """File name -> sha256 of what segjobs wrote in `out` ({} when nothing yet, or with --force over a bad record)."""
    path = out / RECORD
    try:
        record = json.loads(read_bounded(path, MAX_RECORD_BYTES))
        files = record["files"] if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None
        if isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            return files
        problem = "not the record segjobs writes"
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:
        problem = str(exc)[:120]
    if force:
        return {}
    raise PredictError(f"{path}: {problem}; segjobs cannot tell which files in {out} it wrote. Move it away, "
                       "or pass --force to replace whatever is in the way.")


def check_out(out: Path, names: list[str], record: dict[str, str], force: bool) -> None:
    """Refuse when a file of `names` is in `out` and the record does not list it with its current content."""
    if force:
        return
    foreign = [n for n in names if (out / n).exists()
               and (record.get(n) is None or not (out / n).is_file() or digest(out / n) != record[n])]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise PredictError(f"--out {out}: {len(foreign)} file(s) in the way that segjobs did not write or that changed "
                           f"since ({shown}); nothing was written. Choose another folder, or pass --force.")


def label_offset(spec) -> int:
    """What the dataset adds to a class index to number its labels: 1 when its manifest says reduce_zero_label
    (ADE20K), else 0. A run whose shards are not on this machine is taken to be ADE20K's, with a warning."""
    from shards import manifest
    from shards.errors import ShardsError

    for split in (spec.data.val, spec.data.train):
        if split is not None:
            try:
                return 1 if manifest.load(Path(split)).reduce_zero_label else 0
            except (OSError, ValueError, ShardsError):
                continue
    log.warning("no shard manifest of the run here (%s): labels numbered as ADE20K's (class k -> label k + 1)",
                spec.data.val or spec.data.train)
    return 1


def write_atomic(picture: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    picture.save(tmp, format="PNG")
    os.replace(tmp, path)


def predict(target: str, images: list[Path], out: Path, batch_size: int = 8, device: str | None = None,
            force: bool = False, overrides: list[str] = ()) -> list[Path]:
    from launcher.runs import write_json
    from launcher.training.restore import restore

    check_images(images)
    if out.exists() and not out.is_dir():
        raise PredictError(f"--out {out}: a file, not a folder.")
    record = read_record(out, force) if out.is_dir() else {}
    spec, task, accelerator, _ = restore(target, overrides, device)
    if not task.prediction_files:
        task.predictions([], accelerator.device)  # refuses, naming the family
    check_out(out, [f"{p.stem}_{name}" for p in images for name in task.prediction_files], record, force)
    offset = label_offset(spec)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for first in range(0, len(images), batch_size):
        chunk = images[first:first + batch_size]
        for path, pictures in zip(chunk, task.predictions([decode(p) for p in chunk], accelerator.device, offset)):
            for name, picture in pictures.items():
                target_path = out / f"{path.stem}_{name}"
                write_atomic(picture, target_path)
                record[target_path.name] = digest(target_path)
                written.append(target_path)
        write_json(out / RECORD, {"format": RECORD_FORMAT, "files": record})  # after every batch: an interrupted run keeps it
    return written


def main(target: str, images: list[Path], out: Path, batch_size: int, device: str | None, force: bool,
         overrides: list[str]) -> int:
    for path in predict(target, images, out, batch_size, device, force, overrides):
        print(path)
    return 0
