"""`segjobs compare`: the runs of a sweep (or any runs) side by side, one row per run or per point of a sweep.

    segjobs compare runs/demo_wnet-sweep                       # the folder `segjobs submit --sweep` wrote
    segjobs compare demo_segmenter-0 demo_segmenter-3 --metric macc --json
    segjobs compare runs/demo_wnet-sweep --plot sweep.png     # loss and metric curves of every run, overlaid

Columns: the swept axes (sweep.json's axes; for runs named one by one, the spec keys whose values differ
between them), then state (as `segjobs status` derives it, SLURM asked once for every run), steps, the last
training loss, and the best and latest validation score of --metric (default miou). When `seed` is an axis,
the runs that differ only in their seed fold into one row per point: mean +- std over the seeds (the sample
standard deviation, n - 1; a single value has none).

Validation scores come from metrics.jsonl's evaluation lines (`{"step", "epoch", "eval": {...}}`, written by the
trainer) and from eval/step_NNNNNNNN.json (`segjobs eval` on the validation split in the family's default mode,
the trainer's own protocol); every score there is higher-is-better. The names differ per family: Segmenter
reports miou, macc, pixel_acc; W-Net and DINO report the same names for their clusters matched to classes
one-to-one (Hungarian), plus many_to_one_*, W-Net psnr and post_*, DINO jaccard_*. A --metric that no run
reports is refused, listing those they do.

Untrusted input: sweep.json is read bounded and checked with a schema (a bad one is exit 2 naming it); a
metrics.jsonl line that is not a record segjobs writes is skipped with a note naming the file and line.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from launcher import runs
from launcher.bounded_yaml import excerpt
from launcher.commands import status
from launcher.files import read_bounded
from launcher.spec import SpecError, read_spec_file

MAX_SWEEP_BYTES = 16 << 20  # a point is ~300 bytes: tens of thousands of points
MAX_METRICS_BYTES = 1 << 30  # as metrics_log.MAX_METRICS_BYTES
MAX_REPORT_BYTES = 16 << 20
REPORT_NAME = re.compile(r"step_\d{8}\.json")  # the validation split in the default mode (commands.eval)
SEED = "seed"
UNCOMPARED = {"name", "output_dir"}  # differ between any two runs: not axes


class SweepPoint(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    run_dir: str
    overrides: list[str]
    job_id: str = ""


class SweepRecord(BaseModel):
    """<name>-sweep/sweep.json as launcher.cluster.submit.write_sweep writes it."""
    model_config = ConfigDict(extra="ignore")
    spec: str = ""
    axes: dict[str, list[str]]
    points: list[SweepPoint]


@dataclass
class Curves:
    """What a run's metrics.jsonl and eval/ say: (step, loss) and step -> {metric: score}."""
    losses: list[tuple[int, float]] = field(default_factory=list)
    scores: dict[int, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def series(self, metric: str) -> list[tuple[int, float]]:
        return [(step, values[metric]) for step, values in sorted(self.scores.items()) if metric in values]


@dataclass
class Result:
    name: str
    run_dir: str
    axes: dict[str, str]
    state: str
    step: int
    total_steps: int | None
    loss: float | None
    best: float | None = None
    best_step: int | None = None
    latest: float | None = None
    latest_step: int | None = None


# ---- reading ----------------------------------------------------------------------------------------------
def number(value: object) -> float | None:
    """A finite number from JSON; None for anything else (null for a NaN, a string, a boolean)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_curves(run_dir: Path, last_line_may_be_cut: bool = False) -> Curves:
    """A run's training losses and validation scores. A line that is not a record segjobs writes is skipped
    and noted; the last line of a run still training may be half written and is skipped silently."""
    curves = Curves()
    path = run_dir / "metrics.jsonl"
    try:
        lines = read_bounded(path, MAX_METRICS_BYTES).decode(errors="replace").splitlines()
    except FileNotFoundError:
        lines = []
    except ValueError as exc:
        curves.notes.append(f"{path}: not read ({exc}).")
        lines = []
    bad = []
    for index, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            record = None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            if line.strip() and not (last_line_may_be_cut and index == len(lines)):
                bad.append(index)
            continue
        if "eval" in record:
            scores = record["eval"] if isinstance(record["eval"], dict) else {}
            kept = {k: v for k, v in ((k, number(v)) for k, v in scores.items()) if v is not None}
            if kept:
                curves.scores.setdefault(step, {}).update(kept)
        elif number(record.get("loss")) is not None:
            curves.losses.append((step, float(record["loss"])))
        elif record.get("loss") is not None:  # null: the step diverged (metrics_log.strict), nothing to draw
            bad.append(index)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        curves.notes.append(f"{path}: skipped {len(bad)} line(s) that are not segjobs records (line {shown}).")
    for report in sorted((run_dir / "eval").glob("step_*.json")) if (run_dir / "eval").is_dir() else []:
        if REPORT_NAME.fullmatch(report.name):
            read_report(report, curves)
    return curves


def read_report(path: Path, curves: Curves) -> None:
    """eval/step_NNNNNNNN.json: its scores at its step, where metrics.jsonl holds none for that step."""
    try:
        report = json.loads(read_bounded(path, MAX_REPORT_BYTES))
    except (OSError, ValueError, RecursionError) as exc:
        curves.notes.append(f"{path}: skipped ({str(exc)[:100]}).")
        return
    step = int(path.stem.removeprefix("step_"))
    if not isinstance(report, dict):
        curves.notes.append(f"{path}: skipped (not a JSON object).")
        return
    scores = {k: v for k, v in ((k, number(v)) for k, v in report.items() if k != "step") if v is not None}
    curves.scores.setdefault(step, {})
    for key, value in scores.items():
        curves.scores[step].setdefault(key, value)


def read_sweep(folder: Path) -> SweepRecord:
    path = folder / "sweep.json" if folder.is_dir() else folder
    try:
        return SweepRecord.model_validate_json(read_bounded(path, MAX_SWEEP_BYTES))
    except (OSError, ValueError) as exc:  # ValidationError is a ValueError
        detail = str(exc).splitlines()
        reason = "; ".join(detail[:3]) if isinstance(exc, ValidationError) else detail[0] if detail else type(exc).__name__
        raise SpecError(f"{path}: not a sweep record segjobs writes ({reason[:300]}).") from None


def sweep_runs(source: Path, sweep: SweepRecord) -> list[tuple[Path, dict[str, str]]]:
    """(run folder, axis -> value) per point. A sweep folder moved with its runs is found beside them."""
    folder = source if source.is_dir() else source.parent
    found = []
    for point in sweep.points:
        recorded = Path(point.run_dir)
        run_dir = recorded if recorded.is_dir() else folder.parent / recorded.name
        values = dict(o.partition("=")[::2] for o in point.overrides)
        found.append((run_dir, {axis: values.get(axis, "?") for axis in sweep.axes}))
    return found


def flat(tree: object, prefix: str = "") -> dict[str, str]:
    """A spec as dotted keys -> YAML-ish text (`optim.lr` -> "0.001")."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, (list, dict)) else str(tree)}


def spec_of(run_dir: Path) -> dict:
    """The resolved spec of a run: run.json's (its latest submission), else its spec.yaml; {} if neither."""
    try:
        recorded = runs.read_run(run_dir).get("spec")
    except runs.UnreadableRunError:
        recorded = None
    if isinstance(recorded, dict):
        return recorded
    if (run_dir / "spec.yaml").is_file():
        raw = read_spec_file(run_dir / "spec.yaml")
        return raw if isinstance(raw, dict) else {}
    return {}


def differing_keys(run_dirs: list[Path]) -> list[tuple[Path, dict[str, str]]]:
    """Runs named one by one: their axes are the spec keys whose values differ between them."""
    specs = [flat(spec_of(d)) for d in run_dirs]
    keys = sorted({k for s in specs for k in s} - UNCOMPARED)
    axes = [k for k in keys if len({s.get(k, "-") for s in specs}) > 1]
    return [(d, {k: s.get(k, "-") for k in axes}) for d, s in zip(run_dirs, specs)]


def gather(targets: list[str]) -> list[tuple[Path, dict[str, str]]]:
    """Every run to compare with its axis values: sweeps as recorded, named runs by their differences."""
    swept, named = [], []
    for target in targets:
        path = Path(target)
        if (path / "sweep.json").is_file() or (path.name == "sweep.json" and path.is_file()):
            swept += sweep_runs(path, read_sweep(path))
        elif path.name.endswith("-sweep") and path.is_dir():
            raise SpecError(f"{path}: no sweep.json (the sweep was not recorded, or is still being submitted).")
        else:
            named.append(runs.resolve_run(target))
    if named:
        swept += differing_keys(named) if len(named) > 1 else [(named[0], {})]
    axes = list(dict.fromkeys(k for _, values in swept for k in values))
    return [(d, {k: values.get(k, "-") for k in axes}) for d, values in swept]


# ---- the table --------------------------------------------------------------------------------------------
def results(targets: list[str], metric: str) -> tuple[list[Result], dict[str, Curves], list[str]]:
    """(a result per run, curves per run folder, notes) with SLURM asked once for every run."""
    chosen = gather(targets)
    rows, notice = status.rows_for([d for d, _ in chosen], poll=True)
    notes = [notice] if notice else []
    found, curves = [], {}
    for (run_dir, axes), row in zip(chosen, rows):
        if not run_dir.is_dir():
            found.append(Result(run_dir.name, str(run_dir), axes, "MISSING", 0, None, None))
            continue
        read = curves[str(run_dir)] = read_curves(run_dir, last_line_may_be_cut=row.active)
        notes += read.notes
        result = Result(row.name, str(run_dir), axes, row.state, row.step, row.total_steps, row.loss)
        series = read.series(metric)
        if series:
            result.latest_step, result.latest = series[-1]
            result.best_step, result.best = max(series, key=lambda item: (item[1], -item[0]))  # earliest of equals
        found.append(result)
    present = sorted({k for c in curves.values() for values in c.scores.values() for k in values})
    if present and metric not in present:
        raise SpecError(f"--metric {excerpt(metric)}: no run reports it; they report {', '.join(present)}.")
    if not present:
        notes.append(f"no run has a validation score yet (--metric {metric} shows when one has).")
    return found, curves, notes


def spread(values: list[float | None]) -> dict | None:
    """{"mean", "std", "n"} over the values present; std is None for fewer than two."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"mean": statistics.fmean(present), "std": statistics.stdev(present) if len(present) > 1 else None,
            "n": len(present)}


def fold_seeds(found: list[Result]) -> list[dict]:
    """One entry per point of the axes other than seed: its runs' seeds, states and mean +- std of each number."""
    points: dict[tuple, list[Result]] = {}
    for result in found:
        points.setdefault(tuple((k, v) for k, v in result.axes.items() if k != SEED), []).append(result)
    folded = []
    for key, members in points.items():
        folded.append({"axes": dict(key), "seeds": [m.axes.get(SEED) for m in members], "runs": [m.name for m in members],
                       "states": dict(Counter(m.state for m in members)), "steps": [min(m.step for m in members), max(m.step for m in members)],
                       "total_steps": max((m.total_steps or 0 for m in members), default=0) or None,
                       "loss": spread([m.loss for m in members]), "best": spread([m.best for m in members]),
                       "latest": spread([m.latest for m in members])})
    return folded


def plain(value: float | None, step: int | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" @{step}" if step is not None else "")


def plus_minus(stats: dict | None, members: int) -> str:
    """mean ± std, and how many runs have the number when not all of the point's `members` have it."""
    if stats is None:
        return "-"
    text = f"{stats['mean']:.4f}" + (f" ± {stats['std']:.4f}" if stats["std"] is not None else "")
    return text + (f" (n={stats['n']})" if stats["n"] < members else "")


def table(found: list[Result], metric: str, folded: list[dict] | None, notes: list[str]):
    from rich.table import Table
    from rich.text import Text

    axes = [k for k in (found[0].axes if found else {}) if folded is None or k != SEED]
    title = f"segjobs compare: {len(found)} runs" + (f", {len(folded)} points over seeds" if folded is not None else "")
    grid = Table(title=title, title_justify="left", header_style="bold", pad_edge=False,
                 caption="\n".join(notes) or None, caption_justify="left")
    for column in ["runs" if folded is not None else "run", *axes, "state", "steps", "last loss",
                   f"best {metric}", f"latest {metric}"]:
        grid.add_column(column, justify="left" if column in ("run", "runs", "state") else "right", overflow="fold")
    if folded is None:
        for r in found:
            grid.add_row(r.name, *(r.axes[k] for k in axes), Text(r.state, style=status.STATE_STYLE.get(r.state, "")),
                         f"{r.step}/{r.total_steps or '?'}", plain(r.loss), plain(r.best, r.best_step),
                         plain(r.latest, r.latest_step))
        return grid
    for point in folded:
        states = ", ".join(f"{n}× {state}" for state, n in point["states"].items())
        seeds, count = f"seeds {', '.join(str(s) for s in point['seeds'])}", len(point["runs"])
        low, high = point["steps"]
        steps = f"{low}/{point['total_steps'] or '?'}" if low == high else f"{low}..{high}/{point['total_steps'] or '?'}"
        grid.add_row(seeds, *(point["axes"][k] for k in axes), states, steps, plus_minus(point["loss"], count),
                     plus_minus(point["best"], count), plus_minus(point["latest"], count))
    return grid


# ---- curves -----------------------------------------------------------------------------------------------
def plot(curves: list[tuple[str, Curves]], metric: str, out: Path, metric_title: str | None = None) -> Path:
    """Training loss (left, log scale) and validation `metric` (right) against the step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for label, run in curves:
        if run.losses:
            loss_axis.plot(*zip(*run.losses), label=label)
        if series := run.series(metric):
            metric_axis.plot(*zip(*series), marker="o", label=label)
    loss_axis.set(title="training loss", xlabel="step", yscale="log" if any(c.losses for _, c in curves) else "linear")
    metric_axis.set(title=metric_title or f"validation {metric}", xlabel="step")
    for axis in (loss_axis, metric_axis):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
    return out


# ---- the command ------------------------------------------------------------------------------------------
def main(targets: list[str], metric: str = "miou", as_json: bool = False, plot_path: Path | None = None) -> int:
    found, curves, notes = results(targets, metric)
    folded = fold_seeds(found) if any(SEED in r.axes for r in found) else None
    if folded is not None and all(len(point["runs"]) == 1 for point in folded):
        folded = None  # no two runs differ only in their seed: nothing to fold
    if plot_path is not None:
        if plot_path.suffix.lower() != ".png":
            raise SpecError(f"--plot {plot_path}: expected a .png file name.")
        labelled = [(" ".join([r.name, *(f"{k}={v}" for k, v in r.axes.items())]), curves[r.run_dir])
                    for r in found if r.run_dir in curves]
        notes.append(f"curves: {plot(labelled, metric, plot_path)}")
    if as_json:
        print(json.dumps({"metric": metric, "axes": list(found[0].axes) if found else [],
                          "runs": [asdict(r) for r in found], "points": folded, "notes": notes}, indent=1))
        return 0
    from rich.console import Console

    # Not a terminal: COLUMNS when set (COLUMNS=120 segjobs compare ... > table.txt), else wide enough.
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit() else 200
    Console(width=width).print(table(found, metric, folded, notes))
    return 0
