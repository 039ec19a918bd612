"""W-Net: the paper's alternating schedule, per batch an N-cut step on U-Enc then a reconstruction step on
both U-Nets; evaluation is unsupervised mIoU (clusters matched to classes by the Hungarian algorithm);
pictures of image | segments | reconstruction."""

from __future__ import annotations

import torch

from launcher.training.families.base import StepContext, Task, make_optimizer, param_groups, to_device
from launcher.training.families.registry import register_family
from launcher.training.metrics import SegmentationMetric
from launcher.training.parallel import unwrap
from launcher.training.pictures import colourize, grid, to_batch
from models.wnet import Module as UNetModule
from models.wnet import reconstruction_loss, soft_ncut_loss
from shards.transforms import WNetCrop


@register_family("wnet")
class WNetTask(Task):
    supervised = False
    ddp_find_unused_parameters = True  # the N-cut step's forward uses U-Enc only
    supports_grad_accum = False  # two optimizer steps per batch
    channels_last = True  # faster convolutions on GPUs
    shortcut_spec = "jobs/wnet.yaml"

    def __init__(self, spec, accelerator, horizon):
        super().__init__(spec, accelerator, horizon)
        self.num_segments = self.model.config.num_segments

    @staticmethod
    def train_pipeline(spec):
        return WNetCrop(size=spec.data.image_size, train=True)

    @staticmethod
    def eval_pipeline(spec):
        return WNetCrop(size=spec.data.image_size, train=False)

    def shard_units(self, module):
        return [m for m in module.modules() if isinstance(m, UNetModule)]

    def parallel_wrap(self, wrap) -> None:
        self.model = wrap(self.model)
        network = unwrap(self.model)
        decay = self.spec.optim.weight_decay
        # Two optimizers, as the paper: U-Enc alone for the N-cut loss, both U-Nets for reconstruction.
        self.optimizers = [make_optimizer(self.spec, param_groups(network.encoder, decay)),
                           make_optimizer(self.spec, param_groups(self.model, decay))]

    def train_step(self, batch: dict, context: StepContext) -> dict[str, torch.Tensor]:
        accelerator, wnet = context.accelerator, self.spec.wnet
        pixels = to_device(batch["image"], accelerator.device).float()  # 0..255: the units of sigma_i
        images = (pixels / 255.0).contiguous(memory_format=torch.channels_last)
        encoder_opt, full_opt = self.optimizers
        with accelerator.autocast():
            probs, _ = self.model(images, decode=False)
        ncut = soft_ncut_loss(probs, pixels, radius=wnet.radius, sigma_i=wnet.sigma_i, sigma_x=wnet.sigma_x)
        accelerator.backward(ncut)
        encoder_opt.step()
        full_opt.zero_grad(set_to_none=True)
        with accelerator.autocast():
            _, reconstruction = self.model(images)
        rec = reconstruction_loss(reconstruction.float(), images.float())
        accelerator.backward(rec)
        if self.spec.train.clip_grad:
            accelerator.clip_grad_norm_(self.model.parameters(), self.spec.train.clip_grad)
        full_opt.step()
        full_opt.zero_grad(set_to_none=True)
        return {"loss": (ncut + rec).detach(), "ncut": ncut.detach(), "reconstruction": rec.detach()}

    @torch.no_grad()
    def evaluate(self, loader, accelerator) -> dict:
        self.model.eval()
        metric = SegmentationMetric(loader.manifest.num_classes, num_predicted=self.num_segments)
        for batch in loader:
            images = to_device(batch["image"], accelerator.device).float() / 255.0
            with accelerator.autocast():
                probs, _ = self.model(images, decode=False)
            clusters = probs.argmax(1).cpu()
            for cluster_map, label in zip(clusters, batch["label"]):
                metric.update(cluster_map, label)
        if loader.stream.world_size > 1:  # each rank saw its share of the split
            metric.all_reduce()
        self.model.train()
        return metric.compute()

    @torch.no_grad()
    def pictures(self, samples, device) -> dict:
        """image | segmentation (a colour per cluster) | reconstruction per sample."""
        rows = []
        for image, _ in samples:  # W-Net pads to its own multiple: any size goes
            pixels = to_batch(image, image.shape[:2], device).float() / 255.0
            probs, reconstruction = self.model(pixels, decode=True)
            clusters = probs.argmax(1)[0].cpu().numpy()
            rebuilt = (reconstruction[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            rows.append([image, colourize(clusters, offset=1), rebuilt])
        return {"wnet.png": grid(rows)}
