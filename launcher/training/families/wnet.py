"""W-Net: the paper's alternating schedule, per batch an N-cut step on U-Enc then a reconstruction step on
both U-Nets; evaluation on whole images: unsupervised scores of its K segments (Hungarian one-to-one and
many-to-one) and the reconstruction's PSNR, with and without the paper's post-processing (wnet.postprocess:
a dense CRF, then merging adjacent segments by mean colour); pictures of image | segments | reconstruction, for
validation samples and for every frame of a video."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from launcher.training.families.base import StepContext, Task, make_optimizer, param_groups, to_device
from launcher.training.families.registry import register_family
from launcher.training.metrics import SegmentationMetric
from launcher.training.parallel import unwrap
from launcher.training.pictures import colourize, grid, palette, to_batch
from models.crf import dense_crf, merge_segments
from models.wnet import Module as UNetModule
from models.wnet import reconstruction_loss, soft_ncut_loss
from shards.transforms import WholeImage, WNetCrop


@register_family("wnet")
class WNetTask(Task):
    supervised = False
    ddp_find_unused_parameters = True  # the N-cut step's forward uses U-Enc only
    supports_grad_accum = False  # two optimizer steps per batch
    channels_last = True  # faster convolutions on GPUs
    shortcut_spec = "jobs/wnet.yaml"
    prediction_files = ("segments.png",)  # segjobs predict writes <image stem>_<name>

    def __init__(self, spec, accelerator, horizon):
        super().__init__(spec, accelerator, horizon)
        self.num_segments = self.model.config.num_segments

    @staticmethod
    def train_pipeline(spec):
        return WNetCrop(size=spec.data.image_size, train=True)

    @staticmethod
    def eval_pipeline(spec):
        return WholeImage()

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
        rec = reconstruction_loss(reconstruction.float(), images.float(), reduction=wnet.reconstruction)
        accelerator.backward(rec)
        if self.spec.train.clip_grad:
            accelerator.clip_grad_norm_(self.model.parameters(), self.spec.train.clip_grad)
        full_opt.step()
        full_opt.zero_grad(set_to_none=True)
        return {"loss": (ncut + rec).detach(), "ncut": ncut.detach(), "reconstruction": rec.detach()}

    @torch.no_grad()
    def evaluate(self, loader, accelerator) -> dict:
        """Scores of the K segments on whole images, and the reconstruction's PSNR (dB, pixels in 0..1, averaged
        over images). With wnet.postprocess set, the post-processed segments are scored too (keys post_*)."""
        self.model.eval()
        classes, postprocess = loader.manifest.num_classes, self.spec.wnet.postprocess != "none"
        raw = SegmentationMetric(classes, num_predicted=self.num_segments)
        post = SegmentationMetric(classes, num_predicted=self.num_segments)
        psnr = torch.zeros(2, dtype=torch.float64)  # sum of PSNRs, images
        for batch in loader:
            for image, label in zip(batch["image"], batch["label"]):
                pixels = to_device(image[None], accelerator.device).float() / 255.0
                with accelerator.autocast():
                    probs, reconstruction = self.model(pixels, decode=True)
                error = (reconstruction.float().clamp(0, 1) - pixels).square().mean().item()
                psnr += torch.tensor([10 * math.log10(1 / max(error, 1e-10)), 1.0], dtype=torch.float64)
                raw.update(probs.argmax(1)[0].cpu(), label)
                if postprocess:
                    post.update(self.postprocess(probs[0].float(), image), label)
        if loader.stream.world_size > 1:  # each rank saw its share of the split
            raw.all_reduce()
            post.all_reduce()
            if dist.is_available() and dist.is_initialized():
                psnr = psnr.to(accelerator.device)
                dist.all_reduce(psnr)
        self.model.train()
        result = {**raw.compute(), "psnr": float(psnr[0] / psnr[1]) if psnr[1] else 0.0}
        if postprocess:
            result["postprocess"] = self.spec.wnet.postprocess
            result.update({f"post_{key}": value for key, value in post.compute().items() if key != "iou"})
        return result

    def postprocess(self, probs: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Segments (H x W, on the CPU) after wnet.postprocess: the dense CRF on U-Enc's probabilities (K x H x W)
        and the image (3 x H x W uint8), on the probabilities' device, then, for crf+merge, merging down to
        wnet.merge_segments on the CPU."""
        pixels = image.permute(1, 2, 0)
        segments = dense_crf(probs, pixels.to(probs.device)).argmax(0).cpu()
        if self.spec.wnet.postprocess == "crf+merge":
            segments = merge_segments(segments, pixels.cpu(), target=self.spec.wnet.merge_segments)
        return segments

    @torch.no_grad()
    def pictures(self, samples, device) -> dict:
        """image | segments (post-processed as wnet.postprocess says) | reconstruction per sample."""
        postprocess = self.spec.wnet.postprocess != "none"
        return {"wnet.png": grid([self.tiles(image, device, postprocess) for image, _ in samples])}

    @torch.no_grad()
    def video_frame(self, image, device):
        """image | segments | reconstruction. The segments are U-Enc's K clusters as they are: post-processing
        (the CRF, the merging) numbers its segments anew on every frame, so their colours would flicker."""
        return grid([self.tiles(image, device, postprocess=False)])

    @torch.no_grad()
    def predictions(self, images, device, label_offset: int = 1) -> list[dict]:
        """Per image, segments.png: a palette PNG whose pixel values are the segment indices (0 .. K-1, after
        wnet.postprocess when set) and whose colours are the pictures' cluster colours. Images of one size go
        through U-Enc together."""
        written: list[dict | None] = [None] * len(images)
        postprocess = self.spec.wnet.postprocess != "none"
        for size in dict.fromkeys(image.shape[:2] for image in images):
            indices = [i for i, image in enumerate(images) if image.shape[:2] == size]
            batch = torch.cat([to_batch(images[i], size, device) for i in indices])
            probs, _ = self.model(batch.float() / 255.0, decode=False)
            for row, i in enumerate(indices):
                segments = self.postprocess(probs[row].float(), batch[row]) if postprocess else probs[row].argmax(0)
                picture = Image.fromarray(segments.cpu().numpy().astype(np.uint8), mode="P")
                picture.putpalette(np.roll(palette(256), -1, axis=0).ravel().tolist())  # colourize(offset=1)'s colours
                written[i] = {"segments.png": picture}
        return written

    def tiles(self, image, device, postprocess: bool) -> list:
        """[image, segments in the cluster colours, reconstruction] for one H x W x 3 uint8 image; W-Net pads to
        its own multiple, so any size goes."""
        batch = to_batch(image, image.shape[:2], device)
        probs, reconstruction = self.model(batch.float() / 255.0, decode=True)
        segments = self.postprocess(probs[0].float(), batch[0]) if postprocess else probs.argmax(1)[0]
        rebuilt = (reconstruction[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return [image, colourize(segments.cpu().numpy(), offset=1), rebuilt]
