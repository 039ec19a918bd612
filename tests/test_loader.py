import collections
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from shards.errors import CorruptShardError, ShardsError
from shards.loader import build_loader
from shards.transforms import SegmenterTrain, WholeImage, WNetCrop

CROP = SegmenterTrain(crop_size=48, scale=(256, 64))


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_labels_are_raw_indices_with_zero_ignored(synth_root, shard_root):
    loader = build_loader(shard_root / "validation", WNetCrop(size=64, train=False), batch_size=9, train=False)
    (batch,) = list(loader)
    for key, label in zip(batch["key"], batch["label"]):
        source = np.asarray(Image.open(synth_root / "annotations" / "validation" / f"{key}.png"))
        expected = np.where(source == 0, 255, source.astype(np.int64) - 1)[:, 8:72]  # centre crop of 80 -> 64
        assert torch.equal(label.long(), torch.from_numpy(expected))
    assert 149 in batch["label"] and 255 in batch["label"]  # label 150 -> 149; "other" -> 255


def test_an_epoch_reads_each_sample_once_and_epochs_differ(shard_root):
    loader = build_loader(shard_root / "training", CROP, batch_size=4, seed=5)
    first, second = keys(loader), keys(loader)
    assert len(first) == len(set(first)) == 40 and sorted(first) == sorted(second) and first != second
    again = build_loader(shard_root / "training", CROP, batch_size=4, seed=5)
    assert keys(again) == first
    assert keys(build_loader(shard_root / "training", CROP, batch_size=4, seed=6)) != first


def test_same_batches_whatever_the_number_of_workers(shard_root):
    def run(workers):
        loader = build_loader(shard_root / "training", CROP, batch_size=4, seed=1, num_workers=workers)
        return list(loader)

    single, double = run(0), run(2)
    assert keys(single) == keys(double)
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"]) for a, b in zip(single, double))


def test_ranks_get_equal_batch_counts_on_uneven_shards(shard_root):
    """40 samples in shards of 7, 7, 7, 7, 7, 5; three ranks of 4: 3 steps, 4 samples dropped."""
    per_rank = [keys(build_loader(shard_root / "training", CROP, batch_size=4, rank=r, world_size=3)) for r in range(3)]
    assert [len(k) for k in per_rank] == [12, 12, 12]
    seen = [k for ks in per_rank for k in ks]
    assert len(set(seen)) == 36 and len(build_loader(shard_root / "training", CROP, batch_size=4, world_size=3)) == 3


def test_evaluation_covers_every_sample_once_across_ranks(shard_root):
    per_rank = [keys(build_loader(shard_root / "validation", WholeImage(), batch_size=2, rank=r,
                                  world_size=2, train=False)) for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == [f"ADE_val_{i:08d}" for i in range(1, 10)]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_at", [1, 4, 9, 13])
def test_exact_resume_mid_epoch(shard_root, workers, stop_at):
    """A loader restored after `stop_at` batches yields what an uninterrupted one yields, across epochs."""
    def fresh():
        return build_loader(shard_root / "training", CROP, batch_size=4, seed=2, num_workers=workers)

    reference = fresh()
    expected = list(reference) + list(reference)  # two epochs of 10 batches
    interrupted = fresh()
    got = list(take(interrupted, stop_at)) if stop_at <= 10 else list(interrupted) + take(interrupted, stop_at - 10)
    state = interrupted.state_dict()
    resumed = fresh()
    resumed.load_state_dict(state)
    while len(got) < len(expected):
        got.extend(resumed)
    assert keys(got) == keys(expected)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, expected))


def test_elastic_resume_2_then_1_then_3_ranks_covers_each_sample_once(shard_root):
    def loaders(world, state=None):
        out = [build_loader(shard_root / "training", CROP, batch_size=2, seed=9, rank=r, world_size=world) for r in range(world)]
        if state:
            for loader in out:
                loader.load_state_dict(state)
        return out

    seen = []
    two = loaders(2)
    for loader in two:
        seen += keys(take(loader, 3))  # 3 steps x 2 ranks x 2 = 12 samples
    one = loaders(1, two[0].state_dict())
    seen += keys(take(one[0], 5))  # 10 more
    three = loaders(3, one[0].state_dict())
    for loader in three:
        seen += keys(loader)  # the remaining 18 = 3 steps x 3 ranks x 2
    assert len(seen) == len(set(seen)) == 40
    assert all(loader.epoch == 1 and loader.position == 0 for loader in three)


def test_resume_with_other_data_is_refused(shard_root):
    loader = build_loader(shard_root / "training", CROP, batch_size=4, seed=1)
    state = loader.state_dict() | {"num_samples": 41}
    with pytest.raises(ShardsError, match="41 samples"):
        loader.load_state_dict(state)


def test_too_little_data_for_one_step_is_explained(shard_root):
    with pytest.raises(ShardsError, match="cannot fill one step"):
        build_loader(shard_root / "validation", CROP, batch_size=8, world_size=2)


def rewrite_member(tar_path, name, data):
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(tar_path, "w") as tar:
        for info, payload in members:
            payload = data if info.name == name else payload
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_undecodable_image_names_shard_and_key_or_is_skipped(shard_copy):
    split = shard_copy / "training"
    rewrite_member(split / "ade20k-training-000002.tar", "ADE_train_00000016.jpg", b"\xff\xd8 not a jpeg")
    with pytest.raises(CorruptShardError, match=r"ade20k-training-000002.tar: sample ADE_train_00000016: the image does not decode"):
        list(build_loader(split, CROP, batch_size=4, num_workers=2))
    loader = build_loader(split, CROP, batch_size=4, skip_corrupt=True)
    seen = keys(loader)
    assert len(seen) == 39 and "ADE_train_00000016" not in seen and loader.skipped == 1
    assert loader.state_dict()["skipped"] == 1


def test_truncated_tar_names_the_shard(shard_copy):
    split = shard_copy / "training"
    victim = split / "ade20k-training-000004.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[:20000])
    for skip in (False, True):  # the manifest no longer describes the shard: no sample of it can be trusted
        with pytest.raises(CorruptShardError, match=r"ade20k-training-000004.tar: 20000 bytes, but .*manifest.json records"):
            build_loader(split, CROP, batch_size=4, skip_corrupt=skip)
    # Damaged in place (the size unchanged): the samples that cannot be read are named, or skipped.
    victim.write_bytes(data[:20000] + bytes(len(data) - 20000))
    with pytest.raises(CorruptShardError, match=r"ade20k-training-000004.tar: sample #\d cannot be read"):
        list(build_loader(split, CROP, batch_size=4))
    loader = build_loader(split, CROP, batch_size=4, skip_corrupt=True)
    assert collections.Counter(len(b["key"]) for b in loader).total() == 10  # batch count unchanged
    assert loader.skipped > 0


def test_starting_a_loader_leaves_the_global_rng_alone(shard_root):
    """A resumed run creates its loader iterator at another moment than an uninterrupted one: it must not
    consume random numbers that dropout would otherwise have drawn."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = build_loader(shard_root / "training", CROP, batch_size=4, num_workers=2)
    next(iter(loader))
    loader.close()
    assert torch.equal(torch.get_rng_state(), before)
