"""The checkpoint layout, without torch: the one reader of `runs/<name>/checkpoints/` for status, submit and restore.

    runs/<name>/checkpoints/step_00001000/   meta.json, shared.pt, rank_00000.pt, ...
    runs/<name>/checkpoints/.tmp_step_00001000/   a save in progress (never read)

Only complete checkpoints carry a `step_NNNNNNNN` name (launcher.training.checkpointer writes them into a
`.tmp_` folder and renames it), so whatever this module lists can be loaded. Names sort by step.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

STEP_DIR = re.compile(r"^step_(\d{8})$")


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


def read_meta(checkpoint: Path) -> dict:
    """meta.json of a checkpoint folder: step, world_size, the resume fingerprint, the spec."""
    return json.loads((Path(checkpoint) / "meta.json").read_text())


def is_checkpoint(path: Path) -> bool:
    """A checkpoint folder as the trainer writes it (possibly copied elsewhere, under any name)."""
    return (Path(path) / "meta.json").is_file() and (Path(path) / "shared.pt").is_file()
