"""Segmentation metrics with mmsegmentation's semantics; unsupervised scores after matching clusters to classes.

    metric = SegmentationMetric(num_classes=150)                    # predictions are class indices
    metric = SegmentationMetric(num_classes=150, num_predicted=27)  # predictions are cluster indices (any number)
    metric.update(pred, target)       # integer maps of equal shape; target 255 is ignored
    metric.all_reduce()               # under DDP, once after the loop: sums the confusion over the ranks
    metric.compute()                  # a flat dict of floats, plus "iou": [per class, nan where never present]

Keys: `miou`, `pixel_acc`, `macc` and `iou`; unsupervised metrics add `many_to_one_miou`,
`many_to_one_pixel_acc` and `many_to_one_macc`.
- mIoU: intersections and unions are summed over the whole split (not averaged per image), then IoU is averaged
  over the classes whose union is non-zero (labelled or predicted somewhere); a class never labelled but
  predicted counts with IoU 0.
- pixel_acc: correct pixels / labelled pixels. macc (mmseg's mAcc): per class, correct pixels / pixels labelled
  with it, averaged over the classes labelled somewhere in the split.
- Unsupervised (the protocol of PiCIE, Cho et al. 2021, and STEGO, Hamilton et al. 2022): the unprefixed keys
  are scored after the one-to-one Hungarian matching of clusters to classes (pixels of unmatched clusters count
  as wrong); `many_to_one_*` after mapping each cluster to the class it overlaps most (majority vote: several
  clusters may share a class, so pixel accuracy is never lower than one-to-one; mIoU may be, as small classes
  lose their cluster to a large one).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

IGNORE_INDEX = 255


class SegmentationMetric:
    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, num_predicted: int | None = None):
        """`num_predicted`: the number of unsupervised clusters, fewer, as many as or more than the classes;
        given, compute() matches clusters to classes first. None: predictions are class indices."""
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.unsupervised = num_predicted is not None
        self.num_predicted = num_classes if num_predicted is None else num_predicted
        self.confusion = torch.zeros(self.num_predicted, num_classes, dtype=torch.int64)  # [predicted, true]

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
        if not self.unsupervised:
            return scores(self.confusion)
        many_to_one = scores(many_to_one_confusion(self.confusion))
        return {**scores(hungarian_confusion(self.confusion)),
                **{f"many_to_one_{key}": value for key, value in many_to_one.items() if key != "iou"}}


def scores(confusion: torch.Tensor) -> dict[str, float | list[float]]:
    """miou, pixel_acc, macc and per-class iou of a confusion [predicted, true] whose row c holds the pixels
    predicted as class c; rows past the classes hold pixels predicted as no class (always wrong)."""
    confusion = confusion.double()
    classes = confusion.shape[1]
    intersection = confusion[:classes].diagonal()
    labelled = confusion.sum(0)
    union = labelled + confusion[:classes].sum(1) - intersection
    iou = torch.where(union > 0, intersection / union.clamp_min(1), torch.full_like(union, math.nan))
    present = labelled > 0
    return {
        "miou": float(iou[union > 0].mean()) if (union > 0).any() else 0.0,
        "pixel_acc": float(intersection.sum() / labelled.sum()) if present.any() else 0.0,
        "macc": float((intersection[present] / labelled[present]).mean()) if present.any() else 0.0,
        "iou": iou.tolist(),
    }


def hungarian_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Match clusters to the classes labelled in the split one-to-one, maximising matched pixels (scipy's
    linear_sum_assignment); a class never labelled takes no cluster (it would count in mIoU with IoU 0).

    Returns a (classes + 1) x classes confusion: row c holds the pixels of the cluster matched to class c;
    the last row holds the pixels of clusters left unmatched (when there are more clusters than classes),
    which count against accuracy and enlarge the unions of their true classes."""
    clusters, classes = confusion.shape
    labelled = torch.nonzero(confusion.sum(0) > 0)[:, 0]
    rows, cols = linear_sum_assignment(confusion[:, labelled].numpy(), maximize=True)
    matched = torch.zeros(classes + 1, classes, dtype=confusion.dtype)
    cluster_to_class = dict(zip(rows.tolist(), labelled[cols].tolist()))
    for cluster in range(clusters):
        matched[cluster_to_class.get(cluster, classes)] += confusion[cluster]
    return matched


def many_to_one_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Map each cluster to the class it overlaps most (ties: the lowest class index), summing the rows of
    clusters mapped to the same class: a classes x classes confusion."""
    classes = confusion.shape[1]
    return torch.zeros(classes, classes, dtype=confusion.dtype).index_add_(0, confusion.argmax(1), confusion)


def kmeans(features: torch.Tensor, k: int, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """k x D centres of L2-normalised N x D features: k-means++ initialisation, then Lloyd iterations.

    Runs where `features` are (1e5 x 384 features, k = 150: about a minute on two CPU cores),
    drawing from a CPU generator: the same centres for the same seed on the same device. Time and memory grow
    as N x k: keep N to a sample."""
    features = F.normalize(features.float(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centers = features[torch.randint(len(features), (1,), generator=generator).to(features.device)]
    distances = (features - centers[0]).square().sum(1)  # to the nearest centre so far, squared
    for _ in range(1, k):
        total = distances.sum()
        probabilities = (distances / total if total > 0 else torch.ones_like(distances)).cpu()
        chosen = features[torch.multinomial(probabilities, 1, generator=generator).to(features.device)]
        centers = torch.cat([centers, chosen])
        distances = torch.minimum(distances, (features - chosen).square().sum(1))
    for _ in range(iterations):
        members = F.one_hot(torch.cdist(features, centers).argmin(dim=1), k).T.float()  # k x N
        counts = members.sum(1, keepdim=True)
        # A matrix product, not index_add_: a GPU's atomic adds would sum in any order.
        centers = torch.where(counts > 0, members @ features / counts.clamp_min(1), centers)  # an empty cluster stays put
    return centers
