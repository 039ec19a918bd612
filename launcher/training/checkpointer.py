"""Checkpoints of a training run: save(step, state) on every rank, load, keep the newest `keep`.

Layout of `runs/<name>/checkpoints/step_NNNNNNNN/`:
    shared.pt       what every rank agrees on: model, optimizer, task extras (DINO teacher and centre),
                    loader position, step counters (written by rank 0, gathered from all ranks first)
    rank_RRRRR.pt   each rank's RNG states (python, numpy, torch, cuda)
    meta.json       step, world size, the spec fields a resume must not change

Note: all ranks write into `.tmp_step_NNNNNNNN/`; after a barrier rank 0 renames it to the final name, so a
process killed at any moment (also mid-save) leaves only complete checkpoints under `step_*` names.
Unfinished `.tmp_*` folders are removed by the next save. The folder must be on a file system every node
sees (the run directory on a cluster). Listing and reading meta.json is launcher.checkpoint's (no torch).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from launcher import checkpoint as layout


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    def __init__(self, folder: Path, keep: int, rank: int = 0, world_size: int = 1):
        self.folder, self.keep, self.rank, self.world_size = Path(folder), keep, rank, world_size

    def steps(self) -> list[int]:
        return layout.steps(self.folder)

    def latest(self) -> Path | None:
        return layout.latest(self.folder)

    def save(self, step: int, shared: dict[str, Any] | None, meta: dict[str, Any]) -> Path:
        """Collective: every rank calls it; `shared` is needed on rank 0 only."""
        final = self.folder / layout.step_name(step)
        tmp = self.folder / f".tmp_{layout.step_name(step)}"
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".tmp_step_*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        torch.save(rng_state(), tmp / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            torch.save(shared, tmp / "shared.pt")
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": self.world_size}, indent=1))
        _barrier()
        if self.rank == 0:
            _fsync_tree(tmp)
            if final.exists():  # a checkpoint of the same step (a rerun after a crash): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in self.steps()[: -self.keep]:
                shutil.rmtree(self.folder / layout.step_name(old), ignore_errors=True)
        _barrier()
        return final

    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
        """(shared state, meta, this rank's RNG state or None when the world size changed)."""
        meta = layout.read_meta(path)
        shared = torch.load(path / "shared.pt", map_location="cpu", weights_only=False)
        rng_file = path / f"rank_{self.rank:05d}.pt"
        rng = torch.load(rng_file, weights_only=False) if meta["world_size"] == self.world_size and rng_file.exists() else None
        return shared, meta, rng


def _fsync_tree(folder: Path) -> None:
    """Flush the files, then the folder: a rename after this cannot expose unwritten data after a crash."""
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
