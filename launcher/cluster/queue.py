"""What the scheduler and this machine say about jobs: sacct and squeue (batched), local processes.

    states = poll_slurm(["4242", "4243"])        # one sacct call, then one squeue call for the unfinished
    local_job_alive("12345")                     # a job of submitit's local executor (its controller's pid)

Nothing here writes run state (launcher.runs does); nothing here imports torch.
"""

from __future__ import annotations

import re
import socket
import subprocess
from dataclasses import dataclass

from launcher import runs
from launcher.runs import ACTIVE_STATES

POLL_TIMEOUT_S = 30
RUNNING_STATES = {"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}  # a process of the job exists


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
    ids = sorted({i for i in job_ids if valid_slurm_job_id(i)})  # anything else never reaches a command line
    if not ids:
        return {}
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


def slurm_job_running(job_id: str) -> bool | None:
    """Whether SLURM runs the job now (not pending, not finished); None when SLURM cannot tell (not reachable,
    or the job unknown to it). The run lock asks this of a holder's job."""
    seen = poll_slurm([job_id]).get(job_id)
    if seen is None:
        return None
    return seen.state in RUNNING_STATES


def valid_slurm_job_id(job_id: object) -> bool:
    """A SLURM job id as segjobs records it: digits, or digits_digits for an array task."""
    return isinstance(job_id, str) and re.fullmatch(r"\d+(_\d+)?", job_id) is not None


def local_job_alive(job: dict) -> bool:
    """A job of submitit's local executor: its id is the pid of the controller process, recorded with the
    process's start time (a recycled pid or an edited record is not the job)."""
    return runs.process_is(job.get("job_id"), job.get("pid_start"))


def process_alive(start: dict) -> bool:
    """A foreground run (segjobs train) is alive while its process is, when seen from its own host."""
    if start.get("host") != socket.gethostname() or not start.get("pid"):
        return True  # cannot tell from here
    return runs.process_is(start["pid"], start.get("pid_start"))
