"""`segjobs show RUN`: one run as a person reads it: state, history, what each start ran, goodput, the spec.

    segjobs show dino_vits8            # rich text
    segjobs show runs/dino_vits8 --json

History: every submission, start, requeue and fault of run.json, oldest first. Provenance: the code and
software of the latest start, then every change from one start to the next ("torch 2.11 -> 2.14 at start 3":
a requeued job runs whatever is installed when it starts again). Goodput: see launcher.commands.goodput
(one sacct call for every job of the run). Utilisation: the last log step of metrics.jsonl, and the mean of
its log steps. A run.json that is damaged or holds fields of the wrong type or size: exit 2, naming it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

from launcher import runs
from launcher.bounded_yaml import parse_yaml
from launcher.cluster import queue
from launcher.commands import status
from launcher.commands.goodput import goodput
from launcher.files import read_bounded
from launcher.history import Code, code_text, drift, parsed
from launcher.training.metrics_log import read_metrics

MAX_SPEC_BYTES = 1 << 20
UTILISATION = ("samples_per_s", "data_wait", "gpu_util", "gpu_mem_gb", "peak_mem_gb", "rss_peak_gb")


def hosts_text(hosts: list[str], shown: int = 8) -> str:
    """n1 ×4, n2 ×4: each host with its number of ranks, in rank order."""
    counts = Counter(hosts)
    parts = [f"{host} ×{n}" if n > 1 else host for host, n in counts.items()]
    return ", ".join(parts[:shown]) + (f", ... ({len(parts)} hosts)" if len(parts) > shown else "")


def history(record: dict) -> list[dict]:
    """Every event of run.json as {time, event, job_id, detail}, oldest first."""
    events = []
    for submission in record.get("submissions", []):
        overrides = " ".join(submission["overrides"])
        events.append({"time": submission.get("time"), "event": "submitted", "job_id": submission["job_id"],
                       "detail": f"{submission['cluster']}" + (f"; --set {overrides}" if overrides else "")})
    for number, start in enumerate(parsed(record, "starts"), 1):
        detail = f"restart {start.restart_count}, {start.world_size} rank{'s' * (start.world_size != 1)}"
        if start.hosts or start.host:
            detail += f" on {hosts_text(start.hosts or [start.host])}"
        if start.from_step is not None:
            detail += f", from step {start.from_step}" + (f" (redoes {start.redo_steps})" if start.redo_steps else "")
        events.append({"time": start.time, "event": f"start {number}", "job_id": start.job_id, "detail": detail})
    for requeue in parsed(record, "requeues"):
        events.append({"time": requeue.time, "event": "requeued", "job_id": requeue.job_id,
                       "detail": f"{requeue.reason or 'requested'} at step {requeue.step}"})
    for fault in parsed(record, "faults"):
        then = "requeued" if fault.requeued else "the run failed"
        events.append({"time": fault.time, "event": "fault", "job_id": fault.job_id,
                       "detail": f"{fault.kind} at step {fault.step} on {fault.host or '?'}: {fault.detail} ({then})"})
    if isinstance(record.get("ended"), (int, float)):
        events.append({"time": record["ended"], "event": "ended", "job_id": None,
                       "detail": (record.get("state") or "") + (f": {record['error']}" if record.get("error") else "")})
    return sorted(events, key=lambda e: e["time"] if isinstance(e["time"], (int, float)) else 0.0)


def spec_of(run_dir: Path, record: dict) -> dict | None:
    """The resolved spec of the latest submission (run.json), else the one the trainer wrote (spec.yaml)."""
    if isinstance(record.get("spec"), dict):
        return record["spec"]
    try:
        text = read_bounded(run_dir / "spec.yaml", MAX_SPEC_BYTES).decode(errors="replace")
    except (OSError, ValueError):
        return None
    spec = parse_yaml(text, str(run_dir / "spec.yaml"))
    return spec if isinstance(spec, dict) else None


def utilisation(metrics: list[dict]) -> dict:
    """The last log step's machine fields, and each field's mean over the kept log steps."""
    training = [r for r in metrics if "loss" in r]
    if not training:
        return {}
    means = {}
    for key in UTILISATION:
        values = [r[key] for r in training if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if values:
            means[key] = sum(values) / len(values)
    last = {k: training[-1][k] for k in UTILISATION if isinstance(training[-1].get(k), (int, float))}
    return {"step": training[-1].get("step"), "last": last, "mean": means}


def collect(run_dir: Path) -> dict:
    record = runs.read_run(run_dir)
    try:
        return _collect(run_dir, record)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise runs.UnreadableRunError(f"{run_dir / 'run.json'}: a field is not what segjobs writes "
                                      f"({type(exc).__name__}: {str(exc)[:200]})") from None


def _collect(run_dir: Path, record: dict) -> dict:
    jobs = [s["job_id"] for s in record.get("submissions", []) if s["cluster"] == "slurm"]
    slurm = queue.poll_slurm(jobs)
    now = time.time()
    row = status.build_row(run_dir, slurm, now)
    try:
        metrics = read_metrics(run_dir / "metrics.jsonl")
    except FileNotFoundError:
        metrics = []
    except ValueError as exc:
        raise runs.RunError(f"{run_dir / 'metrics.jsonl'}: {exc}") from None
    starts = parsed(record, "starts")
    return {"name": row.name, "run_dir": str(run_dir), "model": row.model, "state": row.state, "error": row.error,
            "step": row.step, "total_steps": row.total_steps, "nodes": record.get("nodes"),
            "gpus_per_node": record.get("gpus_per_node"), "history": history(record),
            "starts": len(starts),
            "latest_start": starts[-1].model_dump(mode="json") if starts else None, "drift": drift(record.get("starts", [])),
            "goodput": goodput(record, metrics, slurm if jobs else None, now).to_json(),
            "utilisation": utilisation(metrics), "spec": spec_of(run_dir, record),
            "accounting": slurm.accounting if jobs else None}


# ---- rendering --------------------------------------------------------------------------------------------
def when(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def section(title: str):
    from rich.text import Text

    return Text(f"\n{title}", style="bold")


def pairs(rows: list[tuple[str, str]]):
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(Text(key), Text(value))  # Text: a value is never read as rich markup
    return grid


def software_rows(start: dict) -> list[tuple[str, str]]:
    if not start.get("versions"):
        return [("recorded", "nothing (started by a segjobs that recorded no provenance)")]
    versions = start["versions"]
    rows = [("code", code_text(Code.model_validate(start["code"]) if start.get("code") else None))]
    rows += [(name, versions[name]) for name in ("python", "torch", "cuda", "nccl", "timm", "accelerate", "segjobs")
             if name in versions]
    rows += [(name, value) for name, value in versions.items() if name not in dict(rows)]
    rows.append(("gpu", start.get("gpu") or "none (CPU)"))
    rows.append(("hosts", hosts_text(start.get("hosts") or [start.get("host") or "?"])))
    return rows


def goodput_rows(result: dict) -> list[tuple[str, str]]:
    allocated = result["allocated"]

    def share(value: float | None) -> str:
        if value is None:
            return "unknown"
        return f"{value:10.4f}" + (f"  {100 * value / allocated:5.1f}%" if allocated > 0 else "")

    rows = [("allocated", f"{allocated:10.4f}  from {result['allocated_from']}"),
            ("steps kept", f"{share(result['kept'])}  {result['kept_steps']} steps"),
            ("recomputed", f"{share(result['recomputed'])}  {result['recomputed_steps']} steps done again after a stop"),
            ("other", f"{share(result['other'])}  start-up, checkpoints, evaluation, waiting to stop"),
            ("queued", f"{status.duration(result['queued_h'] * 3600):>10}  wall time between a stop and the next start")]
    return rows + [("note", note) for note in result["notes"]]


def utilisation_rows(found: dict) -> list[tuple[str, str]]:
    if not found:
        return [("recorded", "no log step yet")]
    formats = {"samples_per_s": ("img/s", "{:.1f}"), "data_wait": ("data wait", "{:.1%}"), "gpu_util": ("GPU busy", "{:.0f}%"),
               "gpu_mem_gb": ("GPU memory", "{:.2f} GiB"), "peak_mem_gb": ("torch peak", "{:.2f} GiB"),
               "rss_peak_gb": ("host peak RSS", "{:.2f} GiB")}
    return [(label, f"{fmt.format(found['last'][key])} (mean {fmt.format(found['mean'][key])})")
            for key, (label, fmt) in formats.items() if key in found["last"] and key in found["mean"]]


def flat(value: object, prefix: str = "") -> list[str]:
    """key=value words of a nested mapping, nested keys joined by dots; strings with spaces JSON-quoted."""
    if isinstance(value, dict) and value:
        return [word for key, inner in value.items() for word in flat(inner, f"{prefix}{key}.")]
    text = value if isinstance(value, str) and value and " " not in value else json.dumps(value, default=str)
    return [f"{prefix.rstrip('.')}={text}"]


def spec_rows(spec: dict) -> list[tuple[str, str]]:
    """One line per section of the spec (folded at the console's width), a person reads it faster than YAML."""
    return [(str(key), " ".join(w.partition(".")[2] for w in flat(value, f"{key}."))) if isinstance(value, dict) and value
            else (str(key), flat(value)[0].partition("=")[2]) for key, value in spec.items()]


def render(shown: dict):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    title = Text(f"{shown['name']}", style="bold")
    title.append(f"  {shown['state']}", style=status.STATE_STYLE.get(shown["state"], ""))
    title.append(f"  step {shown['step']}/{shown['total_steps'] or '?'}  {shown['model']}  {shown['run_dir']}")
    parts = [title]
    if shown["error"]:
        parts.append(Text(shown["error"][:1000], style="red"))
    events = Table(box=None, padding=(0, 1), show_header=True, header_style="dim", pad_edge=False)
    for column in ("time", "event", "job", "detail"):
        events.add_column(column, overflow="fold", no_wrap=column != "detail")
    for event in shown["history"]:
        events.add_row(when(event["time"]), Text(event["event"]), Text(event["job_id"] or "-"), Text(event["detail"][:600]))
    parts += [section("history"), events]
    start = shown["latest_start"]
    parts += [section(f"software (start {shown['starts']}, the latest)"),
              pairs(software_rows(start)) if start else Text("no start recorded")]
    parts += [section("changes between starts"),
              pairs([("", change) for change in shown["drift"]]) if shown["drift"] else Text("none")]
    result = shown["goodput"]
    held = f"{result['width']} {'GPU' if result['unit'] == 'GPU-hours' else 'node'}{'s' * (result['width'] != 1)}"
    parts += [section(f"goodput ({result['unit']}: wall hours x {held})"), pairs(goodput_rows(result))]
    parts += [section(f"utilisation (last log step {shown['utilisation'].get('step', '-')}, mean of the kept log steps)"),
              pairs(utilisation_rows(shown["utilisation"]))]
    parts += [section("spec"), pairs(spec_rows(shown["spec"])) if shown["spec"] else Text("not recorded")]
    return Group(*parts)


def main(name: str, as_json: bool) -> int:
    shown = collect(runs.resolve_run(name))
    if as_json:
        print(json.dumps(shown, indent=1))
        return 0
    from rich.console import Console

    Console().print(render(shown))
    return 0
