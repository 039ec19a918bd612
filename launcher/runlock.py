"""The run lock: one process trains a run at a time, and a lock left by a dead one is taken over.

    with RunLock(run_dir, job_id="4242", job_running=queue.slurm_job_running):
        train()

run.lock names the holder (host, pid and its start time, SLURM job id) and a heartbeat; it is read and
rewritten under launcher.runs' lock files, which work on NFS and Lustre without flock.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from launcher.files import read_bounded
from launcher.runs import RunLockedError, locked, process_is, this_process, write_json

log = logging.getLogger("segjobs.runs")

HEARTBEAT_S = 30  # the holder renews its heartbeat this often ...
STALE_AFTER_S = 300  # ... and a lock whose heartbeat is older than this is taken over


def lock_holder(run_dir: Path) -> dict | None:
    """The record of the process that holds the run (run.lock), {} when it is unreadable, None when none does."""
    try:
        record = json.loads(read_bounded(Path(run_dir) / "run.lock", 1 << 20).decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):
        return {}
    return record if isinstance(record, dict) else {}


def describe_holder(holder: dict) -> str:
    job = f", job {holder.get('job_id')}" if holder.get("job_id") else ""
    age = time.time() - holder["heartbeat"] if isinstance(holder.get("heartbeat"), (int, float)) else None
    beat = f", last heartbeat {age:.0f} s ago" if age is not None else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}{beat}"


def stale_reason(holder: dict, job_id: str | None = None,
                 job_running: Callable[[str], bool | None] | None = None) -> str | None:
    """Why a run lock's holder no longer holds the run (None: it does). `job_id` is the SLURM job of the
    process asking (a requeue of the holder's own job takes over); `job_running(job_id)` says whether SLURM
    still runs a job (None: cannot tell)."""
    if not holder:
        return "the lock file is unreadable"
    if holder.get("host") == socket.gethostname() and not process_is(holder.get("pid"), holder.get("pid_start")):
        return f"its process {holder.get('pid')} on {holder.get('host')} has ended"
    holder_job = holder.get("job_id")
    if holder_job and job_id and str(holder_job) == str(job_id):
        return f"it is an earlier start of this job {job_id} (requeued)"
    if holder_job and job_running is not None and job_running(str(holder_job)) is False:
        return f"SLURM no longer runs its job {holder_job}"
    heartbeat = holder.get("heartbeat")
    if not isinstance(heartbeat, (int, float)) or time.time() - heartbeat > STALE_AFTER_S:
        return f"its heartbeat is older than {STALE_AFTER_S} s"
    return None


class RunLock:
    """The trainer's exclusive hold on a run directory for its whole life (rank 0 takes it for all ranks).
    run.lock names the holder (host, pid and its start time, SLURM job id) and a heartbeat that a background
    thread renews every HEARTBEAT_S. A second trainer is refused with RunLockedError naming the holder, unless
    the lock is stale (see stale_reason): then it is taken over with a log line. Evaluation and pictures do
    not take it: they write only under eval/ and pictures/."""

    def __init__(self, run_dir: Path, job_id: str | None = None, job_running: Callable[[str], bool | None] | None = None):
        self.path = Path(run_dir) / "run.lock"
        self.job_id, self.job_running = job_id, job_running
        self.record: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        with locked(self.path):
            holder = lock_holder(self.path.parent)
            if holder is not None:
                reason = stale_reason(holder, self.job_id, self.job_running)
                if reason is None:
                    raise RunLockedError(f"{self.path.parent}: the run is being trained by {describe_holder(holder)}; "
                                         "two processes never write one run. Wait for it, or `segjobs cancel` it.")
                log.warning("%s: taking over the run lock of %s: %s", self.path.parent, describe_holder(holder), reason)
            now = time.time()
            self.record = {**this_process(), "job_id": self.job_id, "since": now, "heartbeat": now}
            write_json(self.path, self.record)
        self._thread = threading.Thread(target=self._beat, name="segjobs-run-lock", daemon=True)
        self._thread.start()

    def _ours(self, holder: dict | None) -> bool:
        keys = ("host", "pid", "pid_start", "since")
        return bool(holder) and all(holder.get(k) == self.record.get(k) for k in keys)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with locked(self.path):
                if not self._ours(lock_holder(self.path.parent)):
                    log.warning("%s: the run lock was taken over by another process", self.path.parent)
                    return
                self.record["heartbeat"] = time.time()
                write_json(self.path, self.record)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with locked(self.path):
            if self._ours(lock_holder(self.path.parent)):
                self.path.unlink()
