import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from launcher.cli import main as segjobs
from shards.manifest import load as load_manifest


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def all_members(split_dir: Path) -> dict[str, bytes]:
    members = {}
    for entry in load_manifest(split_dir).shards:
        members.update(tar_members(split_dir / entry.name))
    return members


def test_round_trip_keeps_original_bytes(synth_root, shard_root):
    members = all_members(shard_root / "training")
    images = sorted((synth_root / "images" / "training").glob("*.jpg"))
    assert len(members) == 3 * len(images)
    for image in images:
        assert members[f"{image.stem}.jpg"] == image.read_bytes()
        assert members[f"{image.stem}.seg.png"] == (synth_root / "annotations" / "training" / f"{image.stem}.png").read_bytes()
        meta = json.loads(members[f"{image.stem}.json"])
        assert meta == {"dataset": "ade20k", "split": "training", "source": f"images/training/{image.name}", "width": 80, "height": 64}


def test_manifest_and_names_follow_the_contract(shard_root):
    manifest = json.loads((shard_root / "training" / "manifest.json").read_text())
    assert manifest["format"] == "segjobs-shards/1" and manifest["num_classes"] == 150
    assert [s["name"] for s in manifest["shards"]][:2] == ["ade20k-training-000000.tar", "ade20k-training-000001.tar"]
    assert [s["num_samples"] for s in manifest["shards"]] == [7, 7, 7, 7, 7, 5]
    assert manifest["num_samples"] == 40 and manifest["rejected"] == []
    with tarfile.open(shard_root / "training" / "ade20k-training-000000.tar") as tar:
        info = tar.getmembers()[0]
    assert (info.mtime, info.uid, info.gid, info.uname) == (0, 0, 0, "")


def test_webdataset_reads_the_shards(shard_root):
    urls = sorted(str(p) for p in (shard_root / "validation").glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"ADE_val_{i:08d}" for i in range(1, 10)]
    assert set(samples[0]) >= {"jpg", "seg.png", "json"}
    label = np.asarray(Image.open(io.BytesIO(samples[0]["seg.png"])))
    assert label.dtype == np.uint8 and label.max() <= 150


def test_output_is_byte_identical_for_any_worker_count(synth_root, shard_root, tmp_path):
    out = tmp_path / "two_workers"
    assert segjobs(["shard", "ade20k", str(synth_root), str(out), "--samples-per-shard", "7", "--workers", "2"]) == 0
    for split in ("training", "validation"):
        assert (out / split / "manifest.json").read_bytes() == (shard_root / split / "manifest.json").read_bytes()
        for tar in (shard_root / split).glob("*.tar"):
            assert (out / split / tar.name).read_bytes() == tar.read_bytes()


def save_png(path: Path, array: np.ndarray, mode: str) -> None:
    Image.fromarray(array, mode=mode).save(path)


def test_every_rejection_reason_is_recorded_and_the_run_succeeds(synth_copy, tmp_path, capsys):
    images, labels = synth_copy / "images" / "training", synth_copy / "annotations" / "training"
    truncated = images / "ADE_train_00000001.jpg"
    truncated.write_bytes(truncated.read_bytes()[:400])
    save_png(labels / "ADE_train_00000002.png", np.zeros((64, 80, 3), np.uint8), "RGB")
    save_png(labels / "ADE_train_00000003.png", np.full((64, 80), 200, np.uint8), "L")
    save_png(labels / "ADE_train_00000004.png", np.ones((32, 80), np.uint8), "L")
    (labels / "ADE_train_00000005.png").unlink()
    out = tmp_path / "out"
    assert segjobs(["shard", "ade20k", str(synth_copy), str(out), "--splits", "training"]) == 0
    manifest = load_manifest(out / "training")
    reasons = {r.source: r.reason for r in manifest.rejected}
    assert "image does not decode" in reasons["images/training/ADE_train_00000001.jpg"]
    assert "not a single-channel 8-bit PNG" in reasons["images/training/ADE_train_00000002.jpg"]
    assert "label value 200 > 150" in reasons["images/training/ADE_train_00000003.jpg"]
    assert "80x64 but label is 80x32" in reasons["images/training/ADE_train_00000004.jpg"]
    assert "no label" in reasons["images/training/ADE_train_00000005.jpg"]
    assert manifest.num_samples == 35
    assert "5 rejected" in capsys.readouterr().out
    assert segjobs(["shard", "ade20k", str(synth_copy), str(tmp_path / "strict"), "--splits", "training", "--strict"]) == 1


def test_palette_labels_are_accepted(synth_copy, tmp_path):
    label_path = synth_copy / "annotations" / "training" / "ADE_train_00000001.png"
    values = np.asarray(Image.open(label_path))
    palette = Image.fromarray(values, mode="P")
    palette.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
    palette.save(label_path)
    out = tmp_path / "out"
    assert segjobs(["shard", "ade20k", str(synth_copy), str(out), "--splits", "training"]) == 0
    assert load_manifest(out / "training").rejected == []


def test_missing_or_wrong_source_exits_2_with_one_sentence(tmp_path, capsys):
    assert segjobs(["shard", "ade20k", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "Traceback" not in err
    (tmp_path / "photos").mkdir()
    assert segjobs(["shard", "ade20k", str(tmp_path / "photos"), str(tmp_path / "out")]) == 2
    assert "not an ADE20K layout" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_rerun_reuses_complete_shards_and_rewrites_damaged_ones(synth_root, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["shard", "ade20k", str(synth_root), str(out), "--splits", "training", "--samples-per-shard", "7"]
    assert segjobs(args) == 0
    first = out / "training" / "ade20k-training-000000.tar"
    second = out / "training" / "ade20k-training-000001.tar"
    original = second.read_bytes()
    mtime = first.stat().st_mtime_ns
    (out / "training" / "manifest.json").unlink()  # as if interrupted before the end
    second.write_bytes(original[:1000])  # a damaged file under a final name
    (out / "training" / ".ade20k-training-000002.tar.tmp").write_bytes(b"partial")
    capsys.readouterr()
    assert segjobs(args) == 0
    assert "5 reused" in capsys.readouterr().out
    assert first.stat().st_mtime_ns == mtime and second.read_bytes() == original
    assert segjobs(["shard", "verify", str(out / "training")]) == 0


def test_verify_names_the_shard_with_a_flipped_byte(shard_copy, capsys):
    victim = shard_copy / "training" / "ade20k-training-000003.tar"
    data = bytearray(victim.read_bytes())
    data[5000] ^= 0x01
    victim.write_bytes(bytes(data))
    assert segjobs(["shard", "verify", str(shard_copy)]) == 1
    err = capsys.readouterr().err
    assert "ade20k-training-000003.tar" in err and "sha256" in err
    assert segjobs(["shard", "verify", str(shard_copy / "validation")]) == 0


def test_verify_reports_a_missing_shard(shard_copy, capsys):
    (shard_copy / "validation" / "ade20k-validation-000001.tar").unlink()
    assert segjobs(["shard", "verify", str(shard_copy / "validation")]) == 1
    assert "ade20k-validation-000001.tar: missing" in capsys.readouterr().err


def test_image_folder_shards_have_no_labels_and_dotless_keys(tmp_path):
    frames = tmp_path / "frames" / "clip.a"
    frames.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), 30 * i, np.uint8)).save(frames / f"frame.{i:04d}.jpg")
    out = tmp_path / "out"
    assert segjobs(["shard", "images", str(tmp_path / "frames"), str(out), "--split", "training", "--dataset", "frames"]) == 0
    manifest = load_manifest(out / "training")
    assert manifest.num_classes == 0 and manifest.shards[0].name == "frames-training-000000.tar"
    names = sorted(tar_members(out / "training" / manifest.shards[0].name))
    assert names[:2] == ["clip_a/frame_0000.jpg", "clip_a/frame_0000.json"] and len(names) == 6


def test_data_commands_do_not_import_torch(tmp_path):
    script = (
        "import sys\n"
        "from launcher.cli import main\n"
        f"main(['synth', 'ade20k', r'{tmp_path / 'src'}', '--train', '3', '--val', '1', '--size', '32x32'])\n"
        f"main(['shard', 'ade20k', r'{tmp_path / 'src'}', r'{tmp_path / 'out'}'])\n"
        f"main(['shard', 'verify', r'{tmp_path / 'out'}'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    help_run = subprocess.run([sys.executable, "-m", "launcher.cli", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "shard" in help_run.stdout


def test_keys_split_exactly_as_webdataset_splits_them():
    from webdataset.tariterators import base_plus_ext

    from shards.reader import split_name

    for name in ["ADE_train_00000001.seg.png", "a/b.c/frame_1.jpg", "x.json", "noext", "dir/.hidden", "k.tar.gz"]:
        assert split_name(name) == base_plus_ext(name)
