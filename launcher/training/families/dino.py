"""DINO: student and EMA teacher on multi-crop views; loss with centring and sharpening; the reference's
schedules (learning rate, weight decay, teacher momentum, teacher temperature) and last-layer freezing.
Evaluation: k-means (a cluster per class present) on the teacher's patch features, then unsupervised mIoU by
Hungarian and many-to-one matching, as PiCIE and STEGO score it.
Pictures: the teacher's per-head CLS attention and its 60%-mass masks; an animation of the mean attention."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

import models
from launcher.training.families.base import (StepContext, Task, make_optimizer, normalize, photometric_on_device, to_device,
                                             transformer_blocks)
from launcher.training.families.registry import register_family
from launcher.training.metrics import SegmentationMetric, kmeans
from launcher.training.parallel import unwrap
from launcher.training.pictures import IGNORE_INDEX, grid, heatmap, overlay, to_batch
from launcher.training.schedules import cosine
from models.dino import (DINOLoss, attention_masks, cancel_last_layer_gradients, clip_gradients, ema_update,
                         teacher_temperature)
from shards.photometric import dino_photometric
from shards.transforms import DinoMultiCrop, WNetCrop

MAX_KMEANS_FEATURES = 100_000  # patch features k-means is fitted on, all ranks together: 150 MB at ViT-S's 384 dims
KMEANS_SEED = 0  # the sample and k-means++: evaluating a checkpoint twice gives the same numbers
ATTENTION_SIZE = 224  # pictures: the shorter side, as in the paper's figures (a multiple of 8 and 16)


@register_family("dino")
class DinoTask(Task):
    shortcut_spec = "jobs/dino_vits8.yaml"
    frames_name = "attention.gif"
    prediction_files = ("attention.png", "heads.png")  # segjobs predict writes <image stem>_<name>
    supervised = False

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
                             local_crops=data.local_crops, photometric_on_device=photometric_on_device(spec))

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
        crops = [to_device(c, accelerator.device) for c in batch["crops"]]
        if "photometric" in batch:  # data.photometric: device
            crops = colour_views(crops, [to_device(p, accelerator.device) for p in batch["photometric"]])
        crops = [normalize(c) for c in crops]
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
        """Unsupervised segmentation scored as PiCIE and STEGO do: k-means with as many clusters as classes
        present in the split, on the teacher's L2-normalised patch features; each patch's cluster upsampled
        (nearest) to the label's pixels; clusters matched to classes one-to-one (Hungarian) and many-to-one.

        Two full passes over the loader. The first keeps a uniform sample of at most MAX_KMEANS_FEATURES patch
        features (all ranks together; never every feature: ViT-S/8 on ADE20K's 2,000 validation images has
        2.4 GB of them at 224 px crops) and counts the classes present (ignore index excluded). k-means is
        fitted on the sample on the accelerator, seeded: the same numbers every time on the same device. The
        second pass assigns every patch to its nearest centre.

        Note: with a loader split across ranks every rank must call this (collectives): the ranks pool their
        classes and samples so that all fit the same centres, then sum their confusions."""
        teacher = unwrap(self.teacher)
        teacher.eval()
        if hasattr(teacher, "unshard"):  # FSDP: the backbone is called directly, past the root's hooks
            teacher.unshard()
        try:
            num_classes = loader.manifest.num_classes
            world = loader.stream.world_size if dist.is_available() and dist.is_initialized() else 1
            reservoir = Reservoir(-(-MAX_KMEANS_FEATURES // world), teacher.config.backbone.embed_dim,
                                  seed=KMEANS_SEED + loader.stream.rank)
            present = torch.zeros(num_classes, dtype=torch.int64)  # per class, the images showing it
            jaccard = {"": AttentionJaccard(teacher), "untrained_": AttentionJaccard(self.untrained(accelerator.device))}
            for batch in full_pass(loader):
                for scores in jaccard.values():
                    scores.add(batch, accelerator)
                features, _ = patch_features(teacher, batch, accelerator)
                reservoir.add(features.flatten(0, 1).cpu())
                for label in batch["label"]:
                    present += torch.bincount(label[label != IGNORE_INDEX].long().flatten(), minlength=num_classes) > 0
            sample = reservoir.sample()
            if world > 1:  # each rank saw its share of the split
                sample, present = pool_across_ranks(sample, reservoir.capacity, present, accelerator)
            clusters = int((present > 0).sum())
            if not len(sample) or not clusters:  # an empty split, or nothing labelled: nothing to score
                return SegmentationMetric(num_classes, num_predicted=1).compute()
            centers = kmeans(sample.to(accelerator.device), clusters, seed=KMEANS_SEED)
            if world > 1:  # the same sample and seed give the same centres; rank 0's also where the GPUs differ
                dist.broadcast(centers, src=0)
            metric = SegmentationMetric(num_classes, num_predicted=clusters)
            for batch in full_pass(loader):
                features, grid_shape = patch_features(teacher, batch, accelerator)
                assignment = torch.cdist(features, centers[None]).argmin(-1).reshape(-1, 1, *grid_shape).float()
                for cluster_map, label in zip(assignment, batch["label"]):
                    metric.update(F.interpolate(cluster_map[None], size=label.shape[-2:], mode="nearest")[0, 0], label)
            if world > 1:
                metric.all_reduce()
            return {**metric.compute(), **{k: v for prefix, scores in jaccard.items()
                                           for k, v in scores.compute(prefix, world > 1).items()}}
        finally:
            if hasattr(teacher, "reshard"):
                teacher.reshard()
            teacher.train()

    def untrained(self, device) -> torch.nn.Module:
        """The network as it was before training (the run's seed, this architecture): what the attention scores
        are compared with. Built aside: the training's random state is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.seed)
            network = models.create(self.spec.model.name, **{**self.spec.model.options, "drop_path_rate": 0.0})
        return network.to(device).eval()

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

    @torch.no_grad()
    def predictions(self, images, device, label_offset: int = 1) -> list[dict]:
        """Per image, attention.png: the frame picture (image | mean attention of the heads | 60%-mass mask,
        the shorter side at ATTENTION_SIZE) and heads.png: each head's attention map, of the teacher."""
        written = []
        for image in images:
            shown, maps, masks = attention_views(self.picture_network(), image, device)
            written.append({"attention.png": attention_picture(shown, maps, masks),
                            "heads.png": grid([[shown, *(heatmap(a) for a in maps)]])})
        return written

    @classmethod
    def frame_picture(cls, network, image, device) -> Image.Image:
        """image | mean attention over heads | the union of the heads' 60%-mass masks."""
        return attention_picture(*attention_views(network, image, device))


def attention_picture(shown: np.ndarray, maps: np.ndarray, masks: np.ndarray) -> Image.Image:
    """image | mean attention over heads | the union of the heads' 60%-mass masks (attention_views' arrays)."""
    mask = np.where(masks.max(0) > 0, 0, IGNORE_INDEX)
    return grid([[shown, heatmap(maps.mean(0)), overlay(shown, mask, alpha=0.6)]])


def colour_views(crops: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """DINO's photometric steps on the device, each view with its sample's draws; the views of one size (the
    globals, the locals) go through as one batch. uint8 crops in, float crops in 0..255 out."""
    out: list[torch.Tensor | None] = [None] * len(crops)
    for size in dict.fromkeys(c.shape for c in crops):
        views = [i for i, c in enumerate(crops) if c.shape == size]
        coloured = dino_photometric(torch.cat([crops[i] for i in views]).float(), torch.cat([params[i] for i in views]))
        for i, part in zip(views, coloured.split(size[0])):
            out[i] = part
    return out


def full_pass(loader):
    """Every batch of the loader's split from its start, the same ones each call (evaluation reads in manifest
    order, and each sample's pipeline is seeded with (seed, epoch, sample)): a pass left unfinished, by an
    error say, would otherwise make the next one resume where it stopped."""
    loader.set_epoch(loader.epoch)
    return iter(loader)


def patch_features(teacher, batch: dict, accelerator) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B x patches x D L2-normalised float32 patch tokens on the device, the patch grid's (rows, columns))."""
    images = normalize(to_device(batch["image"], accelerator.device))
    with accelerator.autocast():
        tokens = teacher.backbone.tokens(images)[:, 1:]  # without the CLS token
    patch = teacher.config.backbone.patch_size
    return F.normalize(tokens.float(), dim=-1), (images.shape[-2] // patch, images.shape[-1] // patch)


class AttentionJaccard:
    """How well the CLS attention of the last block segments objects, as DINO scores it (Caron et al. 2021, Sec.
    4.2.1 and Fig. 4, on PASCAL VOC12): per image, the Jaccard index of the 60%-mass attention mask with the
    foreground, averaged over images; for the mask of the mean over heads, and for the best single head. With
    ADE20K's scene labels there is no object mask: the foreground is every pixel whose label is not the image's
    most frequent one (for the synthetic scenes of `segjobs synth`, exactly the shapes on their background)."""

    def __init__(self, network):
        self.network = network
        # per head, then the mean of heads: the per-image Jaccard indices summed; then the number of images
        self.totals = torch.zeros(network.config.backbone.num_heads + 2, dtype=torch.float64)

    @torch.no_grad()
    def add(self, batch: dict, accelerator) -> None:
        images = normalize(to_device(batch["image"], accelerator.device))
        # Under FSDP the last block's norm and attention are called directly, past its hooks: gather it here.
        last = self.network.backbone.blocks[-1]
        gather = hasattr(last, "unshard")
        if gather:
            last.unshard()
        try:
            with accelerator.autocast():
                maps = self.network.attention_maps(images).float()  # B x heads x patches
        finally:
            if gather:
                last.reshard()
        patch = self.network.config.backbone.patch_size
        grid_shape = (images.shape[-2] // patch, images.shape[-1] // patch)
        masks = torch.cat([attention_masks(maps), attention_masks(maps.mean(1, keepdim=True))], dim=1).float()
        for image_masks, label in zip(masks, batch["label"]):
            label = label.to(accelerator.device).long()
            foreground = label != torch.bincount(label.flatten()).argmax()
            shown = F.interpolate(image_masks.reshape(1, -1, *grid_shape), size=label.shape[-2:], mode="nearest")[0] > 0
            union = (shown | foreground).flatten(1).sum(1).clamp(min=1)
            jaccard = (shown & foreground).flatten(1).sum(1) / union
            self.totals += torch.cat([jaccard.double().cpu(), torch.ones(1, dtype=torch.float64)])

    def compute(self, prefix: str, distributed: bool) -> dict[str, float]:
        """Collective when `distributed`: every rank calls it."""
        totals = self.totals
        if distributed:
            totals = totals.to(next(self.network.parameters()).device)
            dist.all_reduce(totals)
        totals = totals.cpu()
        if not totals[-1]:
            return {}
        means = totals[:-1] / totals[-1]
        return {f"{prefix}jaccard_mean_heads": float(means[-1]), f"{prefix}jaccard_best_head": float(means[:-1].max())}


class Reservoir:
    """A uniform random sample of at most `capacity` of the rows streamed through add() (Vitter's algorithm R,
    a batch at a time), in `capacity` x `dim` float32 of CPU memory whatever the stream's length."""

    def __init__(self, capacity: int, dim: int, seed: int):
        self.capacity, self.seen = capacity, 0
        self.rows = torch.empty(capacity, dim)
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, rows: torch.Tensor) -> None:
        # The i-th row (from 0) takes slot i while there is room, then a random slot of [0, i] if one below the
        # capacity; of several rows drawing the same slot the last one stays, as one by one.
        index = torch.arange(self.seen, self.seen + len(rows))
        slots = torch.where(index < self.capacity, index,
                            (torch.rand(len(rows), generator=self.generator, dtype=torch.float64) * (index + 1)).long())
        kept = slots < self.capacity
        last = torch.full((self.capacity,), -1).scatter_reduce_(0, slots[kept], torch.nonzero(kept)[:, 0], "amax")
        filled = last >= 0
        self.rows[filled] = rows[last[filled]].float()
        self.seen += len(rows)

    def sample(self) -> torch.Tensor:
        return self.rows[: min(self.seen, self.capacity)]


def pool_across_ranks(sample: torch.Tensor, capacity: int, present: torch.Tensor,
                      accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's sample (padded to `capacity` rows for the all-gather, then trimmed) in rank order, and the
    per-class counts summed over the ranks: the same on every rank. The pooled sample is uniform over the
    split up to the ranks' shares differing by a batch of images."""
    padded = torch.zeros(capacity, sample.shape[1])
    padded[: len(sample)] = sample
    rows = accelerator.gather(padded.to(accelerator.device)).cpu()
    counts = accelerator.gather(torch.tensor([len(sample)], device=accelerator.device)).cpu().tolist()
    pooled = torch.cat([rows[rank * capacity : rank * capacity + count] for rank, count in enumerate(counts)])
    return pooled, accelerator.reduce(present.to(accelerator.device), reduction="sum").cpu()


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
