"""Goodput: how much of what a run was allocated went into steps it kept.

    result = goodput(run_json, read_metrics(run_dir / "metrics.jsonl"), slurm_view, time.time())

The unit is GPU-hours (wall hours x the GPUs the run holds: nodes x gpus_per_node, or the ranks of a
foreground run on GPUs); a CPU run has no GPU-hours and is counted in node-hours (wall hours x nodes, whether
or not the nodes were the job's alone).
    allocated   SLURM's elapsed time of every start of every submission (sacct: one record per start of a
                requeued job); where accounting has nothing (the local executor, `segjobs train`, no slurmdbd,
                a job gone from sacct's window) each start from its time in run.json to the first stop recorded
                after it (a requeue, a fault, the end) or, when none was recorded (a killed job), to the next
                start; a run still active counts until now
    kept        the steps of the final history: metrics.jsonl's log records, each window's steps x global
                batch / samples_per_s (step time without checkpoints and evaluation)
    recomputed  the steps a start did past the checkpoint the next start resumed from (run.json's
                redo_steps: a lower bound, the steps after a killed start's last log step left no trace),
                timed as the same steps of the kept history
    other       allocated - kept - recomputed: start-up, checkpoints, evaluation, waiting to stop
    queued      wall time from each recorded stop to the next start (waiting in the queue after a requeue
                or fault): nothing is allocated then, so it is hours, not GPU-hours
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from launcher import runs
from launcher.cluster.queue import SlurmView
from launcher.history import Start, parsed


@dataclass
class Goodput:
    unit: str  # "GPU-hours" or "node-hours"
    width: int  # GPUs (or nodes) held: unit hours = wall hours x width
    allocated: float  # in `unit`
    allocated_from: str  # "sacct", "run.json", or "sacct and run.json"
    kept: float | None  # None: metrics.jsonl cannot tell (no samples_per_s, no global batch)
    kept_steps: int
    recomputed: float | None
    recomputed_steps: int
    queued_h: float  # wall hours
    notes: list[str] = field(default_factory=list)

    @property
    def other(self) -> float | None:
        if self.kept is None or self.recomputed is None:
            return None
        return self.allocated - self.kept - self.recomputed

    def to_json(self) -> dict:
        return {**asdict(self), "other": self.other}


def width_and_unit(record: dict, starts: list[Start]) -> tuple[int, str]:
    """(GPUs, "GPU-hours") for a run on GPUs, else (nodes, "node-hours")."""
    nodes, gpus = record.get("nodes") or 1, record.get("gpus_per_node")
    if gpus:
        return nodes * gpus, "GPU-hours"
    if gpus is None and starts and starts[-1].gpu:  # `segjobs train` on a GPU machine: one GPU per rank
        return starts[-1].world_size, "GPU-hours"
    return nodes, "node-hours"


def start_spans(record: dict, starts: list[Start], now: float) -> list[tuple[float | None, bool]]:
    """For each start, (when it stopped, whether a stop was recorded then); (None, False) when unknown."""
    stops = [r.time for r in parsed(record, "requeues")] + [f.time for f in parsed(record, "faults")]
    stops += [record["ended"]] if isinstance(record.get("ended"), (int, float)) else []
    spans = []
    for number, start in enumerate(starts):
        following = starts[number + 1].time if number + 1 < len(starts) else None
        recorded = [t for t in stops if start.time <= t and (following is None or t <= following)]
        if recorded:
            spans.append((min(recorded), True))
        elif following is not None:
            spans.append((following, False))
        elif record.get("state") in runs.ACTIVE_STATES:
            spans.append((now, False))
        else:
            spans.append((None, False))
    return spans


def step_times(metrics: list[dict], global_batch: int) -> list[tuple[int, int, float]]:
    """(first step, last step, seconds per step) of each log window of the kept history."""
    windows, before = [], 0
    training = [r for r in metrics if isinstance(r.get("step"), int) and isinstance(r.get("samples_per_s"), (int, float))
                and r["samples_per_s"] > 0 and "loss" in r]
    for record in sorted(training, key=lambda r: r["step"]):
        if record["step"] > before:
            windows.append((before, record["step"], global_batch / record["samples_per_s"]))
            before = record["step"]
    return windows


def seconds_of_steps(windows: list[tuple[int, int, float]], first: int, last: int) -> float:
    """Seconds the steps first+1 .. last took in the kept history."""
    return sum(max(0, min(last, high) - max(first, low)) * per_step for low, high, per_step in windows)


def goodput(record: dict, metrics: list[dict], slurm: SlurmView | None, now: float) -> Goodput:
    starts = parsed(record, "starts")
    width, unit = width_and_unit(record, starts)
    spans = start_spans(record, starts, now)
    notes, sources, allocated_s = [], set(), 0.0  # allocated_s: wall seconds x width
    counted: set[int] = set()  # starts whose time sacct accounted for
    per_node = width // (record.get("nodes") or 1)  # sacct says how many nodes each start held
    for submission in record.get("submissions", []):
        seen = slurm.records_of(submission) if slurm is not None and submission["cluster"] == "slurm" else []
        seen = [s for s in seen if s.elapsed_s is not None]
        if seen:
            sources.add("sacct")
            allocated_s += sum(s.elapsed_s * (s.nodes * per_node if s.nodes else width) for s in seen)
            counted |= {i for i, start in enumerate(starts) if start.job_id == submission["job_id"]}
    for number, (start, (stop, recorded)) in enumerate(zip(starts, spans)):
        if number in counted:
            continue
        sources.add("run.json")
        if stop is None:
            notes.append(f"start {number + 1}: no stop recorded and no later start; not counted")
            continue
        if not recorded and number + 1 < len(starts):
            notes.append(f"start {number + 1}: no stop recorded (killed?); counted until start {number + 2}")
        allocated_s += (stop - start.time) * width
    queued_s = sum(starts[n].time - stop for n, (stop, recorded) in enumerate(spans[:-1], 1)
                   if recorded and stop is not None and starts[n].time > stop)

    global_batch = record.get("global_batch")
    last = max((r["step"] for r in metrics if isinstance(r.get("step"), int) and "loss" in r), default=0)
    windows = step_times(metrics, global_batch) if global_batch else []
    redone = [(s.from_step, s.redo_steps) for s in starts if s.from_step is not None and s.redo_steps]
    kept = recomputed = None
    if windows:
        kept = seconds_of_steps(windows, 0, last) * width / 3600
        recomputed = sum(seconds_of_steps(windows, first, first + n) for first, n in redone) * width / 3600
    elif last:
        notes.append("metrics.jsonl has no samples_per_s (or run.json no global_batch): step time unknown")
    if any(s.from_step is None for s in starts[1:]):
        notes.append("some starts were recorded by a segjobs that did not count recomputed steps")
    return Goodput(unit=unit, width=width, allocated=allocated_s / 3600,
                   allocated_from=" and ".join(sorted(sources)) or "nothing", kept=kept, kept_steps=last,
                   recomputed=recomputed, recomputed_steps=sum(n for _, n in redone), queued_h=queued_s / 3600,
                   notes=notes)
