"""Wall time of the commands a person types on a login node, as whole processes (medians of --repeats).

    .venv/bin/python tools/bench_startup.py --runs 300 --repeats 5

`segjobs status --all` over N runs (made as tools/bench_status.py makes them, SLURM not asked: no job ids
there are known to it) and `segjobs submit jobs/dino_vits8.yaml --dry-run` (which checks the model name
and options against the registry, and so imports torch), against the floors measured in the same run: an
empty Python and `import torch`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_status import make_runs

REPO = Path(__file__).resolve().parents[1]
SEGJOBS = [sys.executable, "-m", "launcher.cli"]


def median_wall(command: list[str], repeats: int, env: dict) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SEGJOBS_HOME": str(Path(tmp) / "home"), "PATH": os.environ.get("PATH", "")}
        os.environ["SEGJOBS_HOME"] = env["SEGJOBS_HOME"]
        make_runs(Path(tmp) / "runs", args.runs, lines=2000)
        data = Path(tmp) / "ade"
        subprocess.run([*SEGJOBS, "synth", "ade20k", str(data), "--train", "4", "--val", "1", "--size", "64x64"],
                       cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*SEGJOBS, "shard", "ade20k", str(data), str(Path(tmp) / "shards")], cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shards = Path(tmp) / "shards"
        submit = [*SEGJOBS, "submit", "jobs/dino_vits8.yaml", "--dry-run", "--set", f"data.train={shards / 'training'}",
                  "--set", f"data.val={shards / 'validation'}", "--set", f"output_dir={Path(tmp) / 'runs' / 'dino'}"]
        figures = [("python -c pass", median_wall([sys.executable, "-c", "pass"], args.repeats, env)),
                   ("python -c 'import torch'", median_wall([sys.executable, "-c", "import torch"], args.repeats, env)),
                   (f"segjobs status --all ({args.runs} runs)", median_wall([*SEGJOBS, "status", "--all"], args.repeats, env)),
                   ("segjobs submit --dry-run", median_wall(submit, args.repeats, env))]
    torch_floor = figures[1][1]
    print(f"whole processes, median of {args.repeats}:")
    for name, seconds in figures:
        print(f"  {name:<36} {1000 * seconds:8.0f} ms  {seconds / torch_floor:5.2f}x import torch")


if __name__ == "__main__":
    main()
