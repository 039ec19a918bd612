"""DINO: student and EMA teacher on multi-crop views; loss with centring and sharpening; the reference's
schedules (learning rate, weight decay, teacher momentum, teacher temperature) and last-layer freezing.
Evaluation: k-means on the teacher's patch features, then unsupervised mIoU by Hungarian matching.
Pictures: the teacher's per-head CLS attention and its 60%-mass masks; an animation of the mean attention."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

import models
from launcher.training.families.base import StepContext, Task, make_optimizer, normalize, to_device, transformer_blocks
from launcher.training.families.registry import register_family
from launcher.training.metrics import SegmentationMetric, kmeans
from launcher.training.parallel import unwrap
from launcher.training.pictures import IGNORE_INDEX, grid, heatmap, overlay, to_batch
from launcher.training.schedules import cosine
from models.dino import (DINOLoss, attention_masks, cancel_last_layer_gradients, clip_gradients, ema_update,
                         teacher_temperature)
from shards.transforms import DinoMultiCrop, WNetCrop

EVAL_CLUSTERS = 20
MAX_KMEANS_FEATURES = 100_000
ATTENTION_SIZE = 224  # pictures: the shorter side, as in the paper's figures (a multiple of 8 and 16)


@register_family("dino")
class DinoTask(Task):
    shortcut_spec = "jobs/dino_vits8.yaml"
    frames_name = "attention.gif"
    supervised = False
    eval_sharded = False  # k-means must see the whole split: every rank evaluates all of it, identically

    def __init__(self, spec, accelerator, horizon):
        super().__init__(spec, accelerator, horizon)
        # As main_dino.py builds it: the same architecture without drop path, the student's weights, no gradients.
        self.teacher = models.create(spec.model.name, **{**spec.model.options, "drop_path_rate": 0.0})
        self.teacher.load_state_dict(self.model.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.loss = DINOLoss(self.model.config.out_dim, 2 + spec.data.local_crops, spec.dino.warmup_teacher_temp,
                             spec.dino.teacher_temp, spec.dino.warmup_teacher_temp_epochs).to(accelerator.device)
        self.teacher_momentum = self.schedules(spec, horizon)["teacher_momentum"]

    @classmethod
    def schedules(cls, spec, horizon) -> dict:
        dino = spec.dino
        return {**super().schedules(spec, horizon),
                "teacher_momentum": lambda position: cosine(dino.momentum_teacher, 1.0, position, horizon.steps),
                "teacher_temp": lambda position: teacher_temperature(int(position // horizon.steps_per_epoch),
                                                                     dino.warmup_teacher_temp, dino.teacher_temp,
                                                                     dino.warmup_teacher_temp_epochs)}

    @classmethod
    def hyper(cls, spec, horizon) -> dict:
        dino = spec.dino
        return {**super().hyper(spec, horizon), "momentum_teacher": dino.momentum_teacher,
                "warmup_teacher_temp": dino.warmup_teacher_temp, "teacher_temp": dino.teacher_temp,
                "warmup_teacher_temp_epochs": dino.warmup_teacher_temp_epochs, "freeze_last_layer": dino.freeze_last_layer}

    @staticmethod
    def train_pipeline(spec):
        data = spec.data
        return DinoMultiCrop(global_size=data.global_crop_size, local_size=data.local_crop_size,
                             global_scale=tuple(data.global_scale), local_scale=tuple(data.local_scale),
                             local_crops=data.local_crops)

    @staticmethod
    def eval_pipeline(spec):
        return WNetCrop(size=spec.data.global_crop_size, train=False)

    def shard_units(self, module):
        return transformer_blocks(module)

    def parallel_wrap(self, wrap) -> None:
        self.model = wrap(self.model)
        self.optimizers = [make_optimizer(self.spec, params_groups(self.model, self.spec.optim.weight_decay))]
        self.teacher = wrap(self.teacher, trainable=False)

    def train_step(self, batch: dict, context: StepContext) -> dict[str, torch.Tensor]:
        accelerator = context.accelerator
        crops = [normalize(to_device(c, accelerator.device)) for c in batch["crops"]]
        with torch.no_grad(), accelerator.autocast():
            teacher_out = self.teacher(crops[:2])  # only the global views pass through the teacher
        if hasattr(self.teacher, "reshard"):
            # FSDP leaves a root module's weights gathered after forward, for a backward the teacher never
            # runs: shard them again so that the EMA pairs shard with shard.
            self.teacher.reshard()
        with accelerator.accumulate(self.model):
            with accelerator.autocast():
                student_out = self.model(crops)
            loss = self.loss(student_out.float(), teacher_out.float(), context.epoch)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if self.spec.train.clip_grad:
                    clip_gradients(self.model, self.spec.train.clip_grad)
                cancel_last_layer_gradients(unwrap(self.model), context.epoch, self.spec.dino.freeze_last_layer)
            self.optimizers[0].step()
            self.optimizers[0].zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            momentum = self.teacher_momentum(context.position)
            ema_update(unwrap(self.teacher), unwrap(self.model), momentum)
        return {"loss": loss.detach()}

    def extra_state(self) -> dict:
        """Collective under FSDP (the teacher's shards are gathered): every rank calls it."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {"center": self.loss.center.detach().cpu(), "teacher": get_model_state_dict(self.teacher, options=options)}

    def load_extra_state(self, state: dict) -> None:
        self.loss.center.copy_(state["center"].to(self.loss.center.device))
        set_model_state_dict(self.teacher, state["teacher"], options=StateDictOptions(full_state_dict=True))

    @torch.no_grad()
    def evaluate(self, loader, accelerator) -> dict:
        """Teacher patch features of every validation image, clustered by k-means (20 clusters), each patch's
        cluster upsampled to the label's pixels, matched to classes."""
        teacher = unwrap(self.teacher)
        teacher.eval()
        if hasattr(teacher, "unshard"):  # FSDP: the backbone is called directly, past the root's hooks
            teacher.unshard()
        features, labels = [], []
        for batch in loader:
            images = normalize(to_device(batch["image"], accelerator.device))
            with accelerator.autocast():
                tokens = teacher.backbone.tokens(images)[:, 1:].float()
            patch = teacher.config.backbone.patch_size
            grid = (images.shape[-2] // patch, images.shape[-1] // patch)
            features.extend(t.cpu() for t in tokens)
            labels.extend((label, grid) for label in batch["label"])
        if hasattr(teacher, "reshard"):
            teacher.reshard()
        teacher.train()
        if not features:
            return {"miou": 0.0, "pixel_acc": 0.0, "iou": []}
        stacked = torch.cat(features)
        sample = stacked[torch.randperm(len(stacked), generator=torch.Generator().manual_seed(0))[:MAX_KMEANS_FEATURES]]
        centers = kmeans(sample, EVAL_CLUSTERS)
        metric = SegmentationMetric(loader.manifest.num_classes, num_predicted=EVAL_CLUSTERS)
        for tokens, (label, grid) in zip(features, labels):
            assignment = torch.cdist(F.normalize(tokens, dim=1), centers).argmin(1).reshape(1, 1, *grid).float()
            cluster_map = F.interpolate(assignment, size=label.shape[-2:], mode="nearest")[0, 0].long()
            metric.update(cluster_map, label)
        return metric.compute()

    def picture_network(self):
        return unwrap(self.teacher)

    @torch.no_grad()
    def pictures(self, samples, device) -> dict:
        """Per sample, a row of the teacher's per-head attention maps and a row of their 60%-mass masks."""
        network, rows = self.picture_network(), []
        for image, _ in samples:
            shown, maps, masks = attention_views(network, image, device)
            rows.append([shown, *(heatmap(a) for a in maps)])
            rows.append([shown, *(overlay(shown, np.where(m > 0, 0, IGNORE_INDEX), alpha=0.6) for m in masks)])
        return {"dino_attention.png": grid(rows)}

    @classmethod
    def frame_picture(cls, network, image, device) -> Image.Image:
        """image | mean attention over heads | the union of the heads' 60%-mass masks."""
        shown, maps, masks = attention_views(network, image, device)
        mask = np.where(masks.max(0) > 0, 0, IGNORE_INDEX)
        return grid([[shown, heatmap(maps.mean(0)), overlay(shown, mask, alpha=0.6)]])


def params_groups(model, weight_decay: float) -> list[dict]:
    """main_dino.py's get_params_groups: biases and 1-D parameters (norms) do not decay, every other weight does
    (pos_embed and cls_token too, unlike timm's no_weight_decay)."""
    decay, no_decay = [], []
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "decay": True},
            {"params": no_decay, "weight_decay": 0.0, "decay": False}]


def patch_multiple(height: int, width: int, patch: int, shorter: int) -> tuple[int, int]:
    """The size with the shorter side near `shorter`, both sides multiples of the patch."""
    scale = shorter / min(height, width)
    return max(patch, round(height * scale / patch) * patch), max(patch, round(width * scale / patch) * patch)


@torch.no_grad()
def attention_views(network, image: np.ndarray, device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image resized, heads x h x w attention upsampled to it, heads x h x w 60%-mass masks) for one image."""
    patch = network.config.backbone.patch_size
    height, width = patch_multiple(image.shape[0], image.shape[1], patch, ATTENTION_SIZE)
    pixels = normalize(to_batch(image, (height, width), device))
    maps = network.attention_maps(pixels)[0].float()  # heads x patches
    masks = attention_masks(maps, mass=0.6).float()
    grid_shape = (height // patch, width // patch)

    def upsample(values: torch.Tensor) -> np.ndarray:
        return F.interpolate(values.reshape(1, -1, *grid_shape), size=(height, width), mode="nearest")[0].cpu().numpy()

    shown = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    return shown, upsample(maps), upsample(masks)
