"""What the scheduler and this machine say about jobs: sacct and squeue (batched), local processes.

    view = poll_slurm(["4242", "4243"])          # one sacct call, then one squeue call for the unfinished
    view.job(run_json["submissions"][-1])        # the run's own job among the records of its id
    local_job_alive("12345")                     # a job of submitit's local executor (its controller's pid)

Nothing here writes run state (launcher.runs does); nothing here imports torch.
"""

from __future__ import annotations

import re
import socket
import subprocess
from dataclasses import dataclass, field
from datetime import datetime

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
    submitted: float | None = None  # SLURM's SubmitTime (a requeue sets it anew), seconds since the epoch
    name: str | None = None


# A job's SubmitTime comes from the controller's clock and run.json's submission time from the login node's,
# written just after sbatch returned: they may differ by this much.
CLOCK_SLACK_S = 300


@dataclass
class SlurmView:
    """What sacct and squeue said about some job ids: every record of each id (a requeued job has one per
    start, and a job id comes back after a controller reset: several jobs share it), and whether each command
    answered. `job(submission)` picks the record of a run's own job."""

    records: dict[str, list[JobState]] = field(default_factory=dict)
    accounting: bool = True  # sacct answered (slurmdbd is there and up)
    reachable: bool = True  # squeue answered (the controller is up)

    def job(self, submission: dict) -> JobState | None:
        """The latest record of a run's job (a submission from run.json); see `records_of`."""
        own = self.records_of(submission)
        return own[-1] if own else None

    def records_of(self, submission: dict) -> list[JobState]:
        """Every record of a run's job (one per start of a requeued job), oldest first: its id, submitted no
        earlier than the run submitted it (a job with that id submitted before is another job: the id was
        reused) and, when the submission records the job's name, of that name (a job submitted later under a
        reused id is another run's or another user's)."""
        since, name = submission.get("time"), submission.get("job_name")
        return [seen for seen in self.records.get(submission["job_id"], [])
                if not (isinstance(since, (int, float)) and seen.submitted is not None
                        and seen.submitted < since - CLOCK_SLACK_S)
                and not (name is not None and seen.name is not None and seen.name != name)]


def slurm_time(text: str) -> float | None:
    """SLURM's local timestamps (2026-11-27T19:35:59) -> seconds since the epoch; None for Unknown, N/A, NONE."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _seconds(text: str) -> int | None:
    """SLURM durations: [D-]HH:MM:SS, MM:SS, or UNLIMITED/Partition_Limit."""
    if not text or not text[0].isdigit():
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


SACCT_FORMAT = "JobID,State,Reason,ElapsedRaw,TimelimitRaw,NNodes,Submit,JobName"


def parse_sacct(text: str) -> dict[str, list[JobState]]:
    """`sacct -X -D -n -P --format=SACCT_FORMAT` output -> every record of each job id, oldest first (a requeued
    job has one per start; a reused id has one per job). The name comes last: it may hold the delimiter."""
    records: dict[str, list[JobState]] = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 8:
            continue
        job_id, state, reason, elapsed, limit, nodes, submitted = fields[:7]
        records.setdefault(job_id, []).append(JobState(
            state=state.split()[0] if state else "UNKNOWN",  # "CANCELLED by 0" -> CANCELLED
            reason="" if reason in ("None", "") else reason,
            elapsed_s=int(elapsed) if elapsed.isdigit() else None,
            limit_s=int(limit) * 60 if limit.isdigit() else None,
            nodes=int(nodes) if nodes.isdigit() else None,
            submitted=slurm_time(submitted), name="|".join(fields[7:]),
        ))
    for seen in records.values():
        seen.sort(key=lambda s: s.submitted or 0.0)
    return records


def parse_squeue(text: str) -> dict[str, JobState]:
    """`squeue -h -o %i|%T|%r|%V|%j` output -> the live job of each id (the controller holds one per id)."""
    live = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 5:
            continue
        job_id, state, reason, submitted = fields[:4]
        live[job_id] = JobState(state, "" if reason == "None" else reason, submitted=slurm_time(submitted),
                                name="|".join(fields[4:]))
    return live


def poll_slurm(job_ids: list[str]) -> SlurmView:
    """Every record of these jobs: one sacct call for all of them, then one squeue call for those sacct does not
    show as finished (slurmdbd learns of state changes late: a requeued job can read REQUEUED there while
    the controller already holds it PENDING for BeginTime). Without accounting (no slurmdbd, or sacct fails)
    squeue alone answers, for live jobs only; the view says so."""
    view = SlurmView()
    ids = sorted({i for i in job_ids if valid_slurm_job_id(i)})  # anything else never reaches a command line
    if not ids:
        return view
    sacct = _slurm_output(["sacct", "-X", "-D", "-n", "-P", f"--format={SACCT_FORMAT}", "-j", ",".join(ids)])
    view.accounting = sacct is not None
    view.records = parse_sacct(sacct or "")
    unfinished = [i for i in ids if i not in view.records or view.records[i][-1].state in ACTIVE_STATES]
    if unfinished:
        squeue = _slurm_output(["squeue", "-h", "-j", ",".join(unfinished), "-o", "%i|%T|%r|%V|%j"])
        # squeue fails for a list of ids it all forgot: the controller answered if `squeue -j` of nothing works
        view.reachable = squeue is not None or _slurm_output(["squeue", "-h", "-o", "%i"]) is not None
        for job_id, live in parse_squeue(squeue or "").items():
            records = view.records.setdefault(job_id, [])
            if records and records[-1].submitted is not None and live.submitted is not None \
                    and abs(records[-1].submitted - live.submitted) < 1:
                last = records[-1]
                last.state, last.reason = live.state, live.reason
            else:  # accounting does not know this start yet (or at all)
                records.append(live)
    return view


def _slurm_output(command: list[str]) -> str | None:
    """stdout of a SLURM query; None when it fails (no SLURM here, slurmdbd down, every job id unknown to squeue)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=POLL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def slurm_job_running(job_id: str) -> bool | None:
    """Whether SLURM runs the job now (not pending, not finished); None when SLURM cannot tell (not reachable,
    or the job unknown to it). The run lock asks this of a holder's job."""
    records = poll_slurm([job_id]).records.get(job_id)
    seen = records[-1] if records else None
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
