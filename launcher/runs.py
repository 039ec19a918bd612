"""Run state: `runs/<name>/run.json` and the index of every run of this account. The only code that writes them.

run.json (one per run directory, rewritten atomically under a lock), changed only through the named
transitions below (submitted, started, requeued, completed, failed, cancelled, settled):
    name, model, cluster ("slurm" | "local" | "foreground"), state (SUBMITTED, RUNNING, REQUEUED,
    COMPLETED, FAILED, CANCELLED, TIMEOUT), error, spec (the resolved spec of the latest submission),
    nodes, gpus_per_node, tasks, timeout_min, total_steps, global_batch,
    submissions: [{job_id, time, cluster, log_folder, overrides}],
    starts: [{job_id, time, restart_count, world_size}], requeues: [{job_id, time, reason, step}]

The index ($SEGJOBS_HOME/index.json, default ~/.segjobs) lists the absolute run directories that
`segjobs submit` and `segjobs train` touched, so `segjobs status` finds runs wherever their output_dir is.

Note: on a cluster, run directories and $SEGJOBS_HOME must be on a file system every node sees.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

# segjobs' own states; the others below are SLURM's words for a job, as sacct and squeue print them.
SUBMITTED, RUNNING, REQUEUED, COMPLETED, FAILED, CANCELLED = "SUBMITTED", "RUNNING", "REQUEUED", "COMPLETED", "FAILED", "CANCELLED"
TIMEOUT, STOPPED = "TIMEOUT", "STOPPED"  # STOPPED: a local run whose process is gone without a final state
ACTIVE_STATES = {SUBMITTED, "PENDING", RUNNING, REQUEUED, "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}
FINAL_STATES = {COMPLETED, FAILED, CANCELLED, TIMEOUT, "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                "DEADLINE", STOPPED}


class RunError(Exception):
    """A run name or folder a user gave that does not exist or is ambiguous (exit status 2)."""


def home() -> Path:
    return Path(os.environ.get("SEGJOBS_HOME", Path.home() / ".segjobs"))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside `path` (the job on a compute node and `segjobs` on the login node both write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def read_run(run_dir: Path) -> dict:
    """run.json of a run directory; {} when there is none (a run trained before any record was kept)."""
    try:
        return json.loads((Path(run_dir) / "run.json").read_text())
    except FileNotFoundError:
        return {}


def _update(run_dir: Path, change: Callable[[dict], None]) -> dict:
    """Apply `change` to run.json under the lock and write it back atomically; returns the new record."""
    path = Path(run_dir) / "run.json"
    with _locked(path):
        record = read_run(run_dir)
        change(record)
        _write_json(path, record)
    return record


def _set(run_dir: Path, **fields: Any) -> dict:
    return _update(run_dir, lambda record: record.update(fields))


def _append(run_dir: Path, key: str, entry: dict, **fields: Any) -> dict:
    def change(record: dict) -> None:
        record.setdefault(key, []).append(entry)
        record.update(fields)

    return _update(run_dir, change)


# ---- transitions ------------------------------------------------------------------------------------------
def submitted(run_dir: Path, submission: dict, **fields: Any) -> dict:
    """A job was handed to the scheduler: `submission` is {job_id, time, cluster, log_folder, overrides};
    `fields` describe the run (name, model, spec, nodes, ...). The state becomes SUBMITTED unless that job
    has started already (a fast local job can start before this is written)."""
    def change(record: dict) -> None:
        record.setdefault("submissions", []).append(submission)
        record.update(fields)
        if not any(start["job_id"] == submission["job_id"] for start in record.get("starts", [])):
            record.update(state=SUBMITTED, error=None)

    record = _update(run_dir, change)
    register(run_dir)
    return record


def started(run_dir: Path, start: dict, **fields: Any) -> dict:
    """A process started training: `start` is {job_id, time, restart_count, world_size, host, pid}."""
    record = _append(run_dir, "starts", start, state=RUNNING, error=None, **fields)
    register(run_dir)
    return record


def requeued(run_dir: Path, job_id: str, reason: str, step: int) -> dict:
    """The job checkpointed at `step` and goes back to the queue (reason: timeout or preemption)."""
    return _append(run_dir, "requeues", {"job_id": job_id, "time": time.time(), "reason": reason, "step": step},
                   state=REQUEUED)


def completed(run_dir: Path) -> dict:
    return _set(run_dir, state=COMPLETED, ended=time.time())


def failed(run_dir: Path, error: str) -> dict:
    return _set(run_dir, state=FAILED, error=error, ended=time.time())


def cancelled(run_dir: Path, error: str | None = None) -> dict:
    """Stopped by a person: `segjobs cancel`, scancel, or Ctrl-C in the foreground."""
    fields = {"error": error, "ended": time.time()} if error else {}
    return _set(run_dir, state=CANCELLED, **fields)


def settled(run_dir: Path, state: str) -> dict:
    """The final state the scheduler reports for the latest job, kept once the scheduler forgets the job."""
    return _set(run_dir, state=state)


# ---- the index of runs ------------------------------------------------------------------------------------
def register(run_dir: Path) -> None:
    path = home() / "index.json"
    run_dir = str(Path(run_dir).resolve())
    with _locked(path):
        known = json.loads(path.read_text()) if path.exists() else []
        if run_dir not in known:
            _write_json(path, known + [run_dir])


def indexed_runs() -> list[Path]:
    path = home() / "index.json"
    return [Path(p) for p in json.loads(path.read_text())] if path.exists() else []


def find_runs(names: list[str], extra_dirs: list[Path] = ()) -> list[Path]:
    """Run directories: those named (a run name or a path), else every indexed run plus those in `extra_dirs`.
    A folder in `extra_dirs` is a run directory itself or a folder of run directories."""
    candidates = list(indexed_runs())
    for folder in extra_dirs:
        if not Path(folder).is_dir():
            raise RunError(f"--runs {folder}: no such folder")
        inside = [p for p in sorted(Path(folder).iterdir()) if (p / "run.json").exists() or (p / "metrics.jsonl").exists()]
        candidates += [Path(folder)] if (Path(folder) / "run.json").exists() else inside
    unique = list(dict.fromkeys(p.resolve() for p in candidates))
    if not names:
        return [p for p in unique if p.is_dir()]
    return [resolve_run(name, unique) for name in names]


def resolve_run(name: str, candidates: list[Path] | None = None) -> Path:
    """A run directory from a path, or from a run name known to the index."""
    path = Path(name)
    if (path / "run.json").exists() or (path / "checkpoints").is_dir():
        return path.resolve()
    candidates = indexed_runs() if candidates is None else candidates
    matches = [p for p in candidates if p.name == name or read_run(p).get("name") == name]
    if not matches:
        raise RunError(f"no run named {name!r}: not a run directory and not in {home() / 'index.json'} "
                       "(see `segjobs status --all`).")
    if len(matches) > 1:
        raise RunError(f"{len(matches)} runs are named {name!r}: {', '.join(map(str, matches))}; pass the folder instead.")
    return matches[0]


def latest_job(record: dict) -> dict | None:
    return record["submissions"][-1] if record.get("submissions") else None
