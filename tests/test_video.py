"""Videos end to end on the synthetic clip: `segjobs synth video`, `segjobs shard video` (frames read back by the
loader, deterministic, hostile files rejected with reasons) and `segjobs visualize --video` (MP4 and GIF)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from launcher.cli import main as segjobs
from shards import video as video_source
from shards.loader import MAX_PIXELS, build_loader
from shards.manifest import load as load_manifest
from tests.jobspecs import write_spec

FRAMES, FPS, HEIGHT, WIDTH = 48, 12, 128, 160  # the clip: 4 s at 12 fps


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "walk.v2 (take 1).mp4"
    assert segjobs(["synth", "video", str(path), "--frames", str(FRAMES), "--size", f"{HEIGHT}x{WIDTH}", "--fps", str(FPS)]) == 0
    return path


@pytest.fixture(scope="module")
def clip_shards(clip, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("video_shards")
    assert segjobs(["shard", "video", str(clip), str(out), "--fps", "4", "--short-side", "64", "--samples-per-shard", "5"]) == 0
    return out


def decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def members(split_dir: Path) -> dict[str, bytes]:
    found = {}
    for entry in load_manifest(split_dir).shards:
        with tarfile.open(split_dir / entry.name) as tar:
            found.update({m.name: tar.extractfile(m).read() for m in tar})
    return found


def test_the_synthetic_clip_moves_and_depends_only_on_the_seed(clip, tmp_path):
    frames = decoded(clip)
    assert len(frames) == FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)
    assert all(np.abs(a.astype(int) - b).mean() > 1 for a, b in zip(frames, frames[1:])), "every frame moves"
    again, other = tmp_path / "again.mp4", tmp_path / "other.mp4"
    assert segjobs(["synth", "video", str(again), "--frames", str(FRAMES), "--size", f"{HEIGHT}x{WIDTH}", "--fps", str(FPS)]) == 0
    assert segjobs(["synth", "video", str(other), "--frames", str(FRAMES), "--size", f"{HEIGHT}x{WIDTH}", "--fps", str(FPS),
                    "--seed", "1"]) == 0
    assert again.read_bytes() == clip.read_bytes() and other.read_bytes() != clip.read_bytes()
    assert segjobs(["synth", "video", str(again)]) == 2, "an existing file is not overwritten without --force"


def test_frames_are_sampled_by_time_scaled_down_and_read_back_by_the_loader(clip, clip_shards):
    split = clip_shards / "training"
    manifest = load_manifest(split)
    assert manifest.num_samples == 16 and manifest.num_classes == 0 and manifest.rejected == []  # 4 s at 4 fps
    assert [s.num_samples for s in manifest.shards] == [5, 5, 5, 1]

    def raw(image, label, rng):
        return {"image": np.asarray(image.convert("RGB"))}

    loader = build_loader(split, raw, batch_size=4, train=False)
    keys, shapes = [], set()
    for batch in loader:
        keys += batch["key"]
        shapes.add(tuple(batch["image"].shape[1:]))
    loader.close()
    assert keys == [f"walk_v2__take_1__f{i:06d}" for i in range(16)]  # no dot, no space, no bracket
    assert shapes == {(64, 80, 3)}  # the shorter side scaled from 128 to 64

    found = members(split)
    meta = json.loads(found["walk_v2__take_1__f000005.json"])
    assert meta == {"dataset": "video", "split": "training", "source": clip.name, "frame": 5, "time": 1.25,
                    "width": 80, "height": 64}


def test_shards_are_byte_identical_when_made_again_and_reused_in_place(clip, clip_shards, tmp_path, capsys):
    again = tmp_path / "again"
    assert segjobs(["shard", "video", str(clip), str(again), "--fps", "4", "--short-side", "64", "--samples-per-shard", "5"]) == 0
    for path in (clip_shards / "training").glob("*.tar"):
        assert (again / "training" / path.name).read_bytes() == path.read_bytes()
    assert (again / "training" / "manifest.json").read_bytes() == (clip_shards / "training" / "manifest.json").read_bytes()
    capsys.readouterr()
    assert segjobs(["shard", "video", str(clip), str(again), "--fps", "4", "--short-side", "64", "--samples-per-shard", "5"]) == 0
    assert "4 reused" in capsys.readouterr().out
    assert sorted(p.name for p in (again / "training").iterdir()) == [
        ".shard-state.json", "manifest.json", *(f"video-training-00000{i}.tar" for i in range(4))]  # no frames left


def test_every_frame_by_default_and_never_upscaled(clip, tmp_path):
    assert segjobs(["shard", "video", str(clip), str(tmp_path), "--split", "frames"]) == 0
    found = members(tmp_path / "frames")
    assert len(found) == 2 * FRAMES
    with Image.open(io.BytesIO(found["walk_v2__take_1__f000047.jpg"])) as image:
        assert image.size == (WIDTH, HEIGHT)
    assert json.loads(found["walk_v2__take_1__f000047.json"])["time"] == pytest.approx(47 / FPS, abs=1e-6)


def hostile_videos(clip: Path, folder: Path) -> dict[str, str]:
    """File name -> the reason its rejection must give."""
    folder.mkdir()
    (folder / "notes.mp4").write_text("not a video, only a text file named .mp4\n" * 20)
    (folder / "truncated.mp4").write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    with av.open(str(folder / "empty.avi"), "w", format="avi") as container:  # a video stream without frames
        stream = container.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    (folder / "walk_v2 _take_1_.mp4").write_bytes(clip.read_bytes())  # the same keys as the clip's
    damaged = bytearray(clip.read_bytes())
    damaged[len(damaged) // 2 : len(damaged) // 2 + 3000] = bytes(3000)
    (folder / "damaged.mp4").write_bytes(bytes(damaged))
    faststart = folder / "faststart.mp4"  # the index first: a cut file still opens, its last frames are missing
    with av.open(str(clip)) as source, av.open(str(faststart), "w", format="mp4", options={"movflags": "faststart"}) as copy:
        stream = copy.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(video=0):
            if packet.dts is not None:
                packet.stream = stream
                copy.mux(packet)
    faststart.write_bytes(faststart.read_bytes()[: faststart.stat().st_size * 2 // 3])
    return {"notes.mp4": "FFmpeg cannot open it as a video (Invalid data found",
            "truncated.mp4": "FFmpeg cannot open it as a video",
            "damaged.mp4": "does not decode",
            "faststart.mp4": f"of the {FRAMES} frames its container announces decode",
            "empty.avi": "no frame decodes",
            "walk_v2 _take_1_.mp4": f"would be those of {clip.name}"}


def test_hostile_videos_are_rejected_with_a_reason_and_nothing_written_for_them(clip, tmp_path, capsys, monkeypatch):
    reasons = hostile_videos(clip, tmp_path / "bad")
    out = tmp_path / "out"
    assert segjobs(["shard", "video", str(clip), *(str(tmp_path / "bad" / n) for n in reasons), str(out), "--fps", "2"]) == 0
    manifest = load_manifest(out / "training")
    assert manifest.num_samples == 8
    assert {r.source: r.reason for r in manifest.rejected}.keys() == reasons.keys()
    for rejection in manifest.rejected:
        assert reasons[rejection.source] in rejection.reason
    assert all(key.startswith("walk_v2__take_1__f") for key in members(out / "training"))
    assert not (out / "training" / ".video-frames").exists()

    capsys.readouterr()  # every file refused: exit 2, one paragraph naming each, no folder made
    assert segjobs(["shard", "video", *(str(tmp_path / "bad" / n) for n in ("notes.mp4", "empty.avi")), str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "notes.mp4: FFmpeg cannot open it" in err and "empty.avi: no frame decodes" in err
    assert not (tmp_path / "none").exists()

    monkeypatch.setattr(video_source, "MAX_FRAME_PIXELS", HEIGHT * WIDTH - 1)  # a frame over the bound
    assert segjobs(["shard", "video", str(clip), str(tmp_path / "huge")]) == 2
    assert f"frames are {WIDTH} x {HEIGHT} pixels, over the" in capsys.readouterr().err
    assert segjobs(["shard", "video", str(tmp_path / "missing.mp4"), str(tmp_path / "x")]) == 2
    assert "no such video file" in capsys.readouterr().err
    assert segjobs(["shard", "video", str(clip), str(clip)]) == 2  # the output forgotten: the clip is no folder
    assert "is a file, not an output folder" in capsys.readouterr().err


def test_the_frame_bound_is_the_loaders():
    assert video_source.MAX_FRAME_PIXELS == MAX_PIXELS


@pytest.fixture(scope="module")
def video_runs(clip_shards, shard_root, tmp_path_factory) -> dict[str, Path]:
    """W-Net and DINO trained one step on the clip's frames alone (no validation split); Segmenter, which needs
    labels, one step on the synthetic ADE20K."""
    root = tmp_path_factory.mktemp("video_runs")
    runs = {}
    for family in ("wnet", "dino", "segmenter"):
        data = {"batch_size": 2} if family == "segmenter" else {"batch_size": 2, "val": None}
        spec = write_spec(root, shard_root if family == "segmenter" else clip_shards, family, name=f"video_{family}",
                          train={"max_steps": 1}, data=data)
        assert segjobs(["train", str(spec)]) == 0
        runs[family] = root / f"video_{family}"
    return runs


@pytest.mark.parametrize("family, size, grid", [
    ("wnet", (3 * WIDTH + 4 * 4, HEIGHT + 2 * 4), []),  # image | segments | reconstruction at the frame's size
    ("dino", (3 * 288 + 4 * 4, 224 + 2 * 4), []),  # image | mean attention | mask, shorter side 224, sides multiples of 16
    ("segmenter", (2 * WIDTH + 3 * 4, HEIGHT + 2 * 4), ["segmenter.png"]),  # image | prediction; it has data.val
])
def test_visualize_writes_an_mp4_and_a_gif_of_every_kept_frame(family, size, grid, video_runs, clip, tmp_path, capsys):
    out = tmp_path / "pictures"
    assert segjobs(["visualize", str(video_runs[family]), "--samples", "1", "--video", str(clip), "--fps", "1",
                    "--out", str(out)]) == 0
    mp4, gif = out / f"walk_v2__take_1__{family}.mp4", out / f"walk_v2__take_1__{family}.gif"
    assert capsys.readouterr().out.split() == [*(str(out / name) for name in grid), str(mp4), str(gif)]
    frames = decoded(mp4)
    assert len(frames) == 4 and frames[0].shape == (size[1], size[0], 3)  # 4 s at 1 fps
    with av.open(str(mp4)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 1 and stream.codec_context.name in ("h264", "mpeg4")
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.n_frames == 4 and image.size == size
        assert image.info["duration"] == pytest.approx(1000, abs=10)
    shown = frames[len(frames) // 2][4 : 4 + HEIGHT, 4 : 4 + WIDTH].astype(int)
    if family != "dino":  # the first tile is the frame itself (DINO's is scaled to 224)
        with av.open(str(clip)) as container:
            source = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)][24]  # 2 s in
        assert np.abs(shown - source).mean() < 12


def test_visualize_refuses_a_bad_video_before_loading_a_model(tmp_path, capsys):
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video\n")
    assert segjobs(["visualize", str(tmp_path / "no_such_run"), "--video", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"--video {bad}: FFmpeg cannot open it as a video" in err and "Traceback" not in err
