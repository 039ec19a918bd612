"""`segjobs predict` and `segjobs export` on runs trained two steps, one per family: what is written per image,
what is refused, and the export's round trip through models.create."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import models
from launcher.cli import main as segjobs
from launcher.training.restore import restore
from models.pretrained import EXPORT_FORMAT, PretrainedError
from shards.ade20k import COLOURS
from tests.jobspecs import write_spec

FAMILIES = ("segmenter", "wnet", "dino")


@pytest.fixture(scope="module")
def trained(shard_root, tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("predict-trained")
    for family in FAMILIES:
        assert segjobs(["train", str(write_spec(root, shard_root, family, name=f"p_{family}", train={"max_steps": 2}))]) == 0
    return {family: root / f"p_{family}" for family in FAMILIES}


@pytest.fixture
def images(synth_root, tmp_path) -> list[Path]:
    """Two validation images (64 x 80) and a third of another size."""
    folder = tmp_path / "images"
    folder.mkdir()
    sources = sorted((synth_root / "images" / "validation").glob("*.jpg"))[:2]
    paths = []
    for source in sources:
        paths.append(folder / source.name)
        paths[-1].write_bytes(source.read_bytes())
    Image.open(sources[0]).resize((50, 37)).save(folder / "small.png")
    return [*paths, folder / "small.png"]


def predict(run: Path, images: list[Path], out: Path, *extra: str) -> int:
    return segjobs(["predict", str(run), *map(str, images), "--out", str(out), "--batch-size", "2", "--device", "cpu", *extra])


def test_segmenter_writes_ade20k_coloured_classes_and_dataset_labels(trained, images, tmp_path):
    out = tmp_path / "out"
    assert predict(trained["segmenter"], images, out) == 0
    for path in images:
        classes, labels = Image.open(out / f"{path.stem}_classes.png"), Image.open(out / f"{path.stem}_labels.png")
        assert classes.mode == "P" and labels.mode == "L" and classes.size == labels.size == Image.open(path).size
        values = np.asarray(labels)
        assert np.array_equal(np.asarray(classes), values)
        assert 1 <= values.min() and values.max() <= 150  # ADE20K's labels: class k is label k + 1, 0 never predicted
        colours = np.asarray(classes.convert("RGB"))
        label = int(values[0, 0])
        assert tuple(colours[0, 0]) == COLOURS[label - 1]
    record = json.loads((out / "predictions.json").read_text())
    assert len(record["files"]) == 2 * len(images)


def test_segmenter_labels_are_the_classes_the_model_predicts_plus_the_offset(trained, images, tmp_path):
    assert predict(trained["segmenter"], images[:1], tmp_path / "out") == 0
    _, task, accelerator, _ = restore(str(trained["segmenter"]), device="cpu")
    image = np.asarray(Image.open(images[0]).convert("RGB"))
    expected = task.predictions([image], accelerator.device, label_offset=0)[0]["labels.png"]
    written = np.asarray(Image.open(tmp_path / "out" / f"{images[0].stem}_labels.png"))
    assert np.array_equal(written, np.asarray(expected) + 1)


def test_wnet_writes_segment_indices_and_dino_its_attention(trained, images, tmp_path):
    assert predict(trained["wnet"], images, tmp_path / "wnet") == 0
    for path in images:
        segments = Image.open(tmp_path / "wnet" / f"{path.stem}_segments.png")
        assert segments.mode == "P" and segments.size == Image.open(path).size
        assert np.asarray(segments).max() < 4  # K = 4 in the tiny spec
    assert predict(trained["dino"], images, tmp_path / "dino") == 0
    for path in images:
        attention = Image.open(tmp_path / "dino" / f"{path.stem}_attention.png")
        assert attention.size[0] > 2 * attention.size[1]  # image | attention | mask side by side
        assert (tmp_path / "dino" / f"{path.stem}_heads.png").is_file()


def test_a_missing_or_broken_image_is_refused_before_anything_is_written(trained, images, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    assert predict(trained["wnet"], [images[0], broken], tmp_path / "out") == 2
    assert f"{broken}: not an image" in capsys.readouterr().err
    assert predict(trained["wnet"], [images[0], tmp_path / "absent.png"], tmp_path / "out") == 2
    assert f"{tmp_path / 'absent.png'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    if not torch.cuda.is_available():
        assert predict(trained["wnet"], images, tmp_path / "out", "--device", "cuda") == 2
        assert "--device cuda: torch sees no CUDA device here" in capsys.readouterr().err


def test_files_segjobs_did_not_write_are_never_replaced(trained, images, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    mine = out / f"{images[0].stem}_segments.png"
    mine.write_bytes(b"a person's file")
    assert predict(trained["wnet"], images, out) == 2
    assert "1 file(s) in the way" in capsys.readouterr().err and mine.read_bytes() == b"a person's file"
    mine.unlink()
    assert predict(trained["wnet"], images, out) == 0
    assert predict(trained["wnet"], images, out) == 0  # its own files, unchanged: replaced
    mine.write_bytes(b"edited since")
    assert predict(trained["wnet"], images, out) == 2
    assert predict(trained["wnet"], images, out, "--force") == 0
    assert Image.open(mine).mode == "P"


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_back_into_the_same_network(family, trained, tmp_path):
    out = tmp_path / f"{family}.safetensors"
    assert segjobs(["export", str(trained[family]), "--out", str(out)]) == 0
    spec, task, _, _ = restore(str(trained[family]), device="cpu")
    original = task.picture_network().eval()
    loaded = models.create(spec.model.name, pretrained=str(out)).eval()  # the options come from the file
    images = torch.rand(2, 3, 32, 48) if family != "wnet" else torch.rand(2, 3, 32, 40)
    with torch.no_grad():
        if family == "dino":
            assert torch.equal(loaded.attention_maps(images), original.attention_maps(images))
            assert torch.equal(loaded(images), original(images))
        elif family == "wnet":
            assert all(torch.equal(a, b) for a, b in zip(loaded(images), original(images)))
        else:
            assert torch.equal(loaded(images), original(images))


def exported_file(path: Path, tensors: dict, config: dict) -> Path:
    save_file(tensors, str(path), metadata={"segjobs": json.dumps(config)})
    return path


def test_hostile_exports_are_refused_without_allocating(trained, tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    assert segjobs(["export", str(trained["wnet"]), "--out", str(good)]) == 0
    name = "wnet_tiny"
    config = json.loads(safe_open(str(good), "pt").metadata()["segjobs"])
    tensors = load_file(str(good))

    wrong_shape = dict(tensors)
    key = next(k for k, v in wrong_shape.items() if v.ndim >= 2)
    wrong_shape[key] = torch.zeros(*wrong_shape[key].shape[:-1], wrong_shape[key].shape[-1] + 1)
    with pytest.raises(PretrainedError, match=f"{key} is"):
        models.create(name, pretrained=str(exported_file(tmp_path / "shape.safetensors", wrong_shape, config)))

    with pytest.raises(PretrainedError, match="exported from 'evil_net', not 'wnet_tiny'"):
        models.create(name, pretrained=str(exported_file(tmp_path / "model.safetensors", tensors, {**config, "model": "evil_net"})))

    huge = {**config, "options": {**config["options"], "levels": 60}}
    with pytest.raises(PretrainedError, match="more than the file holds"):
        models.create(name, pretrained=str(exported_file(tmp_path / "huge.safetensors", tensors, huge)))

    with pytest.raises(PretrainedError, match="not a config segjobs writes"):
        models.create(name, pretrained=str(exported_file(tmp_path / "format.safetensors", tensors, {**config, "format": "x"})))

    # A header claiming a tensor of 2^40 floats in a file of a few bytes.
    header = json.dumps({"__metadata__": {"segjobs": json.dumps(config)},
                         "w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 1 << 42]}}).encode()
    claim = tmp_path / "claim.safetensors"
    claim.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(PretrainedError, match="not a readable safetensors file"):
        models.create(name, pretrained=str(claim))
    frames = tmp_path / "frames"
    frames.mkdir()
    assert segjobs(["visualize", str(claim), "--model", "dino_vits16", "--frames", str(frames)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_export_never_replaces_a_file_it_did_not_write(trained, tmp_path, capsys):
    out = tmp_path / "weights.safetensors"
    out.write_bytes(b"someone's weights")
    assert segjobs(["export", str(trained["wnet"]), "--out", str(out)]) == 2
    assert "is not a segjobs export" in capsys.readouterr().err and out.read_bytes() == b"someone's weights"
    assert segjobs(["export", str(trained["wnet"]), "--out", str(out), "--force"]) == 0
    assert segjobs(["export", str(trained["wnet"]), "--out", str(out)]) == 0  # its own export: replaced
    assert json.loads(safe_open(str(out), "pt").metadata()["segjobs"])["format"] == EXPORT_FORMAT
