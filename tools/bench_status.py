"""How long `segjobs status` takes over many runs, excluding the SLURM query (target: 300 runs in < 1 s).

    .venv/bin/python tools/bench_status.py --runs 300 --repeats 5

Builds N run folders like real ones (run.json of a submitted run, a metrics.jsonl of --lines records with
evaluation lines, three checkpoints) in a temporary $SEGJOBS_HOME, then times one full refresh (find the runs,
read each run.json, the tail of metrics.jsonl and the checkpoint names, build the rich table and render it)
against the floor of reading every run.json alone. Prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def make_runs(root: Path, count: int, lines: int) -> None:
    from launcher import runs

    for index in range(count):
        run_dir = root / f"run_{index:04d}"
        for step in (lines - 200, lines - 100, lines):
            (run_dir / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        with open(run_dir / "metrics.jsonl", "w") as f:
            for step in range(1, lines + 1):
                f.write(json.dumps({"step": step, "epoch": step // 500, "lr": 1e-4, "samples_per_s": 512.0, "data_wait": 0.01,
                                    "skipped": 0, "loss": 1.0 / step}) + "\n")
                if step % 500 == 0:
                    f.write(json.dumps({"step": step, "epoch": step // 500, "eval": {"miou": 0.4, "pixel_acc": 0.8}}) + "\n")
        job_id = str(1000 + index)
        runs.submitted(run_dir, {"job_id": job_id, "cluster": "slurm", "time": time.time(), "log_folder": str(run_dir / "logs"),
                                 "overrides": []},
                       name=run_dir.name, model="dino_vits8", cluster="slurm", nodes=2, gpus_per_node=8, timeout_min=1440)
        runs.started(run_dir, {"job_id": job_id, "time": time.time(), "restart_count": 0, "world_size": 16},
                     total_steps=2 * lines, global_batch=1024)


def refresh() -> int:
    from rich.console import Console

    from launcher.commands import status

    rows, _ = status.collect(show_all=True, poll=False)
    console = Console(file=io.StringIO(), width=200)
    console.print(status.table(rows))
    return len(rows)


def collect_rows() -> int:
    from launcher.commands import status

    return len(status.collect(show_all=True, poll=False)[0])


def read_records() -> int:
    from launcher import runs

    return len([runs.read_run(d) for d in runs.indexed_runs()])


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--lines", type=int, default=5000, help="metrics.jsonl records per run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SEGJOBS_HOME"] = str(Path(tmp) / "home")
        make_runs(Path(tmp) / "runs", args.runs, args.lines)
        assert refresh() == args.runs
        floor = median_time(read_records, args.repeats)
        gather = median_time(collect_rows, args.repeats)
        full = median_time(refresh, args.repeats)
    print(f"{args.runs} runs, {args.lines} metrics lines each (median of {args.repeats}):")
    print(f"  read every run.json (floor)   {1000 * floor:8.1f} ms  1.00x")
    print(f"  collect rows (files only)     {1000 * gather:8.1f} ms  {gather / floor:.2f}x")
    print(f"  segjobs status refresh        {1000 * full:8.1f} ms  {full / floor:.2f}x   (target < 1000 ms)")


if __name__ == "__main__":
    main()
