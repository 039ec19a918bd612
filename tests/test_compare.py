"""`segjobs compare` over planted sweep and run folders (no SLURM, no training): the axes, the fold over seeds,
--json, --plot, and damaged records."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from PIL import Image

from launcher.cli import main as segjobs

LR = ["0.01", "0.001"]
SEEDS = ["0", "1"]


def plant_run(root: Path, name: str, overrides: list[str], losses: list[float], scores: list[dict],
              state: str = "COMPLETED", spec: dict | None = None) -> Path:
    """A run folder as a finished local job leaves it: run.json, metrics.jsonl (a loss per step, an evaluation
    after every 2 steps)."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    record = {"name": name, "model": "wnet_tiny", "state": state, "total_steps": len(losses), "cluster": "local",
              "spec": spec or {"name": name, "seed": 0}}
    (run_dir / "run.json").write_text(json.dumps(record))
    lines = []
    for step, loss in enumerate(losses, start=1):
        lines.append({"step": step, "epoch": 0, "loss": loss, "lr": 0.001, "samples_per_s": 10.0})
        if step % 2 == 0 and scores:
            lines.append({"step": step, "epoch": 0, "eval": scores.pop(0)})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


@pytest.fixture
def sweep(tmp_path) -> Path:
    """runs/w-sweep over optim.lr x seed, as `segjobs submit --sweep optim.lr=0.01,0.001 --sweep seed=0,1` records it."""
    root = tmp_path / "runs"
    points = []
    for index, (lr, seed) in enumerate((lr, seed) for lr in LR for seed in SEEDS):
        name = f"w-{index}"
        base = float(lr) * 100 + int(seed)  # known numbers: loss and scores per point and seed
        plant_run(root, name, [f"optim.lr={lr}", f"seed={seed}"], [base + 3, base + 2, base + 1, base + 0.5],
                  [{"miou": 0.1 * (index + 1), "psnr": 20.0 + index}, {"miou": 0.05 * (index + 1), "psnr": 21.0 + index}])
        points.append({"name": name, "run_dir": str(root / name), "overrides": [f"optim.lr={lr}", f"seed={seed}"],
                       "job_id": str(100 + index)})
    (root / "w-sweep").mkdir()
    (root / "w-sweep" / "sweep.json").write_text(json.dumps(
        {"spec": "jobs/demo_wnet.yaml", "axes": {"optim.lr": LR, "seed": SEEDS}, "points": points}))
    return root / "w-sweep"


def compare_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert segjobs(["compare", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_sweep_over_seeds_folds_to_mean_and_std_per_point(sweep, capsys):
    report = compare_json(capsys, sweep)
    assert report["axes"] == ["optim.lr", "seed"]
    by_name = {r["name"]: r for r in report["runs"]}
    assert by_name["w-2"]["axes"] == {"optim.lr": "0.001", "seed": "0"}
    assert by_name["w-2"]["loss"] == pytest.approx(0.1 + 0.5) and by_name["w-2"]["state"] == "COMPLETED"
    assert (by_name["w-2"]["best"], by_name["w-2"]["best_step"]) == (pytest.approx(0.3), 2)
    assert (by_name["w-2"]["latest"], by_name["w-2"]["latest_step"]) == (pytest.approx(0.15), 4)
    points = {p["axes"]["optim.lr"]: p for p in report["points"]}
    assert set(points) == set(LR) and points["0.01"]["seeds"] == SEEDS
    low = points["0.001"]
    assert low["best"]["mean"] == pytest.approx(statistics.fmean([0.3, 0.4]))
    assert low["best"]["std"] == pytest.approx(statistics.stdev([0.3, 0.4])) and low["best"]["n"] == 2
    assert low["loss"]["mean"] == pytest.approx(1.1) and low["loss"]["std"] == pytest.approx(statistics.stdev([0.6, 1.6]))
    assert low["states"] == {"COMPLETED": 2}


def test_the_table_shows_one_row_per_point_with_plus_minus(sweep, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "150")
    assert segjobs(["compare", str(sweep), "--metric", "psnr"]) == 0
    out = capsys.readouterr().out
    assert "best psnr" in out and "optim.lr" in out and "seeds 0, 1" in out
    assert "21.5000 ± 0.7071" in out  # best psnr of lr 0.01: 21 and 22
    assert "2× COMPLETED" in out


def test_an_unknown_metric_lists_those_present(sweep, capsys):
    assert segjobs(["compare", str(sweep), "--metric", "mIoU"]) == 2
    err = capsys.readouterr().err
    assert "--metric 'mIoU'" in err and "they report miou, psnr" in err


def test_runs_named_directly_show_the_spec_keys_that_differ(tmp_path, capsys):
    spec = {"name": "a", "seed": 0, "optim": {"lr": 0.1, "kind": "adamw"}, "output_dir": "/x/a"}
    plant_run(tmp_path, "a", [], [1.0, 0.5], [{"miou": 0.2}], spec=spec)
    plant_run(tmp_path, "b", [], [2.0, 0.7], [{"miou": 0.3}],
              spec={**spec, "name": "b", "output_dir": "/x/b", "seed": 1, "optim": {"lr": 0.2, "kind": "adamw"}})
    report = compare_json(capsys, tmp_path / "a", tmp_path / "b")
    assert report["axes"] == ["optim.lr", "seed"]
    assert report["points"] is None  # no two runs differ only in their seed: nothing folds
    assert [r["axes"]["optim.lr"] for r in report["runs"]] == ["0.1", "0.2"]
    assert [r["latest"] for r in report["runs"]] == [pytest.approx(0.2), pytest.approx(0.3)]


def test_plot_writes_a_png_with_both_panels(sweep, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert segjobs(["compare", str(sweep), "--plot", str(out)]) == 0
    assert Image.open(out).size == (1100, 400)
    assert segjobs(["compare", str(sweep), "--plot", str(tmp_path / "curves.pdf")]) == 2


def test_damaged_lines_are_skipped_with_a_note_and_a_damaged_sweep_is_refused(sweep, capsys):
    metrics = sweep.parent / "w-0" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": "x"}\n[1, 2]\n' + "{" * 100000 + "\n")
    report = compare_json(capsys, sweep)
    assert any(f"{metrics}: skipped 3 line(s)" in note for note in report["notes"])
    assert report["runs"][0]["best"] == pytest.approx(0.1)

    (sweep / "sweep.json").write_text(json.dumps({"axes": {"seed": "0,1"}, "points": []}))
    assert segjobs(["compare", str(sweep)]) == 2
    assert f"{sweep / 'sweep.json'}: not a sweep record segjobs writes" in capsys.readouterr().err
    (sweep / "sweep.json").write_bytes(b"\xff" * 100)
    assert segjobs(["compare", str(sweep)]) == 2


def test_a_sweep_folder_moved_with_its_runs_is_still_read(sweep, tmp_path, capsys):
    moved = tmp_path / "elsewhere"
    sweep.parent.rename(moved)
    report = compare_json(capsys, moved / "w-sweep")
    assert [r["state"] for r in report["runs"]] == ["COMPLETED"] * 4
