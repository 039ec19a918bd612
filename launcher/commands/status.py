"""Views over runs: `segjobs status` (a rich table, --watch, --json) and `segjobs logs`.

    segjobs status                      # active runs and those active in the last 7 days
    segjobs status --all --runs /scratch/me/runs
    segjobs status dino_vits8 --watch   # refresh until every shown run has finished
    segjobs logs dino_vits8 --follow --rank 1

One refresh reads each run's run.json, the tail of metrics.jsonl, its checkpoint folder names and at most two
evaluation reports (the training's latest and the newest `segjobs eval` report: the mIoU column shows both), and
asks SLURM once for all jobs together (one sacct call), evaluation jobs included. A run whose job has left sacct's window shows the last
state recorded in run.json (status writes SLURM's final state there when it sees it).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from launcher import checkpoint as layout
from launcher import runs
from launcher.cluster import queue
from launcher.files import read_bounded
from launcher.history import drift

RECENT_S = 7 * 86400
# eval/step_NNNNNNNN.json: the trainer's evaluation (or `segjobs eval` in the default split and mode, which writes
# the same numbers there); eval/step_NNNNNNNN_<split>_<mode>.json: `segjobs eval` in another split or mode.
REPORT_NAME = re.compile(r"step_(\d{8})(_[A-Za-z0-9_.-]+)?\.json")
MAX_REPORT_BYTES = 1 << 20  # a report with 150 class names and IoUs is ~10 kB


@dataclass
class Row:
    name: str
    run_dir: str
    model: str = ""
    job_id: str = ""
    cluster: str = ""
    state: str = "UNKNOWN"
    reason: str = ""
    nodes: int = 1
    gpus_per_node: int = 0
    elapsed_s: float | None = None
    limit_s: float | None = None
    step: int = 0
    total_steps: int | None = None
    epoch: int | None = None
    loss: float | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None
    requeues: int = 0
    faults: int = 0
    checkpoint_age_s: float | None = None
    error: str | None = None
    miou: float | None = None  # the training's latest evaluation
    eval_miou: float | None = None  # the newest `segjobs eval` report (it may be the same file)
    eval_mode: str | None = None
    eval_step: int | None = None
    eval_state: str | None = None  # the latest evaluation job's state while it has not completed
    data_wait: float | None = None  # share of step time rank 0 waited for the loader, at the last log step
    gpu_util: float | None = None  # percent, NVML's last sample at the last log step (GPU runs with nvidia-ml-py)
    gpu_mem_gb: float | None = None  # in use on rank 0's GPU (NVML), GiB
    peak_mem_gb: float | None = None  # torch's peak allocated GPU memory of rank 0, GiB
    drift: list[str] = field(default_factory=list)  # code or software changes between starts (launcher.history)

    @property
    def active(self) -> bool:
        return self.state in runs.ACTIVE_STATES


def last_training_record(path: Path, tail_bytes: int = 16384) -> dict | None:
    """The last metrics.jsonl line with a loss (evaluation lines have none), reading only the file's tail."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not hang the table
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        f.seek(max(os.fstat(fd).st_size - tail_bytes, 0))
        lines = f.read(tail_bytes).decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # the first, cut line of the tail, or a line being written
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("loss"), (int, float)):
            return record
    return None


def read_report(path: Path) -> dict | None:
    """An evaluation report's step, miou and mode (None for `segjobs eval`'s own reports' absent mode); None when
    the file is not a report (damaged, edited, too large)."""
    try:
        report = json.loads(read_bounded(path, MAX_REPORT_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    miou = report.get("miou") if isinstance(report, dict) else None
    if not isinstance(miou, (int, float)) or isinstance(miou, bool) or not math.isfinite(miou):
        return None
    mode = report.get("mode")
    return {"miou": float(miou), "mode": mode[:20] if isinstance(mode, str) else None,
            "step": int(REPORT_NAME.fullmatch(path.name).group(1))}


def evaluation_reports(run_dir: Path) -> tuple[dict | None, dict | None]:
    """(the training's latest evaluation, the newest report `segjobs eval` wrote) from the run's eval/; reads two
    files at most."""
    try:
        entries = [(entry.stat().st_mtime, entry.name) for entry in os.scandir(run_dir / "eval")
                   if REPORT_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)]
    except OSError:
        return None, None
    plain = max((name for _, name in entries if REPORT_NAME.fullmatch(name).group(2) is None), default=None)
    other = max(((mtime, name) for mtime, name in entries if REPORT_NAME.fullmatch(name).group(2)), default=None)
    trained = read_report(run_dir / "eval" / plain) if plain else None
    times = dict((name, mtime) for mtime, name in entries)
    candidates = [(times[plain], trained)] if trained else []
    if other is not None:
        candidates.append((other[0], read_report(run_dir / "eval" / other[1])))
    evaluated = [(mtime, report) for mtime, report in candidates if report is not None and report["mode"]]
    return trained, max(evaluated, key=lambda item: item[0])[1] if evaluated else None


def newest_checkpoint_time(run_dir: Path) -> float | None:
    latest = layout.latest(layout.checkpoints_folder(run_dir))
    return latest.stat().st_mtime if latest is not None else None


def build_row(run_dir: Path, slurm: queue.SlurmView, now: float) -> Row:
    """One run's row; a run whose files are damaged or edited is shown as UNREADABLE with the reason."""
    try:
        return _build_row(run_dir, slurm, now)
    except runs.UnreadableRunError as exc:
        return Row(name=run_dir.name, run_dir=str(run_dir), state="UNREADABLE", error=str(exc))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a field of the wrong type in a hostile run.json
        return Row(name=run_dir.name, run_dir=str(run_dir), state="UNREADABLE",
                   error=f"{run_dir / 'run.json'}: a field is not what segjobs writes ({type(exc).__name__}: {str(exc)[:100]})")


def _build_row(run_dir: Path, slurm: queue.SlurmView, now: float) -> Row:
    record = runs.read_run(run_dir)
    row = Row(name=record.get("name", run_dir.name), run_dir=str(run_dir), model=record.get("model", ""),
              state=record.get("state", "UNKNOWN"), nodes=record.get("nodes", 1), gpus_per_node=record.get("gpus_per_node", 0),
              total_steps=record.get("total_steps"), requeues=len(record.get("requeues", [])), error=record.get("error"),
              faults=len(record.get("faults", [])),
              cluster=record.get("cluster", ""), drift=drift(record.get("starts", [])))
    job = runs.latest_job(record)
    start = record["starts"][-1] if record.get("starts") else None
    if job is not None:
        row.job_id, row.cluster = job["job_id"], job["cluster"]
    seen = slurm.job(job) if job is not None and job["cluster"] == "slurm" else None
    if seen is not None:
        row.elapsed_s, row.limit_s, row.nodes = seen.elapsed_s, seen.limit_s, seen.nodes or row.nodes
        waiting_after_requeue = seen.state == "PENDING" and row.state == "REQUEUED"
        row.state = "REQUEUED" if waiting_after_requeue else seen.state
        row.reason = seen.reason if seen.state == "PENDING" else ""
        if seen.state in runs.FINAL_STATES and record.get("state") != seen.state:
            runs.settled(run_dir, seen.state)  # the last known state, once sacct forgets the job
    elif job is not None and job["cluster"] == "slurm":
        if row.active and not slurm.accounting and slurm.reachable:
            row.state = runs.STOPPED  # squeue no longer shows it, and no accounting says how it ended
    elif job is None or job["cluster"] != "slurm":  # local or foreground: its process tells whether it still runs
        if job is not None and record.get("timeout_min"):
            row.limit_s = 60 * record["timeout_min"]
        if row.active:
            alive = queue.local_job_alive(job) if job is not None else start is None or queue.process_alive(start)
            row.state = row.state if alive else runs.STOPPED
        if start is not None and (row.active or record.get("ended", 0) >= start["time"]):
            row.elapsed_s = (now if row.active else record["ended"]) - start["time"]
    if row.state == "TIMEOUT" and not row.error and record.get("spec"):
        limit = record["spec"]["resources"]["max_requeues"]
        timeouts = sum(1 for r in record.get("requeues", []) if r["reason"] == "timeout" and r["job_id"] == row.job_id)
        row.error = f"requeued after {timeouts} time limits (resources.max_requeues={limit}); resume it to go on"
    metrics = last_training_record(run_dir / "metrics.jsonl")
    if metrics is not None:
        row.step, row.epoch, row.loss, row.samples_per_s = metrics["step"], metrics.get("epoch"), metrics["loss"], metrics.get("samples_per_s")
        for key in ("data_wait", "gpu_util", "gpu_mem_gb", "peak_mem_gb"):
            value = metrics.get(key)
            setattr(row, key, value if isinstance(value, (int, float)) and not isinstance(value, bool) else None)
        if row.active and row.total_steps and row.samples_per_s and record.get("global_batch"):
            row.eta_s = (row.total_steps - row.step) * record["global_batch"] / row.samples_per_s
    saved = newest_checkpoint_time(run_dir)
    row.checkpoint_age_s = now - saved if saved is not None else None
    trained, evaluated = evaluation_reports(run_dir)
    row.miou = trained["miou"] if trained else None
    if evaluated:
        row.eval_miou, row.eval_mode, row.eval_step = evaluated["miou"], evaluated["mode"], evaluated["step"]
    evaluation = record["evaluations"][-1] if record.get("evaluations") else None
    seen = slurm.job(evaluation) if evaluation is not None else None
    if seen is not None and seen.state != runs.COMPLETED:
        row.eval_state = seen.state
    return row


def refresh_row(run_dir: Path) -> Row:
    """One run's row, asking SLURM about its latest job when it has one there."""
    job = runs.latest_job(runs.read_run(run_dir))
    slurm = queue.poll_slurm([job["job_id"]] if job is not None and job["cluster"] == "slurm" else [])
    return build_row(run_dir, slurm, time.time())


def collect(names: list[str] = (), extra_dirs: list[Path] = (), show_all: bool = False,
            poll: bool = True) -> tuple[list[Row], str | None]:
    """The rows, and a notice to show once when SLURM could not tell everything (no accounting)."""
    rows, notice = rows_for(runs.find_runs(list(names), list(extra_dirs)), poll)
    if not names and not show_all:
        now = time.time()
        rows = [r for r in rows if r.active or now - _modified(Path(r.run_dir)) < RECENT_S]
    return rows, notice


def rows_for(run_dirs: list[Path], poll: bool = True) -> tuple[list[Row], str | None]:
    """A row per run folder, SLURM asked once for all of them, and the notice of collect()."""
    slurm_jobs = [job["job_id"] for d in run_dirs for job in _latest_jobs(d) if job.get("cluster") == "slurm"]
    slurm = queue.poll_slurm(slurm_jobs if poll else [])
    now = time.time()
    rows = [build_row(d, slurm, now) for d in run_dirs]
    notice = None
    if not slurm.reachable:
        notice = "squeue did not answer (the SLURM controller is down or unreachable): states are run.json's."
    elif not slurm.accounting:
        notice = ("sacct did not answer (no slurmdbd, or it is down): live jobs' states come from squeue, finished "
                  "jobs' from run.json, and elapsed times and limits are not shown; STOPPED: gone from squeue "
                  "without a final state in run.json.")
    return rows, notice


def _latest_jobs(run_dir: Path) -> list[dict]:
    """The run's latest job and its latest evaluation job."""
    try:
        record = runs.read_run(run_dir)
    except runs.UnreadableRunError:  # shown as such by build_row
        return []
    return [entries[-1] for entries in (record.get("submissions"), record.get("evaluations")) if entries]


def _modified(run_dir: Path) -> float:
    times = [p.stat().st_mtime for p in (run_dir / "run.json", run_dir / "metrics.jsonl") if p.exists()]
    return max(times, default=0.0)


# ---- rendering --------------------------------------------------------------------------------------------
def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
    return f"{days}-{clock}" if days else clock


STATE_STYLE = {"RUNNING": "green", "COMPLETED": "bold green", "PENDING": "yellow", "SUBMITTED": "yellow",
               "REQUEUED": "cyan", "FAILED": "bold red", "TIMEOUT": "red", "CANCELLED": "magenta", "STOPPED": "red",
               "UNREADABLE": "bold red"}


def progress_text(row: Row, width: int = 16):
    from rich.text import Text

    total = row.total_steps or max(row.step, 1)
    filled = round(width * min(row.step, total) / total)
    text = Text("━" * filled, style="green" if row.state == "COMPLETED" else "magenta")
    text.append("━" * (width - filled), style="grey35")
    text.append(f" {row.step}/{row.total_steps or '?'}")
    if row.epoch is not None:
        text.append(f" ep {row.epoch}", style="dim")
    return text


def scores_text(row: Row):
    """The training's latest mIoU; under it, the newest `segjobs eval` score (mode@step) or its job's state."""
    from rich.text import Text

    text = Text(f"{row.miou:.4f}" if row.miou is not None else "-")
    if row.eval_state:
        text.append(f"\neval {row.eval_state}", style=STATE_STYLE.get(row.eval_state, "dim"))
    elif row.eval_miou is not None:
        text.append(f"\n{row.eval_mode}@{row.eval_step} {row.eval_miou:.4f}", style="dim")
    return text
def utilisation_text(row: Row) -> str:
    """wait 3% · GPU 87% 31.2G: the data-wait share, then GPU utilisation and memory (NVML's, else torch's peak)."""
    parts = [f"wait {row.data_wait:.0%}"] if row.data_wait is not None else []
    memory = row.gpu_mem_gb if row.gpu_mem_gb is not None else row.peak_mem_gb
    gpu = " ".join(([f"{row.gpu_util:.0f}%"] if row.gpu_util is not None else []) +
                   ([f"{memory:.1f}G"] if memory is not None else []))
    return " · ".join(parts + ([f"GPU {gpu}"] if gpu else [])) or "-"


def table(rows: list[Row], notice: str | None = None):
    from rich.table import Table
    from rich.text import Text

    grid = Table(title=f"segjobs runs ({len(rows)})", title_justify="left", header_style="bold", pad_edge=False,
                 caption=notice, caption_justify="left")
    for column, justify in [("run", "left"), ("model", "left"), ("job", "right"), ("state", "left"), ("nodes×gpus", "right"),
                            ("elapsed / limit", "right"), ("progress", "left"), ("loss", "right"), ("mIoU", "right"),
                            ("img/s", "right"), ("util", "left"), ("ETA", "right"), ("requeues", "right"),
                            ("ckpt age", "right")]:
        grid.add_column(column, justify=justify, no_wrap=column != "state", overflow="fold")  # fold: whole log paths
    names = [row.name for row in rows]
    for row in rows:
        state = Text(row.state, style=STATE_STYLE.get(row.state, ""))
        # one spec trained into two folders: the same name twice, told apart by the folder
        name = f"{row.name}\n{row.run_dir}" if names.count(row.name) > 1 else row.name
        if row.reason:
            state.append(f" ({row.reason})", style="dim")
        if row.error and row.state in ("FAILED", "TIMEOUT", "UNREADABLE", "REQUEUED"):  # REQUEUED: after a fault
            state.append(f"\n{row.error[:240]}", style="dim red")
        if row.drift:  # a requeued job runs whatever is installed when it starts again
            state.append("\n" + "; ".join(row.drift[:2]) + (f" (+{len(row.drift) - 2})" if len(row.drift) > 2 else ""),
                         style="yellow")
        progress = progress_text(row)
        grid.add_row(name, row.model, row.job_id or "-", state, f"{row.nodes}×{row.gpus_per_node}",
                     f"{duration(row.elapsed_s)} / {duration(row.limit_s)}", progress,
                     f"{row.loss:.4f}" if row.loss is not None else "-", scores_text(row),
                     f"{row.samples_per_s:.1f}" if row.samples_per_s is not None else "-",
                     utilisation_text(row), duration(row.eta_s), f"{row.requeues}" + (f" +{row.faults} faults" if row.faults else ""),
                     duration(row.checkpoint_age_s))
    return grid


def show(names: list[str], extra_dirs: list[Path], show_all: bool, watch: bool, as_json: bool, interval: float = 30.0) -> int:
    if as_json:
        rows, notice = collect(names, extra_dirs, show_all)
        print(json.dumps([{**asdict(r), "active": r.active} for r in rows], indent=1))
        if notice:
            print(f"segjobs: {notice}", file=sys.stderr)
        return 0
    from rich.console import Console

    # Not a terminal (a pipe, a log file): wide enough for every column instead of rich's default 80.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    if not watch:
        console.print(table(*collect(names, extra_dirs, show_all)))
        return 0
    from rich.live import Live

    rows, notice = collect(names, extra_dirs, show_all)
    with Live(table(rows, notice), console=console, refresh_per_second=1) as live:
        while any(r.active for r in rows):
            time.sleep(interval)
            rows, notice = collect(names, extra_dirs, show_all)
            live.update(table(rows, notice))
    return 0


# ---- logs -------------------------------------------------------------------------------------------------
def log_files(run_dir: Path, rank: int) -> list[Path]:
    """submitit's files for the latest job of a run: <log_folder>/<job id>_<rank>_log.{out,err}."""
    record = runs.read_run(run_dir)
    job = runs.latest_job(record)
    if job is None:
        raise runs.RunError(f"{run_dir}: no submitted job (a run trained in the foreground logs to its terminal).")
    tasks = record.get("tasks", 1)
    if not 0 <= rank < tasks:
        raise runs.RunError(f"--rank {rank}: run {record.get('name')} has ranks 0..{tasks - 1}.")
    folder = Path(job["log_folder"])
    return [folder / f"{job['job_id']}_{rank}_log.{kind}" for kind in ("out", "err")]


def logs(name: str, follow: bool, rank: int) -> int:
    run_dir = runs.resolve_run(name)
    out, err = log_files(run_dir, rank)
    if not out.exists():
        print(f"segjobs: {out} does not exist yet (the job has not started)", file=sys.stderr)
        if not follow:
            return 1
    offset = 0
    while True:
        if out.exists():
            with open(out, "rb") as f:
                f.seek(offset)
                chunk = f.read()
                offset += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        if not follow:
            break
        if runs.read_run(run_dir).get("state") not in runs.ACTIVE_STATES and out.exists() and offset == out.stat().st_size:
            break
        time.sleep(1.0)
    if err.exists() and err.stat().st_size:
        print(f"--- {err} ---")
        print(err.read_text(errors="replace"), end="")
    return 0
