"""Run state: `runs/<name>/run.json` and the index of every run of this account. The only code that writes them.

run.json (one per run directory, rewritten atomically under a lock), changed only through the named
transitions below (submitted, started, requeued, completed, failed, cancelled, settled):
    name, model, cluster ("slurm" | "local" | "foreground"), state (SUBMITTED, RUNNING, REQUEUED,
    COMPLETED, FAILED, CANCELLED, TIMEOUT), error, spec (the resolved spec of the latest submission),
    nodes, gpus_per_node, tasks, timeout_min, total_steps, global_batch,
    submissions: [{job_id, time, cluster, log_folder, overrides, job_name, pid_start (local jobs),
                   profile (the cluster profile merged into the spec's resources), after (afterok:JOB or null)}],
    starts: [{job_id, time, restart_count, world_size, host, pid, pid_start,
              code, versions, gpu, hosts, from_step, redo_steps (what it ran: see launcher.history)}],
    requeues: [{job_id, time, reason, step}],
    faults: [{job_id, restart_count, time, kind, step, rank, host, detail, requeued}],
    evaluations: [{job_id, time, cluster, log_folder, job_name, target, split, mode, after}]  (`segjobs eval --submit`)
Fields added later (profile, after, evaluations, what a start ran) are optional: older records read as before.
A run.json that is not such a record (damaged, edited) reads as UnreadableRunError; the next transition
renames it aside and starts a new one.

The index ($SEGJOBS_HOME/index.json, default ~/.segjobs) lists the absolute run directories that
`segjobs submit` and `segjobs train` touched, so `segjobs status` finds runs wherever their output_dir is.

run.lock (launcher.runlock) names the one process that trains the run. Locks are filelock's lock files.

Note: on a cluster, run directories and $SEGJOBS_HOME must be on a file system every node sees.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import SoftFileLock, Timeout

from launcher.errors import InputError, WorkFailed
from launcher.files import read_bounded
from launcher.history import history_problem

log = logging.getLogger("segjobs.runs")

# segjobs' own states; the others below are SLURM's words for a job, as sacct and squeue print them.
SUBMITTED, RUNNING, REQUEUED, COMPLETED, FAILED, CANCELLED = "SUBMITTED", "RUNNING", "REQUEUED", "COMPLETED", "FAILED", "CANCELLED"
TIMEOUT, STOPPED = "TIMEOUT", "STOPPED"  # STOPPED: a local run whose process is gone without a final state
ACTIVE_STATES = {SUBMITTED, "PENDING", RUNNING, REQUEUED, "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}
FINAL_STATES = {COMPLETED, FAILED, CANCELLED, TIMEOUT, "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                "DEADLINE", STOPPED}


LOCK_TIMEOUT_S = 60  # run.json and the index are held for milliseconds: a longer wait means a stuck holder


class RunError(InputError):
    """A run name or folder a user gave that does not exist, is ambiguous, or is not segjobs' (exit status 2)."""


class RunLockedError(WorkFailed):
    """Another process holds the run, or a lock could not be taken (exit status 1)."""


# ---- processes ----------------------------------------------------------------------------------------------
def process_start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/PID/stat, field 22); None when it is gone,
    a zombie, or there is no /proc. With the pid it names one process: a pid reused later starts at another time."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def process_is(pid: object, start_time: object) -> bool:
    """Whether the process recorded as (pid, start time) still runs on this host. A pid that is not a positive
    integer, or a record without a start time, never matches: segjobs signals only what it can identify."""
    if not isinstance(pid, (int, str)) or not str(pid).isdigit() or int(pid) <= 0 or not isinstance(start_time, int):
        return False
    return process_start_time(int(pid)) == start_time


def this_process() -> dict:
    """{host, pid, pid_start}: what identifies this process for run.json and the run lock."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start_time(os.getpid())}


def home() -> Path:
    return Path(os.environ.get("SEGJOBS_HOME", Path.home() / ".segjobs"))


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside `path` while it is read and rewritten (the job on a compute node and `segjobs`
    on the login node both write). filelock's lock-file mode: exclusive creation works on NFS and Lustre
    mounted without flock; a marker left by a process that died on this host is reclaimed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    guard = path.with_name(f".{path.name}.filelock")  # not .lock: earlier versions left empty flock files there
    try:
        with SoftFileLock(guard, timeout=LOCK_TIMEOUT_S):
            yield
    except Timeout:
        raise RunLockedError(f"{guard}: held by another process for over {LOCK_TIMEOUT_S} s (its content names it); "
                             "if that process is gone (a crash on another host), remove the file.") from None


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


class UnreadableRunError(RunError):
    """run.json or the run index is not what segjobs writes (damaged or edited); the message says how."""


MAX_RECORD_BYTES = 16 << 20  # a run.json of ten thousand requeues is ~2 MB


def _read_json(path: Path, check: Callable[[Any], str | None]) -> Any:
    """A JSON file segjobs wrote, bounded and checked; UnreadableRunError naming the file and the problem."""
    try:
        value = json.loads(read_bounded(path, MAX_RECORD_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RecursionError) as exc:
        raise UnreadableRunError(f"{path}: unreadable ({str(exc)[:200]}).") from None
    problem = check(value)
    if problem:
        raise UnreadableRunError(f"{path}: not a segjobs record ({problem}).")
    return value


def _run_record_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"a JSON object was expected, found {type(record).__name__}"
    for key in ("submissions", "starts", "requeues", "faults", "evaluations"):
        entries = record.get(key, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            return f"{key} must be a list of objects"
    for entry in record.get("submissions", []):
        if (not isinstance(entry.get("job_id"), str) or entry.get("cluster") not in ("slurm", "local")
                or not isinstance(entry.get("log_folder"), str) or not isinstance(entry.get("overrides"), list)
                or not all(isinstance(o, str) for o in entry["overrides"])
                or not isinstance(entry.get("job_name", ""), str)):
            return "a submission needs a job_id, a cluster (slurm or local), a log_folder and a list of overrides"
        if not all(isinstance(entry.get(key), (str, type(None))) for key in ("profile", "after")):
            return "a submission's profile and after are strings or null"
    for entry in record.get("evaluations", []):
        if (not isinstance(entry.get("job_id"), str) or not isinstance(entry.get("job_name"), str)
                or not all(isinstance(entry.get(key), (str, type(None))) for key in ("split", "mode", "after"))
                or not isinstance(entry.get("time"), (int, float))):
            return "an evaluation needs a job_id, a job_name and a time"
    for key in ("name", "state", "model", "error", "cluster"):
        if record.get(key) is not None and not isinstance(record[key], str):
            return f"{key} must be a string"
    for key in ("total_steps", "global_batch", "nodes", "gpus_per_node", "tasks", "timeout_min"):
        value = record.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            return f"{key} must be a non-negative integer"
    for key in ("ended",):
        if record.get(key) is not None and not isinstance(record[key], (int, float)):
            return f"{key} must be a time"
    return history_problem(record)


def read_run(run_dir: Path) -> dict:
    """run.json of a run directory; {} when there is none (a run trained before any record was kept).
    UnreadableRunError (exit 2) when it is damaged or is not a record segjobs writes."""
    try:
        return _read_json(Path(run_dir) / "run.json", _run_record_problem)
    except FileNotFoundError:
        return {}


def _set_aside(path: Path) -> Path:
    """Rename a damaged file of segjobs' own beside itself (kept for inspection, never deleted)."""
    target = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    path.rename(target)
    return target


def _update(run_dir: Path, change: Callable[[dict], None]) -> dict:
    """Apply `change` to run.json under the lock and write it back atomically; returns the new record."""
    path = Path(run_dir) / "run.json"
    with locked(path):
        try:
            record = read_run(run_dir)
        except UnreadableRunError as exc:
            log.warning("%s; renamed to %s, a new record is started", exc, _set_aside(path).name)
            record = {}
        change(record)
        write_json(path, record)
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
    """This process started training: `start` is {job_id, time, restart_count, world_size} and what it runs
    (launcher.history.Start); its host, pid and pid start time are added."""
    record = _append(run_dir, "starts", {**start, **this_process()}, state=RUNNING, error=None, **fields)
    register(run_dir)
    return record


def requeued(run_dir: Path, job_id: str, reason: str, step: int) -> dict:
    """The job checkpointed at `step` and goes back to the queue (reason: timeout or preemption)."""
    return _append(run_dir, "requeues", {"job_id": job_id, "time": time.time(), "reason": reason, "step": step},
                   state=REQUEUED)


def faulted(run_dir: Path, fault: dict, max_faults: int) -> tuple[bool, bool]:
    """A fault ended this start of the job (a rank lost, a collective timed out, a stalled step): `fault` is
    {job_id, restart_count, time, kind, step, rank, host, detail}. Every rank of the job may report it; the
    first report is kept. Returns (first: this call recorded it, requeue: fewer than `max_faults` faults of
    this job came before, so the job is to be requeued). The state becomes REQUEUED, or FAILED."""
    outcome = (False, False)

    def change(record: dict) -> None:
        nonlocal outcome
        faults = record.setdefault("faults", [])
        same = [f for f in faults if (f.get("job_id"), f.get("restart_count")) == (fault["job_id"], fault["restart_count"])]
        if same:
            outcome = (False, same[0].get("requeued") is True)
            return
        requeue = sum(1 for f in faults if f.get("job_id") == fault["job_id"]) < max_faults
        outcome = (True, requeue)
        faults.append({**fault, "requeued": requeue})
        if requeue:
            record.update(state=REQUEUED, error=fault["detail"])
        else:
            record.update(state=FAILED, ended=time.time(),
                          error=f"{fault['detail']} (fault {len(faults)}; resources.max_faults={max_faults})")

    _update(run_dir, change)
    return outcome


def evaluation_submitted(run_dir: Path, evaluation: dict) -> dict:
    """An evaluation job was submitted for this run (`segjobs eval --submit`): `evaluation` is {job_id, time,
    cluster, log_folder, job_name, target, split, mode, after}. The run's own state is left as it is."""
    return _append(run_dir, "evaluations", evaluation)


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
def _index_problem(value: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(p, str) and p.startswith("/") for p in value):
        return "a JSON list of absolute run folders was expected"
    return None


def _read_index() -> list[str]:
    try:
        return _read_json(home() / "index.json", _index_problem)
    except FileNotFoundError:
        return []


def register(run_dir: Path) -> None:
    """Add a run folder to the index; a damaged index is renamed aside (and said so) and a new one started."""
    path = home() / "index.json"
    run_dir = str(Path(run_dir).resolve())
    with locked(path):
        try:
            known = _read_index()
        except UnreadableRunError as exc:
            log.warning("%s; renamed to %s, a new index is started", exc, _set_aside(path).name)
            known = []
        if run_dir not in known:
            write_json(path, known + [run_dir])


def indexed_runs() -> list[Path]:
    """The indexed run folders; none, with a warning, when the index is damaged (status still shows --runs)."""
    try:
        return [Path(p) for p in _read_index()]
    except UnreadableRunError as exc:
        log.warning("%s The next run started or submitted starts a new index.", exc)
        return []


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
    matches = [p for p in candidates if p.name == name or _recorded_name(p) == name]
    if not matches:
        raise RunError(f"no run named {name!r}: not a run directory and not in {home() / 'index.json'} "
                       "(see `segjobs status --all`).")
    if len(matches) > 1:
        raise RunError(f"{len(matches)} runs are named {name!r}: {', '.join(map(str, matches))}; pass the folder instead.")
    return matches[0]


def _recorded_name(run_dir: Path) -> str | None:
    try:
        return read_run(run_dir).get("name")
    except UnreadableRunError:  # one damaged run must not hide the others
        return None


def latest_job(record: dict) -> dict | None:
    return record["submissions"][-1] if record.get("submissions") else None


def check_run_dir(run_dir: Path, source: str) -> None:
    """Refuse to train or submit into a folder that holds files no segjobs run wrote (nothing is touched).
    A run directory is segjobs' when it holds run.json, run.lock or checkpoints/; `logs/` alone is what
    `segjobs submit` creates for the job's own logs before the job starts."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunError(f"{source}: output_dir {run_dir} is a file, not a folder.")
    if any((run_dir / name).exists() for name in ("run.json", "run.lock", "checkpoints")):
        return
    ours = {"logs", ".run.lock.filelock", ".run.json.filelock"}  # logs/ of a submission, the lock files' markers
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in ours)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise RunError(f"{source}: output_dir {run_dir} already holds files that no segjobs run wrote ({shown}); "
                       "nothing was written there. Choose a new or empty folder.")
