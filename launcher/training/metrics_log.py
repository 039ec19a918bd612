"""What a run reports while it trains: metrics.jsonl (the record), a rich progress bar and TensorBoard (views).

    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=rank == 0)
    metrics.write({"step": 10, "epoch": 0, "loss": 2.31, "lr": 1e-4, "samples_per_s": 52.0})
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from launcher.files import read_bounded
from launcher.runs import RunError


def strict(value):
    """`value` with every NaN or infinity as None: JSON has neither, and readers of metrics.jsonl expect JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def to_json(value, indent: int | None = None) -> str:
    return json.dumps(strict(value), indent=indent, allow_nan=False)


MAX_METRICS_BYTES = 1 << 30  # ten million logged steps


def read_metrics(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl; a line that is not a whole JSON object (the last line of a process
    killed while writing it) is skipped. ValueError for a file that is not a regular one of at most 1 GiB."""
    records = []
    for line in read_bounded(Path(path), MAX_METRICS_BYTES).decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class MetricsLog:
    """runs/<name>/metrics.jsonl, written by rank 0: one JSON object per line."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> int:
        """At every start: drop lines past the checkpoint it starts from (step 0 without one), which this start
        writes again, and a half-written last line, which the next record would otherwise continue. Returns
        how many steps past `step` the dropped lines reached: work a stopped start did that is done again
        (0 on ranks other than 0)."""
        if not self.enabled or not self.path.exists():
            return 0
        try:
            records = read_metrics(self.path)
        except ValueError as exc:
            raise RunError(f"{self.path}: cannot be continued ({exc}); move it away to resume the run.") from None
        steps = [r.get("step", 0) if isinstance(r.get("step", 0), int) else -1 for r in records]
        self.path.write_text("".join(json.dumps(r) + "\n" for r, s in zip(records, steps) if 0 <= s <= step))
        return max([s - step for s in steps if s > step], default=0)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(to_json(record) + "\n")


class LiveView:
    """What a person watches: a rich progress bar on a terminal (rank 0), TensorBoard scalars when the
    tensorboard package is installed. Both optional; metrics.jsonl is the record."""

    def __init__(self, run_dir: Path, total: int, done: int, enabled: bool):
        self.bar = self.writer = None
        if not enabled:
            return
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                TimeRemainingColumn(), transient=True)
            self.task = self.bar.add_task("train", total=total, completed=done, info="")
            self.bar.start()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def update(self, step: int, record: dict | None = None) -> None:
        if self.bar is not None:
            info = f"loss {record['loss']:.4f}  {record['samples_per_s']:.1f} img/s" if record and "loss" in record else None
            self.bar.update(self.task, completed=step, **({"info": info} if info else {}))
        if self.writer is not None and record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch", "time"):
                    self.writer.add_scalar(key, value, step)
            for key, value in record.get("eval", {}).items():
                self.writer.add_scalar(f"eval/{key}", value, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.writer is not None:
            self.writer.close()
