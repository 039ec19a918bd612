"""What each model family gives the trainer, which knows no concrete model.

A Task builds its network(s) and data pipelines, turns a batch into optimizer steps (returning the losses
as device tensors: the trainer reads them only at log steps), carries any state beyond model and
optimizers (DINO's teacher and centre), evaluates, names its FSDP units and draws its pictures. A family is
one module in this package with a Task registered by `@register_family`, plus one import line in
families/__init__.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from launcher.training.parallel import unwrap
from launcher.training.schedules import Horizon, learning_rate, peak_learning_rate, weight_decay

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# data.normalization -> (mean, std) of the backbone's weights, as segm/data/utils.py's STATS ("deit" there).
NORMALIZATION = {"vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


@dataclass
class StepContext:
    step: int  # optimizer steps taken before this one
    epoch: int
    position: float  # where the schedules are: samples seen / global batch (= step unless resumed elastically)
    accelerator: Any


class Task(ABC):
    """The base of every family's task: builds the network from the spec; the defaults below suit a
    single-optimizer family without state beyond model and optimizers. A family must supply the two
    pipelines, train_step, evaluate and pictures (abstract: a family missing one cannot be built)."""

    family: str = ""  # set by @register_family
    shortcut_spec: str | None = None  # `segjobs train --model FAMILY` starts from this spec (relative to the repository)
    ddp_find_unused_parameters = False  # W-Net's N-cut step leaves U-Dec without gradients
    supports_grad_accum = True  # False when one batch already takes several optimizer steps (W-Net)
    channels_last = False  # convolutional networks: NHWC memory format
    supervised = True  # False: evaluation matches predicted clusters to classes (Hungarian)
    eval_modes = ("whole",)  # the first is the default, which the trainer's evaluations use (Segmenter: slide)
    # The animation over a folder of frames (DINO: attention.gif); a family that names one also supplies the
    # classmethod frame_picture(network, image, device) -> PIL image, one frame of it. None: no animation.
    frames_name: str | None = None
    prediction_files: tuple[str, ...] = ()  # what predictions() may return per image (`segjobs predict`)

    def __init__(self, spec, accelerator, horizon: Horizon):
        """`horizon` holds the steps per epoch and the schedules' length (launcher.training.schedules)."""
        import models

        self.spec = spec
        self.model: nn.Module = models.create(spec.model.name, pretrained=spec.model.pretrained, **spec.model.options)
        self.optimizers: list[torch.optim.Optimizer] = []
        self.eval_mode = self.eval_modes[0]

    @staticmethod
    @abstractmethod
    def train_pipeline(spec):
        """The training transform: (PIL image, label or None, rng) -> dict of uint8 arrays."""

    @staticmethod
    @abstractmethod
    def eval_pipeline(spec):
        """The evaluation transform (labels at their original resolution)."""

    @classmethod
    def shortcut_pretrained(cls, pretrained: str) -> list[str]:
        """`segjobs train --model FAMILY --pretrained [FILE]`: the --set overrides that start from those weights."""
        from launcher.spec import SpecError

        raise SpecError(f"--pretrained: the {cls.family} family has no pretrained shortcut; set model.pretrained in a spec.")

    @classmethod
    def schedules(cls, spec, horizon: Horizon) -> dict:
        """Name -> function of the position (optimizer steps done) for every schedule the family follows;
        `segjobs plan` evaluates these, the trainer and train_step the same functions."""
        return {"lr": partial(learning_rate, spec, horizon), "weight_decay": partial(weight_decay, spec, horizon)}

    @classmethod
    def hyper(cls, spec, horizon: Horizon) -> dict:
        """The resolved values the schedules use (`segjobs plan --json`)."""
        sched, optim = spec.schedule, spec.optim
        warmup = {"warmup_epochs": sched.warmup_epochs} if sched.warmup_epochs is not None else {"warmup_steps": sched.warmup_steps}
        decay = {"step_size": sched.step_size, "gamma": sched.gamma} if sched.kind == "step" else {}
        return {"lr": optim.lr, "lr_peak": peak_learning_rate(spec, horizon.global_batch), "lr_scaling": optim.lr_scaling,
                "schedule": sched.kind, "min_lr": sched.min_lr, **decay, **warmup, "warmup_iters": horizon.warmup,
                "weight_decay": optim.weight_decay, "weight_decay_end": optim.weight_decay_end}

    def check_data(self, manifest) -> None:
        """Refuse training shards this task cannot learn from (their manifest's num_classes, say)."""

    def shard_units(self, module: nn.Module) -> list[nn.Module]:
        """The submodules FSDP shards one by one (transformer blocks, U-Net modules); none: the root is one unit."""
        return []

    def parallel_wrap(self, wrap) -> None:
        """Apply `wrap(module) -> module` (the trainer's DDP/FSDP) to the trained network, build the optimizers."""
        self.model = wrap(self.model)
        self.optimizers = [make_optimizer(self.spec, param_groups(self.model, self.spec.optim.weight_decay))]

    @abstractmethod
    def train_step(self, batch: dict, context: StepContext) -> dict[str, torch.Tensor]:
        """One batch -> optimizer step(s); returns the losses as device tensors."""

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    @abstractmethod
    def evaluate(self, loader, accelerator) -> dict:
        """{"miou", "macc", "pixel_acc", "iou": [per class], ...} over the loader's split (num_classes from its
        manifest); unsupervised families add the many_to_one_* scores (launcher.training.metrics)."""

    @abstractmethod
    def pictures(self, samples: list[tuple[np.ndarray, np.ndarray | None]], device) -> dict[str, Image.Image]:
        """File name -> picture of the trained model on validation samples (H x W x 3 uint8 image, label or None)."""

    def predictions(self, images: list[np.ndarray], device, label_offset: int = 1) -> list[dict[str, Image.Image]]:
        """`segjobs predict`: for each image (H x W x 3 uint8; sizes may differ), file suffix -> picture, e.g.
        {"classes.png": ...}. `label_offset` is what the dataset adds to a class index to number its labels (1 for
        ADE20K, whose label 0 is "other"). A family without predictions refuses."""
        from launcher.spec import SpecError

        raise SpecError(f"segjobs predict: the {self.family} family draws no predictions.")

    def picture_network(self) -> nn.Module:
        """The network a frame animation draws (DINO: the teacher, as in the paper's figures)."""
        return unwrap(self.model)

    def video_frame(self, image: np.ndarray, device) -> Image.Image:
        """One frame of `segjobs visualize --video`: the family's tiles for one H x W x 3 uint8 video frame, side
        by side. Every frame of a video has the same size, so every picture must too. The default is the frame
        animation's picture (frame_picture); a family without one draws no video."""
        if self.frames_name is None:
            from launcher.spec import SpecError

            raise SpecError(f"--video: the {self.family} family draws no video.")
        return type(self).frame_picture(self.picture_network(), image, device)


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 B x 3 x H x W -> float, normalised on the device (the loader ships uint8: 4x fewer bytes)."""
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean_t) / std_t


def photometric_on_device(spec) -> bool:
    """Whether the training pipeline leaves its photometric steps to the device (data.photometric). "auto"
    becomes "device" when a GPU trains (the accelerator then runs on it), "loader" otherwise; the resolved
    value is written back into the spec, so that spec.yaml and every checkpoint record what ran."""
    if spec.data.photometric == "auto":
        spec.data.photometric = "device" if torch.cuda.is_available() else "loader"
    return spec.data.photometric == "device"


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.to(device, non_blocking=True)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights decay; biases, norms and 1-D parameters (and the model's no_weight_decay names) do not."""
    model = unwrap(model)  # the same groups with or without a DDP wrapper
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "decay": True},
            {"params": no_decay, "weight_decay": 0.0, "decay": False}]


def make_optimizer(spec, groups: list[dict]) -> torch.optim.Optimizer:
    """The spec's optimizer over parameters already on their device: on GPUs torch's fused kernels (one launch
    for every parameter instead of one per tensor group), elsewhere its default (foreach)."""
    fused = all(p.is_cuda for group in groups for p in group["params"]) or None
    if spec.optim.kind == "sgd":
        return torch.optim.SGD(groups, lr=spec.optim.lr, momentum=spec.optim.momentum, nesterov=spec.optim.nesterov,
                               fused=fused)
    return torch.optim.AdamW(groups, lr=spec.optim.lr, betas=spec.optim.betas, fused=fused)


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """timm's ViT blocks inside a module: the FSDP units of the ViT families."""
    from timm.models.vision_transformer import Block

    return [m for m in module.modules() if isinstance(m, Block)]
