"""Checkpoints of a training run: save(step, state) on every rank, load, keep the newest `keep`.

Layout of `runs/<name>/checkpoints/step_NNNNNNNN/`:
    shared.pt       what every rank agrees on: model, optimizer, task extras (DINO teacher and centre),
                    loader position, step counters (written by rank 0, gathered from all ranks first)
    rank_RRRRR.pt   each rank's RNG states (python, numpy, torch, cuda) as tensors, lists and plain dicts
    meta.json       step, world size, the spec fields a resume must not change, each file's size and sha256
                    (written last, by rank 0)

Every file is read with torch.load(weights_only=True): a pickle planted in a checkpoint cannot run code.
RNG files written before RNG states were stored as plain values hold numpy's state as pickled arrays; they
are read through an allowlist of exactly numpy's array and dtype reconstructors, nothing else.

Note: all ranks write into `.tmp_step_NNNNNNNN/`; after a barrier rank 0 renames it to the final name, so a
process killed at any moment (also mid-save) leaves only complete checkpoints under `step_*` names.
Unfinished `.tmp_*` folders are removed by the next save. The folder must be on a file system every node
sees (the run directory on a cluster). Listing and reading meta.json is launcher.checkpoint's (no torch).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from launcher import checkpoint as layout
from launcher.checkpoint import CheckpointError

log = logging.getLogger("segjobs.train")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    """This process's RNG states in forms torch.load(weights_only=True) reads: tensors, lists, plain dicts."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": {"version": version, "state": list(internal), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python, numpy_state = state["python"], state["numpy"]
    if isinstance(python, dict):
        random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
        np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    else:  # written before RNG states were plain values: the tuples of random.getstate and np.random.get_state
        random.setstate(python)
        np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_rng_globals() -> list:
    """What an RNG file of an older segjobs needs besides plain values: numpy's array and dtype reconstructors."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_safely(path: Path, load, **options) -> Any:
    """`load(path)`, where anything but tensors and plain values (a planted pickle) is refused, not run."""
    try:
        return load(path, **options)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if "WeightsUnpickler error" in line]
        reason = lines[0][:200] if lines else type(exc).__name__
        raise CheckpointError(f"{path}: holds objects other than tensors and plain values, which segjobs never writes "
                              f"and does not load ({reason}). Nothing in it was run; remove the checkpoint folder "
                              "or replace it with a copy segjobs wrote.") from None


def load_rng_file(path: Path) -> dict[str, Any]:
    with torch.serialization.safe_globals(_numpy_rng_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


class Checkpointer:
    def __init__(self, folder: Path, keep: int, rank: int = 0, world_size: int = 1):
        self.folder, self.keep, self.rank, self.world_size = Path(folder), keep, rank, world_size

    def steps(self) -> list[int]:
        return layout.steps(self.folder)

    def latest(self) -> Path | None:
        return layout.latest(self.folder)

    def save(self, step: int, shared: dict[str, Any] | None, meta: dict[str, Any]) -> Path:
        """Collective: every rank calls it; `shared` is needed on rank 0 only. A full disk or quota leaves the
        previous checkpoints as they were, removes the partial one and raises CheckpointError."""
        final = self.folder / layout.step_name(step)
        tmp = self.folder / f".tmp_{layout.step_name(step)}"
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".tmp_step_*"):  # left by a crash mid-save
                if layout.written_by_segjobs(stale):
                    shutil.rmtree(stale)
            for path in (tmp, final):
                if path.exists() and not layout.written_by_segjobs(path):
                    raise CheckpointError(f"{path}: holds files that segjobs did not write, where the checkpoint of step "
                                          f"{step} goes; move them elsewhere and resume.")
            tmp.mkdir()
        _barrier()
        with self._out_of_space_explained(tmp, step):
            torch.save(rng_state(), tmp / f"rank_{self.rank:05d}.pt")
            if self.rank == 0:
                torch.save(shared, tmp / "shared.pt")
        _barrier()
        if self.rank == 0:
            with self._out_of_space_explained(tmp, step):
                files = {p.name: layout.file_record(p) for p in sorted(tmp.iterdir())}
                record = {**meta, "step": step, "world_size": self.world_size, "files": files}
                (tmp / "meta.json").write_text(json.dumps(record, indent=1))
                _fsync_tree(tmp)
            if final.exists():  # a checkpoint of the same step (a rerun after a crash): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in self.steps()[: -self.keep]:
                path = self.folder / layout.step_name(old)
                if layout.written_by_segjobs(path):  # never a folder of someone else's under a step_ name
                    shutil.rmtree(path)
        _barrier()
        return final

    @contextmanager
    def _out_of_space_explained(self, tmp: Path, step: int) -> Iterator[None]:
        """Turn a full disk or quota into CheckpointError, after removing the partial folder."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(self.folder).free / 2**30
            latest = self.latest()
            kept = f"the last checkpoint, {latest}, is intact" if latest else "there is no earlier checkpoint"
            raise CheckpointError(
                f"{self.folder}: no space left to write the checkpoint of step {step} ({exc.strerror}; "
                f"{free:.2f} GiB free there). The partial checkpoint was removed and {kept}; free space (or raise "
                "the quota) and resume the run.") from None

    def set_aside_damaged(self) -> Path | None:
        """Rank 0, before resuming: rename every damaged checkpoint newer than the newest intact one out of the
        step_ names, and return the newest intact one (None when there is no checkpoint at all). Raises
        CheckpointError when checkpoints exist but none is intact."""
        problems = []
        for step in reversed(self.steps()):
            path = self.folder / layout.step_name(step)
            problem = layout.verify(path)
            if problem is None:
                return path
            aside = layout.set_aside(path)
            log.warning("checkpoint %s is damaged (%s): renamed to %s; trying the one before", path, problem, aside.name)
            problems.append(f"{path.name}: {problem} (now {aside.name})")
        if problems:
            raise CheckpointError(f"{self.folder}: no intact checkpoint to resume from: {'; '.join(problems)}. "
                                  "Restore one from a copy, or start the run afresh under another name or output_dir.")
        return None

    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
        """(shared state, meta, this rank's RNG state or None when the world size changed)."""
        meta = layout.read_meta(path)
        shared = load_safely(path / "shared.pt", torch.load, map_location="cpu", weights_only=True)
        rng_file = path / f"rank_{self.rank:05d}.pt"
        rng = load_safely(rng_file, load_rng_file) if meta["world_size"] == self.world_size and rng_file.exists() else None
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


def drop_state_not_saved(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """torch's set_optimizer_state_dict first gives every parameter a state (a step with learning rate 0). A
    parameter that had none in the checkpoint (DINO's last layer in its frozen first epoch) must have none
    again: else its first real step counts as its second (Adam's bias correction) and the losses drift from
    those of an uninterrupted run. `saved` names parameters by their fully qualified names, in group order."""
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        for param, name in zip(group["params"], saved_group["params"]):
            if name not in saved["state"]:
                optimizer.state.pop(param, None)
