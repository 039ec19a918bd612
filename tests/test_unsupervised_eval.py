"""Unsupervised segmentation scores as PiCIE and STEGO report them: one-to-one (Hungarian) and many-to-one
matching on hand-made confusions, and DINO's evaluation: a k-means cluster per class present, fitted on a
bounded sample of patch features, the same numbers every time and under two ranks."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.cli import main as segjobs
from launcher.commands.eval import evaluate
from launcher.training.families import dino
from launcher.training.families import wnet as wnet_family
from launcher.training.metrics import SegmentationMetric
from shards.loader import build_loader
from shards.transforms import WholeImage, WNetCrop
from tests.jobspecs import TINY, write_spec

CROP = TINY["dino"]["data"]["global_crop_size"]


def metric_of(confusion: list[list[int]], num_predicted: int | None) -> SegmentationMetric:
    """A metric fed pixel by pixel with the pairs of a [predicted, true] confusion, plus one ignored pixel."""
    counts = torch.tensor(confusion)
    pred = torch.arange(counts.shape[0]).repeat_interleave(counts.sum(1))
    target = torch.cat([torch.arange(counts.shape[1]).repeat_interleave(row) for row in counts])
    metric = SegmentationMetric(counts.shape[1], num_predicted=num_predicted)
    metric.update(torch.cat([pred, torch.tensor([0])]), torch.cat([target, torch.tensor([255])]))
    assert torch.equal(metric.confusion, counts)
    return metric


def test_supervised_scores_count_predicted_only_classes_in_miou_not_in_macc():
    # true class 0: 3 px (2 right, 1 called class 1); true class 1: 1 px, called class 2; class 2 is never labelled.
    result = metric_of([[2, 0, 0], [1, 0, 0], [0, 1, 0]], num_predicted=None).compute()
    # IoU: class 0 = 2 / (3 + 2 - 2); class 1 = 0 / (1 + 1); class 2 = 0 / (0 + 1): predicted, so counted.
    assert result["iou"] == pytest.approx([2 / 3, 0.0, 0.0])
    assert result["miou"] == pytest.approx(2 / 9)
    assert result["pixel_acc"] == pytest.approx(2 / 4)
    assert result["macc"] == pytest.approx((2 / 3 + 0 / 1) / 2)  # over the labelled classes 0 and 1 only
    assert not any(key.startswith("many_to_one") for key in result)


def test_unsupervised_scores_one_to_one_and_many_to_one():
    confusion = [[5, 1, 0],   # cluster 0
                 [4, 0, 0],   # cluster 1: only class 0, which cluster 0 wins one-to-one
                 [0, 3, 1],   # cluster 2
                 [0, 0, 2]]   # cluster 3
    result = metric_of(confusion, num_predicted=4).compute()
    # Hungarian: 0 -> 0, 2 -> 1, 3 -> 2 (5 + 3 + 2 = 10 px, the most); cluster 1's 4 px are wrong.
    # Labelled 9, 4, 3; predicted 6, 4, 2; IoU 5/10, 3/5, 2/3.
    assert result["iou"] == pytest.approx([0.5, 0.6, 2 / 3])
    assert result["miou"] == pytest.approx((0.5 + 0.6 + 2 / 3) / 3)
    assert result["pixel_acc"] == pytest.approx(10 / 16)
    assert result["macc"] == pytest.approx((5 / 9 + 3 / 4 + 2 / 3) / 3)
    # Majority vote: 0 -> 0, 1 -> 0, 2 -> 1, 3 -> 2. Class 0: intersection 9, predicted 10, IoU 9 / 10.
    assert result["many_to_one_miou"] == pytest.approx((0.9 + 0.6 + 2 / 3) / 3)
    assert result["many_to_one_pixel_acc"] == pytest.approx(14 / 16)
    assert result["many_to_one_macc"] == pytest.approx((9 / 9 + 3 / 4 + 2 / 3) / 3)
    assert all(isinstance(v, float) for k, v in result.items() if k != "iou")
    json.dumps(result)  # what the trainer and `segjobs eval` write


def test_as_many_clusters_as_classes_are_still_matched():
    """Cluster ids are arbitrary: swapped ids score perfectly once matched, even when the counts are equal."""
    metric = SegmentationMetric(2, num_predicted=2)
    metric.update(torch.tensor([1, 1, 0]), torch.tensor([0, 0, 1]))
    assert metric.compute()["miou"] == 1.0 and metric.compute()["many_to_one_miou"] == 1.0
    assert metric_of([[0, 1], [2, 0]], num_predicted=None).compute()["miou"] == 0.0  # supervised: no matching


def test_a_class_never_labelled_takes_no_cluster():
    """Three clusters, classes 0 and 2 labelled, class 1 never: the spare cluster stays unmatched (its pixels
    wrong) rather than going to class 1, which would then count in mIoU with IoU 0."""
    result = metric_of([[6, 0, 0], [0, 0, 3], [2, 0, 1]], num_predicted=3).compute()
    assert math.isnan(result["iou"][1])
    assert result["miou"] == pytest.approx((6 / 8 + 3 / 4) / 2) and result["pixel_acc"] == pytest.approx(9 / 12)


def test_reservoir_keeps_a_bounded_uniform_sample():
    stream = torch.arange(100.0)[:, None]
    kept = torch.zeros(100)
    for seed in range(300):
        reservoir = dino.Reservoir(capacity=10, dim=1, seed=seed)
        for start in range(0, 100, 7):  # batches that do not divide the stream
            reservoir.add(stream[start : start + 7])
        rows = reservoir.sample()[:, 0].long()
        assert len(rows) == 10 and len(rows.unique()) == 10
        kept[rows] += 1
    # Each row is kept with probability 10 / 100: early and late rows alike.
    assert kept[:50].mean() / 300 == pytest.approx(0.1, abs=0.01)
    assert kept[50:].mean() / 300 == pytest.approx(0.1, abs=0.01)
    short = dino.Reservoir(capacity=10, dim=1, seed=0)
    short.add(stream[:4])
    assert torch.equal(short.sample(), stream[:4])  # fewer rows than the capacity: all of them, in order


@pytest.fixture(scope="module")
def dino_run(shard_root, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unsupervised")
    spec = write_spec(root, shard_root, "dino", name="tiny_dino", train={"max_steps": 2})
    assert segjobs(["train", str(spec)]) == 0  # its final evaluation runs the code under test too
    return root / "tiny_dino"


@pytest.fixture
def kmeans_calls(monkeypatch) -> list[tuple[int, int]]:
    """(rows, clusters) of every k-means fit DINO's evaluation makes."""
    calls, fit = [], dino.kmeans

    def recording(features, k, **options):
        calls.append((len(features), k))
        return fit(features, k, **options)

    monkeypatch.setattr(dino, "kmeans", recording)
    return calls


def classes_in(split: Path) -> set[int]:
    """The classes labelled in the split's evaluation crops (what the metric scores), counted independently."""
    loader = build_loader(split, WNetCrop(size=CROP, train=False), batch_size=1, train=False)
    return {int(c) for batch in loader for c in np.unique(batch["label"].numpy()) if c != 255}


def test_dino_eval_has_a_cluster_per_class_present_and_is_deterministic(dino_run, shard_root, kmeans_calls):
    first, second = evaluate(str(dino_run)), evaluate(str(dino_run))
    classes = classes_in(shard_root / "validation")
    patches = first["samples"] * (CROP // 16) ** 2  # dino_vits16 on CROP x CROP crops
    assert kmeans_calls == [(patches, len(classes))] * 2  # every patch fits under the bound here
    assert len(classes) > 1
    for key in ("miou", "pixel_acc", "macc", "many_to_one_miou", "many_to_one_pixel_acc", "many_to_one_macc"):
        assert first[key] == second[key] and 0.0 < first[key] <= 1.0, key
    assert first["iou"] == second["iou"]
    assert first["many_to_one_pixel_acc"] >= first["pixel_acc"]


def test_dino_eval_fits_kmeans_on_a_bounded_sample(dino_run, kmeans_calls, monkeypatch):
    monkeypatch.setattr(dino, "MAX_KMEANS_FEATURES", 10)
    result = evaluate(str(dino_run))
    assert [rows for rows, _ in kmeans_calls] == [10]  # of the split's 36 patch features
    assert 0.0 < result["miou"] <= 1.0


def order_free(fit, calls: list):
    """k-means on the sample's rows sorted, recording (rows, clusters): k-means++ depends on the rows' order,
    which pooling the ranks' samples changes (rank 0's, then rank 1's)."""
    def kmeans(features, k, **options):
        calls.append([len(features), k])
        return fit(features[features[:, 0].argsort()], k, **options)
    return kmeans


def evaluate_split(run_dir: str, rank: int, world_size: int) -> tuple[dict, list]:
    """(DINO's evaluation of the validation split's share of `rank`, the k-means calls), one thread."""
    from launcher.training.restore import restore

    calls, fit, threads = [], dino.kmeans, torch.get_num_threads()
    dino.kmeans = order_free(fit, calls)
    torch.set_num_threads(1)  # the same float sums in every process's forward
    try:
        spec, task, accelerator, _ = restore(run_dir)
        loader = build_loader(spec.data.val, task.eval_pipeline(spec), batch_size=1, rank=rank,
                              world_size=world_size, train=False)
        return task.evaluate(loader, accelerator), calls
    finally:
        dino.kmeans = fit
        torch.set_num_threads(threads)


def evaluate_as_rank(rank: int, port: int, run_dir: str, out: str) -> None:
    """One of two CPU ranks (gloo) evaluating its half of the validation split."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")
    result, calls = evaluate_split(run_dir, rank, 2)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"result": result, "kmeans": calls}))
    torch.distributed.destroy_process_group()


def test_dino_eval_under_two_ranks_pools_them_into_the_single_process_numbers(dino_run, tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    torch.multiprocessing.spawn(evaluate_as_rank, args=(port, str(dino_run), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    single, calls = evaluate_split(str(dino_run), 0, 1)
    assert ranks[0] == ranks[1]  # the same centres and the same summed confusion on every rank
    assert ranks[0]["kmeans"] == calls  # both halves' patches; every class of the split, not of a half's
    for key, value in ranks[0]["result"].items():
        assert value == pytest.approx(single[key], nan_ok=True), key


def test_wnet_eval_scores_whole_images_with_and_without_post_processing(shard_root, tmp_path, monkeypatch):
    """W-Net's K segments on whole images (each label at its own size), many-to-one beside Hungarian, the
    reconstruction's PSNR, and the CRF + merging post-processing scored beside the raw segments."""
    spec = write_spec(tmp_path, shard_root, "wnet", name="wnet_eval", train={"max_steps": 2},
                      wnet={"postprocess": "crf+merge", "merge_segments": 2})
    assert segjobs(["train", str(spec)]) == 0
    scored = []  # (prediction, label) as the metrics receive them: raw and post-processed, image by image
    original = SegmentationMetric.update

    def update(self, pred, target):
        scored.append((pred, target))
        original(self, pred, target)

    monkeypatch.setattr(SegmentationMetric, "update", update)
    calls = {"dense_crf": 0, "merge_segments": 0}
    for name in calls:
        real = getattr(wnet_family, name)

        def counted(*args, name=name, real=real, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(wnet_family, name, counted)
    report = evaluate(str(tmp_path / "wnet_eval"))
    loader = build_loader(shard_root / "validation", WholeImage(), batch_size=1, rank=0, world_size=1, train=False)
    labels = [tuple(label.shape) for batch in loader for label in batch["label"]]
    loader.close()
    assert [tuple(pred.shape) for pred, _ in scored[::2]] == labels
    assert all(pred.shape == target.shape for pred, target in scored)
    assert all(len(pred.unique()) <= 2 for pred, _ in scored[1::2])  # merged down to wnet.merge_segments
    assert calls == {"dense_crf": len(labels), "merge_segments": len(labels)}  # once per image, on every image
    assert {"miou", "macc", "pixel_acc", "many_to_one_miou", "psnr", "post_miou", "post_many_to_one_miou"} <= set(report)
    assert report["postprocess"] == "crf+merge" and 0 < report["psnr"] < 60
    assert report["many_to_one_pixel_acc"] >= report["pixel_acc"]  # many-to-one never scores below one-to-one


class PlantedAttention(torch.nn.Module):
    """A network whose last-block CLS attention is given: 2 heads over a 4 x 4 patch grid (patch 8)."""

    def __init__(self, maps: torch.Tensor):
        super().__init__()
        self.maps = torch.nn.Parameter(maps, requires_grad=False)
        self.backbone = torch.nn.Module()
        self.backbone.blocks = torch.nn.ModuleList([torch.nn.Identity()])
        self.config = type("Config", (), {"backbone": type("Backbone", (), {"patch_size": 8, "num_heads": 2})})

    def attention_maps(self, images):
        return self.maps.expand(len(images), -1, -1)


def reference_mask(attention: np.ndarray, mass: float = 0.6) -> np.ndarray:
    """DINO's visualize_attention.py threshold, restated: sort ascending, keep where the normalised cumulative
    sum exceeds 1 - mass."""
    order = np.argsort(attention)
    cumulative = np.cumsum(attention[order]) / attention.sum()
    mask = np.zeros(attention.shape, bool)
    mask[order] = cumulative > 1 - mass
    return mask


def test_attention_jaccard_scores_60_percent_masks_against_all_but_the_commonest_label():
    from accelerate import Accelerator

    label = torch.zeros(32, 32, dtype=torch.uint8)  # background 0 (the commonest), a 16 x 16 object of class 3
    label[8:24, 8:24] = 3
    on_object = np.zeros((4, 4))
    on_object[1:3, 1:3] = True  # patches 5, 6, 9, 10
    # head 0: 64% of the mass on the object, spread thin elsewhere: its 60% mask is the object exactly;
    # head 1: rising with the patch index (no ties), its mask the 7 last patches
    head0 = np.where(on_object.flatten() > 0, 0.16, 0.03)
    head1 = np.arange(1, 17) / 136
    maps = torch.tensor(np.stack([head0, head1]), dtype=torch.float32)[None]
    scores = dino.AttentionJaccard(PlantedAttention(maps))
    scores.add({"image": torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "label": [label, label]}, Accelerator(cpu=True))
    result = scores.compute("", distributed=False)

    def jaccard(mask: np.ndarray) -> float:  # patch level: the object is aligned with the patches
        return (mask & (on_object.flatten() > 0)).sum() / (mask | (on_object.flatten() > 0)).sum()

    assert jaccard(reference_mask(head0)) == 1.0 and jaccard(reference_mask(head1)) == pytest.approx(2 / 9)
    assert result["jaccard_best_head"] == pytest.approx(1.0)
    assert result["jaccard_mean_heads"] == pytest.approx(jaccard(reference_mask((head0 + head1) / 2)))
