"""The run registry: `runs/<name>/run.json`, the index of every run of this account, and batched SLURM polling.

run.json (one per run directory, rewritten atomically under a lock):
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
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

ACTIVE_STATES = {"SUBMITTED", "PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}
POLL_TIMEOUT_S = 30


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


def update_run(run_dir: Path, change: Callable[[dict], None]) -> dict:
    """Apply `change` to run.json under the lock and write it back atomically; returns the new record."""
    path = Path(run_dir) / "run.json"
    with _locked(path):
        record = read_run(run_dir)
        change(record)
        _write_json(path, record)
    return record


def set_fields(run_dir: Path, **fields: Any) -> dict:
    return update_run(run_dir, lambda record: record.update(fields))


def append(run_dir: Path, key: str, entry: dict, **fields: Any) -> dict:
    """Add `entry` to the list run.json[key] (submissions, starts, requeues) and set `fields`."""
    def change(record: dict) -> None:
        record.setdefault(key, []).append(entry)
        record.update(fields)

    return update_run(run_dir, change)


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


# ---- SLURM -------------------------------------------------------------------------------------------------
@dataclass
class JobState:
    state: str  # SLURM's state word: PENDING, RUNNING, REQUEUED, COMPLETED, FAILED, TIMEOUT, CANCELLED, ...
    reason: str = ""  # why a job is pending (Priority, Resources, BeginTime, ...)
    elapsed_s: int | None = None
    limit_s: int | None = None
    nodes: int | None = None


def _seconds(text: str) -> int | None:
    """SLURM durations: [D-]HH:MM:SS, MM:SS, or UNLIMITED/Partition_Limit."""
    if not text or not text[0].isdigit():
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def parse_sacct(text: str) -> dict[str, JobState]:
    """`sacct -X -n -P --format=JobID,State,Reason,ElapsedRaw,TimelimitRaw,NNodes` output -> states by job id.
    A job listed several times (requeued: one line per start) keeps its last line."""
    states = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 6:
            continue
        job_id, state, reason, elapsed, limit, nodes = fields[:6]
        states[job_id] = JobState(
            state=state.split()[0] if state else "UNKNOWN",  # "CANCELLED by 0" -> CANCELLED
            reason="" if reason in ("None", "") else reason,
            elapsed_s=int(elapsed) if elapsed.isdigit() else None,
            limit_s=int(limit) * 60 if limit.isdigit() else None,
            nodes=int(nodes) if nodes.isdigit() else None,
        )
    return states


def poll_slurm(job_ids: list[str]) -> dict[str, JobState]:
    """The state of every job: one sacct call for all of them, then one squeue call for those sacct does not
    show as finished (slurmdbd learns of state changes late: a requeued job can read REQUEUED there while
    the controller already holds it PENDING for BeginTime). {} when SLURM is not reachable."""
    if not job_ids:
        return {}
    ids = sorted(set(job_ids))
    states = parse_sacct(_slurm_output(["sacct", "-X", "-n", "-P", "--format=JobID,State,Reason,ElapsedRaw,TimelimitRaw,NNodes",
                                        "-j", ",".join(ids)]))
    unfinished = [i for i in ids if i not in states or states[i].state in ACTIVE_STATES]
    if unfinished:
        for line in _slurm_output(["squeue", "-h", "-j", ",".join(unfinished), "-o", "%i|%T|%r"]).splitlines():
            job_id, state, reason = (line.split("|") + ["", ""])[:3]
            live = states.setdefault(job_id, JobState(state))
            live.state, live.reason = state, "" if reason == "None" else reason
    return states


def _slurm_output(command: list[str]) -> str:
    """stdout of a SLURM query, "" when it fails (no SLURM here, or every job id unknown to squeue)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=POLL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def local_job_alive(job_id: str) -> bool:
    """A job of submitit's local executor: its id is the pid of the controller process (a zombie is dead)."""
    try:
        os.kill(int(job_id), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{job_id}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:  # no /proc (macOS): signal 0 answered
        return True
