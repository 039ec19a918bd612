import numpy as np
import pytest
from PIL import Image

from shards.transforms import (
    DinoMultiCrop,
    SegmenterTrain,
    WholeImage,
    WNetCrop,
    photometric_distortion,
    random_resized_crop_box,
    rescale_size,
)


def scene(width=683, height=512):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    label = np.zeros((height, width), np.uint8)
    label[:, : width // 2] = 3
    label[:, width // 2 :] = 7
    return image, label


def test_mmseg_rescale_rule():
    assert rescale_size(683, 512, (2048, 512)) == (683, 512)  # short side 512
    assert rescale_size(2400, 400, (2048, 512)) == (2048, 341)  # long side capped at 2048
    assert rescale_size(683, 512, (1024, 256)) == (342, 256)


def test_segmenter_train_crops_512_and_pads_labels_with_255():
    image, label = scene()
    out = SegmenterTrain()(image, label, np.random.default_rng(1))
    assert out["image"].shape == (3, 512, 512) and out["image"].dtype == np.uint8
    assert out["label"].shape == (512, 512) and set(np.unique(out["label"])) <= {3, 7, 255}
    small_image, small_label = scene(200, 150)
    padded = SegmenterTrain(ratio_range=(0.5, 0.5))(small_image, small_label, np.random.default_rng(2))
    height, width = padded["valid"]  # the crop's extent: the device zeroes the rest after normalising
    assert height < 512 and width < 512 and (padded["label"][height:] == 255).all() and (padded["label"][:, width:] == 255).all()
    assert (padded["label"][:height, :width] != 255).all()


def test_cat_max_ratio_prefers_crops_with_two_classes():
    image, label = scene()
    pipeline = SegmenterTrain(ratio_range=(2.0, 2.0), photometric=False)
    mixed = [len(set(np.unique(pipeline(image, label, np.random.default_rng(s))["label"])) - {255}) > 1 for s in range(20)]
    assert sum(mixed) >= 18


def test_same_generator_state_gives_the_same_sample():
    image, label = scene()
    a = SegmenterTrain()(image, label, np.random.default_rng(7))
    b = SegmenterTrain()(image, label, np.random.default_rng(7))
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])


def test_photometric_distortion_keeps_the_image_in_range_and_changes_it():
    image = np.asarray(scene()[0])
    changed = [not np.array_equal(photometric_distortion(image, np.random.default_rng(s)), image) for s in range(10)]
    assert sum(changed) >= 8


def test_segmenter_eval_keeps_the_original_resolution():
    image, label = scene(1000, 400)
    out = WholeImage()(image, label, np.random.default_rng(0))
    assert out["image"].shape == (3, 400, 1000) and out["label"].shape == (400, 1000)


def test_dino_multicrop_sizes():
    image, _ = scene()
    out = DinoMultiCrop(local_crops=6)(image, None, np.random.default_rng(0))
    assert [c.shape for c in out["crops"]] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6


@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)])
def test_random_resized_crop_covers_the_requested_area(scale):
    rng = np.random.default_rng(0)
    for _ in range(100):
        left, top, w, h = random_resized_crop_box(683, 512, scale, rng)
        assert 0 <= left and left + w <= 683 and 0 <= top and top + h <= 512
        assert scale[0] * 0.9 <= w * h / (683 * 512) <= scale[1] * 1.1


def test_wnet_crop_is_square_and_carries_the_label():
    image, label = scene()
    out = WNetCrop(size=224)(image, label, np.random.default_rng(0))
    assert out["image"].shape == (3, 224, 224) and out["label"].shape == (224, 224)
