"""Segmentation metrics with mmsegmentation's semantics, and unsupervised mIoU after Hungarian matching.

    metric = SegmentationMetric(num_classes=150)
    metric.update(pred, target)       # integer maps of equal shape; target 255 is ignored
    metric.compute()                  # {"miou", "pixel_acc", "iou": [per class, nan where never present]}

mIoU: intersections and unions are summed over the whole split (not averaged per image), then IoU is
averaged over the classes whose union is non-zero. Under DDP call `all_reduce()` once after the loop.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment

IGNORE_INDEX = 255


class SegmentationMetric:
    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, num_predicted: int | None = None):
        """`num_predicted` > num_classes for unsupervised clusters (matched to classes in compute())."""
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.num_predicted = num_predicted or num_classes
        self.confusion = torch.zeros(self.num_predicted, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        valid = target != self.ignore_index
        index = pred[valid].long().cpu() * self.num_classes + target[valid].long().cpu()
        self.confusion += torch.bincount(index, minlength=self.num_predicted * self.num_classes).reshape(self.confusion.shape)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            confusion = self.confusion.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(confusion)
            self.confusion = confusion.cpu()

    def compute(self) -> dict[str, float | list[float]]:
        confusion = self.confusion
        if self.num_predicted != self.num_classes:
            confusion = hungarian_confusion(confusion)
        confusion = confusion.double()
        classes = self.num_classes
        intersection = confusion[:classes].diagonal()
        union = confusion.sum(0) + confusion[:classes].sum(1) - intersection
        iou = torch.where(union > 0, intersection / union.clamp_min(1), torch.full_like(union, math.nan))
        total = confusion.sum()
        return {
            "miou": float(iou[union > 0].mean()) if (union > 0).any() else 0.0,
            "pixel_acc": float(intersection.sum() / total) if total > 0 else 0.0,
            "iou": iou.tolist(),
        }


def hungarian_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Match clusters to classes one-to-one, maximising matched pixels (scipy's linear_sum_assignment).

    Returns a (classes + 1) x classes confusion: row c holds the pixels of the cluster matched to class c;
    the last row holds the pixels of clusters left unmatched (when there are more clusters than classes),
    which count against accuracy and enlarge the unions of their true classes."""
    clusters, classes = confusion.shape
    rows, cols = linear_sum_assignment(confusion.numpy(), maximize=True)
    matched = torch.zeros(classes + 1, classes, dtype=confusion.dtype)
    cluster_to_class = dict(zip(rows.tolist(), cols.tolist()))
    for cluster in range(clusters):
        matched[cluster_to_class.get(cluster, classes)] += confusion[cluster]
    return matched


def kmeans(features: torch.Tensor, k: int, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """k x D centres of L2-normalised N x D features (k-means++ initialisation, then Lloyd iterations)."""
    features = torch.nn.functional.normalize(features.float(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centers = features[torch.randint(len(features), (1,), generator=generator)]
    for _ in range(1, k):
        distances = torch.cdist(features, centers).min(dim=1).values.square()
        probabilities = distances / distances.sum() if distances.sum() > 0 else torch.full_like(distances, 1 / len(distances))
        centers = torch.cat([centers, features[torch.multinomial(probabilities, 1, generator=generator)]])
    for _ in range(iterations):
        assignment = torch.cdist(features, centers).argmin(dim=1)
        for c in range(k):
            members = features[assignment == c]
            if len(members):
                centers[c] = members.mean(0)
    return centers
