"""The checkpoint layout, without torch: the one reader of `runs/<name>/checkpoints/` for status, submit and restore.

    runs/<name>/checkpoints/step_00001000/   meta.json, shared.pt, rank_00000.pt, ...
    runs/<name>/checkpoints/.tmp_step_00001000/   a save in progress (never read)

Only complete checkpoints carry a `step_NNNNNNNN` name (launcher.training.checkpointer writes them into a
`.tmp_` folder and renames it). meta.json, written last, lists every other file's size and sha256, so a
checkpoint damaged afterwards (a truncated copy, a disk error, an edit) is found by `verify` before it is
loaded; `set_aside` renames such a folder to `damaged_step_NNNNNNNN[.K]` (never deleted). Names sort by step.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from launcher.errors import WorkFailed
from launcher.files import read_bounded

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(WorkFailed):
    """No usable checkpoint where one is needed, or one could not be written (exit status 1)."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_folder(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def steps(folder: Path) -> list[int]:
    """The steps of the complete checkpoints in a checkpoints folder, oldest first."""
    if not Path(folder).is_dir():
        return []
    return sorted(int(m.group(1)) for p in Path(folder).iterdir() if (m := STEP_DIR.match(p.name)))


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    found = steps(folder)
    return Path(folder) / step_name(found[-1]) if found else None


def step_of(checkpoint: Path) -> int:
    """The step of a checkpoint folder from its name (step_00000300 -> 300)."""
    match = STEP_DIR.match(Path(checkpoint).name)
    if match is None:
        raise ValueError(f"{checkpoint} is not a step_NNNNNNNN folder")
    return int(match.group(1))


MAX_META_BYTES = 4 << 20  # a meta.json holds the spec and a line per file: a few kB


def read_meta(checkpoint: Path) -> dict:
    """meta.json of a checkpoint folder: step, world_size, the resume fingerprint, the spec, the files.
    ValueError when it is not what segjobs writes (FileNotFoundError when absent)."""
    meta = json.loads(read_bounded(Path(checkpoint) / "meta.json", MAX_META_BYTES).decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("meta.json is not a JSON object")
    for key, kind in (("step", int), ("world_size", int), ("resume", dict)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise ValueError(f"meta.json's {key} is missing or not {'an integer' if kind is int else 'an object'}")
    if meta.get("spec") is not None and not isinstance(meta["spec"], dict):
        raise ValueError("meta.json's spec is not an object")
    return meta


def is_checkpoint(path: Path) -> bool:
    """A checkpoint folder as the trainer writes it (possibly copied elsewhere, under any name)."""
    return (Path(path) / "meta.json").is_file() and (Path(path) / "shared.pt").is_file()


CHECKPOINT_FILES = re.compile(r"^(meta\.json|shared\.pt|rank_\d{5}\.pt)$")


def written_by_segjobs(folder: Path) -> bool:
    """Whether a checkpoint folder (or a .tmp_ one left by a crash) holds only the files the checkpointer
    writes: the only folders segjobs ever deletes. A link, a sub-folder or any other file keeps it."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    return all(CHECKPOINT_FILES.match(p.name) and p.is_file() and not p.is_symlink() for p in folder.iterdir())


def file_record(path: Path) -> dict:
    """{"bytes", "sha256"} of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def verify(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when every file is as meta.json records it.
    Checkpoints written before meta.json listed its files are checked for the files themselves only."""
    checkpoint = Path(checkpoint)
    try:
        meta = read_meta(checkpoint)
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError, RecursionError) as exc:
        return f"meta.json is unreadable ({str(exc)[:200]})"
    files = meta.get("files") if isinstance(meta, dict) else None
    if files is None:
        return None if (checkpoint / "shared.pt").is_file() else "shared.pt is missing"
    if not isinstance(files, dict) or "shared.pt" not in files:
        return "meta.json lists no shared.pt"
    for name, expected in files.items():
        path = checkpoint / name
        if Path(name).name != name or not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, meta.json records {expected.get('bytes')}"
        if file_record(path)["sha256"] != expected.get("sha256"):
            return f"{name} does not match its sha256 in meta.json"
    return None


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint folder out of the step_ names (kept for inspection, never deleted)."""
    checkpoint = Path(checkpoint)
    target = checkpoint.with_name(f"damaged_{checkpoint.name}")
    index = 1
    while target.exists():
        target = checkpoint.with_name(f"damaged_{checkpoint.name}.{index}")
        index += 1
    checkpoint.rename(target)
    return target
