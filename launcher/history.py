"""What run.json's history says: the schema of its starts, requeues and faults, and the drift between starts.

Each start (every time the trainer starts in a job, after each requeue too) records what it ran
(launcher.training.runtime writes it, launcher.runs stores it):
    code      {commit, dirty, diff_sha256}: the segjobs checkout's HEAD and a sha256 of `git diff HEAD`
              (tracked files; untracked files are not in it); absent when segjobs is not a git checkout
    versions  {python, torch, cuda, nccl, timm, accelerate, segjobs}: cuda and nccl only when a GPU trains
    gpu       rank 0's GPU model; absent on CPU
    hosts     every rank's host name, by rank
    from_step the step it resumed from (0: from scratch)
    redo_steps steps the stopped start before it had logged past that checkpoint: done again (a lower bound:
              steps after the last log step of a killed start left no trace)
Older run.json files have none of these; everything here reads them as absent.

    drift(record["starts"])   # ["torch 2.11 -> 2.14 at start 3"]: a requeued job runs what is installed then
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

Text = Annotated[str, StringConstraints(max_length=10_000)]  # details and errors
Word = Annotated[str, StringConstraints(max_length=256)]  # versions, host names, reasons
Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{7,64}$")]
Seconds = Annotated[float, Field(ge=0, le=1e11)]  # since the epoch: before the year 5138
Count = Annotated[int, Field(ge=0, strict=True)]


class Code(BaseModel):
    model_config = ConfigDict(extra="forbid")
    commit: Hex
    dirty: bool
    diff_sha256: Hex | None = None  # of `git diff HEAD`; None when clean


class Start(BaseModel):
    """One entry of run.json's starts. Fields segjobs never wrote are kept as they are (extra="allow")."""
    model_config = ConfigDict(extra="allow")
    job_id: Word | None = None
    time: Seconds
    restart_count: Count = 0
    world_size: Count = 1
    host: Word | None = None
    code: Code | None = None
    versions: dict[Word, Word] = Field(default_factory=dict, max_length=32)
    gpu: Word | None = None
    hosts: list[Word] = Field(default_factory=list, max_length=1 << 16)
    from_step: Count | None = None
    redo_steps: Count | None = None


class Requeue(BaseModel):
    model_config = ConfigDict(extra="allow")
    job_id: Word
    time: Seconds
    reason: Word | None = None
    step: Count


class Fault(BaseModel):
    model_config = ConfigDict(extra="allow")
    job_id: Word | None = None
    time: Seconds
    kind: Word = "fault"
    step: Count = 0
    host: Word | None = None
    detail: Text = ""
    requeued: bool = False


SCHEMAS = {"starts": Start, "requeues": Requeue, "faults": Fault}


def history_problem(record: dict) -> str | None:
    """Why run.json's starts, requeues or faults are not what segjobs writes (wrong types, strings over their
    bounds), naming the first bad entry; None when they are."""
    for key, schema in SCHEMAS.items():
        for index, entry in enumerate(record.get(key, [])):
            try:
                schema.model_validate(entry)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(p) for p in error["loc"])
                return f"{key}[{index}].{where}: {error['msg'][:200]}"
    return None


def parsed(record: dict, key: str) -> list:
    """run.json's starts, requeues or faults as their schema's objects (the record was checked on reading)."""
    return [SCHEMAS[key].model_validate(entry) for entry in record.get(key, [])]


def code_text(code: Code | None) -> str:
    """abc123def456, abc123def456+dirty(sha256 1a2b3c4d), or "not a git checkout"."""
    if code is None:
        return "not a git checkout"
    return code.commit[:12] + (f"+dirty(sha256 {code.diff_sha256[:8]})" if code.dirty and code.diff_sha256 else
                               "+dirty" if code.dirty else "")


def described(start: Start) -> dict[str, str]:
    """What drift compares: code, each version and the GPU model, as text; {} for a start that recorded none
    (written by a segjobs without provenance)."""
    if not start.versions:
        return {}
    return {"code": code_text(start.code), **start.versions, "gpu": start.gpu or "no GPU"}


def drift(starts: list[dict]) -> list[str]:
    """Every change of code, versions or GPU model from one start to the next, as "torch 2.11 -> 2.14 at
    start 3" (starts count from 1). Starts that recorded nothing are skipped, not compared."""
    changes, before = [], {}
    for number, start in enumerate((Start.model_validate(s) for s in starts), 1):
        now = described(start)
        if not now:
            continue
        for key in (k for k in dict.fromkeys([*before, *now]) if before and before.get(k) != now.get(k)):
            changes.append(f"{key} {before.get(key, 'none')} -> {now.get(key, 'none')} at start {number}")
        before = now
    return changes
