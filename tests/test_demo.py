"""What a user sees: `segjobs eval` numbers against a hand-computed case, every picture, and `segjobs demo`
(the path of `make demo`) at tiny sizes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models
from launcher import checkpoint as layout
from launcher.cli import main as segjobs
from tests.jobspecs import write_spec


@pytest.fixture(scope="module")
def trained(shard_root, tmp_path_factory) -> dict[str, Path]:
    """One short run per family (2 steps), shared by the eval and picture tests."""
    root = tmp_path_factory.mktemp("trained")
    runs = {}
    for family in ("segmenter", "wnet", "dino"):
        spec = write_spec(root, shard_root, family, name=f"tiny_{family}", train={"max_steps": 2})
        assert segjobs(["train", str(spec)]) == 0
        runs[family] = root / f"tiny_{family}"
    return runs


def expected_constant_prediction(synth_root: Path, k: int) -> tuple[float, float]:
    """(mIoU, pixel accuracy) of predicting class k everywhere, counted from the label PNGs with numpy."""
    labels = np.concatenate([np.asarray(Image.open(p)).ravel() for p in
                             sorted((synth_root / "annotations" / "validation").glob("*.png"))]).astype(np.int64)
    labels = labels[labels > 0] - 1  # reduce_zero_label: 0 is ignored, k+1 is class k
    present = np.unique(labels)
    accuracy = float((labels == k).mean())
    ious = [accuracy if c == k else 0.0 for c in present]  # class k: intersection = its pixels, union = every pixel
    return float(np.mean(ious)), accuracy


def test_eval_of_a_constant_prediction_matches_the_hand_computed_numbers(trained, synth_root, tmp_path, capsys):
    run_dir = trained["segmenter"]
    checkpoint = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    copied = tmp_path / "elsewhere" / checkpoint.name  # a checkpoint from another machine: the folder alone
    copied.parent.mkdir()
    import shutil

    shutil.copytree(checkpoint, copied)
    shared = torch.load(copied / "shared.pt", weights_only=True)
    labels = np.concatenate([np.asarray(Image.open(p)).ravel() for p in (synth_root / "annotations" / "validation").glob("*.png")])
    k = int(np.bincount(labels[labels > 0]).argmax()) - 1  # the most frequent class
    shared["model"]["decoder.head.weight"].zero_()
    shared["model"]["decoder.head.bias"].copy_(torch.nn.functional.one_hot(torch.tensor(k), 150).float())
    torch.save(shared, copied / "shared.pt")
    meta = json.loads((copied / "meta.json").read_text())  # edited on purpose: record the new file
    meta["files"]["shared.pt"] = layout.file_record(copied / "shared.pt")
    (copied / "meta.json").write_text(json.dumps(meta))

    assert segjobs(["eval", str(copied), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    miou, accuracy = expected_constant_prediction(synth_root, k)
    assert report["miou"] == pytest.approx(miou, abs=1e-9) and report["pixel_acc"] == pytest.approx(accuracy, abs=1e-9)
    assert report["samples"] == 9 and report["step"] == 2
    assert json.loads((tmp_path / "elsewhere" / "eval" / "step_00000002.json").read_text())["miou"] == report["miou"]

    assert segjobs(["eval", str(copied), "--mode", "ms-flip"]) == 0
    shown = capsys.readouterr().out
    assert "mIoU" in shown
    from shards.ade20k import CLASSES

    assert CLASSES[k] in shown, "the best class is named"


def test_eval_of_an_unsupervised_run_and_refused_modes(trained, capsys):
    assert segjobs(["eval", str(trained["wnet"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unsupervised"] and 0 <= report["miou"] <= 1 and report["family"] == "wnet"
    assert segjobs(["eval", str(trained["dino"]), "--mode", "slide"]) == 2
    assert "whole mode only" in capsys.readouterr().err


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_every_picture_is_written_with_the_expected_size(trained, synth_root, tmp_path, capsys):
    # Validation images are 64x80 (H x W); grids have 4 px gaps.
    assert segjobs(["visualize", str(trained["segmenter"]), "--samples", "3"]) == 0
    assert png_size(trained["segmenter"] / "pictures" / "segmenter.png") == (3 * 80 + 4 * 4, 3 * 64 + 4 * 4)
    assert segjobs(["visualize", str(trained["wnet"]), "--samples", "2"]) == 0
    assert png_size(trained["wnet"] / "pictures" / "wnet.png") == (3 * 80 + 4 * 4, 2 * 64 + 3 * 4)

    frames = synth_root / "images" / "validation"
    assert segjobs(["visualize", str(trained["dino"]), "--samples", "1", "--frames", str(frames)]) == 0
    heads = models.create("dino_vits16").config.backbone.num_heads
    # 224 x 288 (the shorter side at 224, both sides multiples of 16): image + one tile per head, two rows.
    assert png_size(trained["dino"] / "pictures" / "dino_attention.png") == ((heads + 1) * 288 + (heads + 2) * 4, 2 * 224 + 3 * 4)
    with Image.open(trained["dino"] / "pictures" / "attention.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 9 and gif.size == (3 * 288 + 4 * 4, 224 + 2 * 4)

    backbone = tmp_path / "dino_deitsmall16_pretrain.pth"  # the official file: backbone weights only
    torch.save(models.create("dino_vits16").backbone.state_dict(), backbone)
    assert segjobs(["visualize", str(backbone), "--model", "dino_vits16", "--frames", str(frames), "--out", str(tmp_path / "p")]) == 0
    with Image.open(tmp_path / "p" / "attention.gif") as gif:
        assert gif.n_frames == 9

    capsys.readouterr()
    assert segjobs(["visualize", *(str(trained[f]) for f in ("segmenter", "wnet", "dino")), "--curves"]) == 0
    curves = Path(capsys.readouterr().out.strip())
    assert curves == trained["segmenter"] / "pictures" / "curves.png" and png_size(curves) == (1100, 400)


def test_eval_reuses_stored_scores_only_when_they_are_newer_than_the_checkpoint_and_read_as_scores(trained):
    """What `segjobs demo` does after training: the scores the trainer's final evaluation wrote, not a second
    evaluation; a file older than the checkpoint or not made of scores is evaluated again."""
    import time as clock

    from launcher.commands.eval import evaluate, stored_scores

    run_dir = trained["wnet"]
    fresh = evaluate(str(run_dir))
    stored, checkpoint = Path(fresh["path"]), Path(fresh["checkpoint"])
    planted = {key: value for key, value in fresh.items() if key not in ("path", "checkpoint")} | {"miou": 0.123456}
    stored.write_text(json.dumps(planted))
    reused = evaluate(str(run_dir), reuse=True)
    assert reused["miou"] == 0.123456
    assert reused["seconds"] is None and fresh["seconds"] > 0, "a reused score does not claim an evaluation's time"
    for hostile in ({**planted, "miou": "0.9"}, {**planted, "psnr": [[]]}, {**planted, "iou": "all"},
                    {**planted, "postprocess": 3}, ["miou", 0.5], "{", "[" * 100_000):
        stored.write_text(hostile if isinstance(hostile, str) else json.dumps(hostile))
        assert stored_scores(stored, checkpoint) is None, hostile
    stored.write_text(json.dumps(planted))
    later = clock.time() + 60
    os.utime(checkpoint / "meta.json", (later, later))  # the checkpoint is newer than the scores: another one's
    assert stored_scores(stored, checkpoint) is None
    again = evaluate(str(run_dir), reuse=True)
    assert again["miou"] == fresh["miou"] and again["seconds"] > 0


def test_demo_runs_the_three_models_end_to_end_and_reuses_a_finished_run(tmp_path, capsys, monkeypatch):
    """`make demo` at tiny sizes: synth, shard, three jobs through the local executor, eval, pictures."""
    monkeypatch.chdir(tmp_path)
    arguments = ["demo", "--root", str(tmp_path / "data"), "--train", "16", "--val", "4", "--size", "64x80",
                 "--cluster", "local", "--set", "train.max_steps=2", "--set", "data.num_workers=0"]
    assert segjobs(arguments) == 0
    out = capsys.readouterr().out
    assert "segjobs demo finished" in out
    for name, pictures in [("demo_segmenter", ["segmenter.png", "curves.png"]),
                           ("demo_wnet", ["wnet.png", "clip_wnet.mp4", "clip_wnet.gif"]),
                           ("demo_dino", ["dino_attention.png", "attention.gif", "clip_dino.mp4", "clip_dino.gif"])]:
        run_dir = tmp_path / "runs" / name
        assert json.loads((run_dir / "run.json").read_text())["state"] == "COMPLETED"
        assert (run_dir / "eval" / "step_00000002.json").is_file()
        for picture in pictures:
            assert (run_dir / "pictures" / picture).stat().st_size > 0, (name, picture)
    assert "mIoU" in out and "unsupervised mIoU" in out
    assert "reconstruction PSNR" in out and "attention Jaccard" in out and "(untrained " in out
    clip_frames = json.loads((tmp_path / "data" / "shards-clip" / "training" / "manifest.json").read_text())
    assert clip_frames["num_samples"] == 48 and clip_frames["num_classes"] == 0, "every frame of the clip, image-only"
    with Image.open(tmp_path / "runs" / "demo_dino" / "pictures" / "clip_dino.gif") as gif:
        assert gif.n_frames == 48

    assert segjobs(arguments) == 0
    again = capsys.readouterr().out
    assert again.count("completed, not submitted again") == 3


@pytest.mark.skipif(os.environ.get("SEGJOBS_DEMO_FIGURES") != "1",
                    reason="the full demo takes about 12 minutes on 2 cores: `make demo-test` runs it")
def test_the_full_demo_reaches_its_figures(tmp_path, monkeypatch):
    """`make demo` as a user runs it (default sizes and specs): W-Net reconstructs at >= 20 dB with segments that
    follow the shapes, and DINO's attention overlaps the shapes by >= 0.1 more than the untrained network's."""
    monkeypatch.chdir(tmp_path)
    assert segjobs(["demo", "--root", str(tmp_path / "data"), "--cluster", "local"]) == 0

    def report(name: str) -> dict:
        (latest,) = sorted((tmp_path / "runs" / name / "eval").glob("step_*.json"))[-1:]
        return json.loads(latest.read_text())

    segmenter, wnet, dino = report("demo_segmenter"), report("demo_wnet"), report("demo_dino")
    assert segmenter["miou"] >= 0.8, segmenter["miou"]
    assert wnet["psnr"] >= 20.0 and wnet["miou"] >= 0.5, (wnet["psnr"], wnet["miou"])
    gain = dino["jaccard_mean_heads"] - dino["untrained_jaccard_mean_heads"]
    assert gain >= 0.1, (dino["jaccard_mean_heads"], dino["untrained_jaccard_mean_heads"])
