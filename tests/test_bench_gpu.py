"""tools/bench_gpu.py cannot rot: its smoke mode runs every case (bare step, trainer on in-memory batches,
trainer fed by the loader) of every family for two steps on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke_runs_every_case_and_prints_one_json_line_each():
    done = subprocess.run([sys.executable, "tools/bench_gpu.py", "--smoke"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cases = [json.loads(line) for line in done.stdout.splitlines()]
    seen = {(c["family"], c["case"]) for c in cases}
    for family in ("dino", "segmenter", "wnet"):
        assert {(family, "bare"), (family, "trainer"), (family, "trainer+loader")} <= seen, seen
    assert ("ncut", "bare") in seen
    assert all(c["images_per_s"] > 0 and c["device"] == "cpu" for c in cases)
    assert all(c["gflop_per_step"] > 0 for c in cases if c["case"] == "bare" and c["family"] != "ncut")
