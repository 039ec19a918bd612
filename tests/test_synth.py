import hashlib

import numpy as np
from PIL import Image

from launcher.cli import main as segjobs
from shards.ade20k import CLASSES, read_class_names


def tree_digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_labels_and_object_info(synth_root):
    images = sorted((synth_root / "images" / "training").glob("*.jpg"))
    assert [p.name for p in images[:2]] == ["ADE_train_00000001.jpg", "ADE_train_00000002.jpg"]
    assert len(images) == 40 and len(list((synth_root / "images" / "validation").glob("ADE_val_*.jpg"))) == 9
    label = Image.open(synth_root / "annotations" / "training" / "ADE_train_00000001.png")
    assert label.mode == "L" and label.size == Image.open(images[0]).size == (80, 64)
    values = np.concatenate([np.asarray(Image.open(p)).ravel() for p in (synth_root / "annotations" / "training").glob("*.png")])
    assert values.max() <= 150 and 150 in values and 0 in values  # the whole label range, "other" included
    assert read_class_names(synth_root / "objectInfo150.txt") == list(CLASSES)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(synth_root, tmp_path):
    again = tmp_path / "again"
    assert segjobs(["synth", "ade20k", str(again), "--train", "40", "--val", "9", "--size", "64x80", "--seed", "3"]) == 0
    assert tree_digest(again) == tree_digest(synth_root)
    other = tmp_path / "other"
    assert segjobs(["synth", "ade20k", str(other), "--train", "40", "--val", "9", "--size", "64x80", "--seed", "4"]) == 0
    assert tree_digest(other) != tree_digest(synth_root)


def test_class_decides_appearance(synth_root):
    """Pixels of one class look alike across images: the data is learnable, not noise."""
    means: dict[int, list[np.ndarray]] = {}
    for path in sorted((synth_root / "images" / "training").glob("*.jpg"))[:10]:
        image = np.asarray(Image.open(path), dtype=np.float32)
        label = np.asarray(Image.open(synth_root / "annotations" / "training" / f"{path.stem}.png"))
        for value in np.unique(label):
            if value and (label == value).sum() > 200:
                means.setdefault(int(value), []).append(image[label == value].mean(0))
    spread = [np.std(m, axis=0).max() for m in means.values() if len(m) > 1]
    assert spread and max(spread) < 12  # same class, same colour (up to texture and JPEG)


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert segjobs(["synth", "ade20k", str(tmp_path / "x"), "--classes", "0"]) == 2
    assert "--classes" in capsys.readouterr().err
