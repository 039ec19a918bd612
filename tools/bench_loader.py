"""Loader throughput: every family's training pipeline per CPU core against a torchvision/Pillow baseline, and the
Segmenter pipeline from shards vs. from the raw ADE20K folder.

    .venv/bin/python tools/bench_loader.py --images 400 --repeats 3
    .venv/bin/python tools/bench_loader.py --part pipelines --pipeline-images 64 --repeats 5

Per core (--part pipelines): one thread, each pipeline over the same JPEG bytes of ADE20K-sized synthetic images
(512 high, 512..700 wide), decode included, images/s as medians of interleaved repeats, and the ratio to its
baseline: DINO's multi-crop against main_dino.py's DataAugmentationDINO built from torchvision (ToTensor and
Normalize included, as it runs them in the loader), with photometric steps in the loader and left to the device
(data.photometric); Segmenter's mmseg pipeline against torchvision/Pillow steps with mmseg's parameters (keep-ratio
resize 0.5..2 x (2048, 512), crop 512 with cat_max_ratio 0.75, flip, ColorJitter in place of
PhotoMetricDistortion, Normalize, pad); W-Net's crop against Resize(224) + RandomCrop(224) + flip.

Shards vs. raw (--part shards):
both sides decode with Pillow and run the same mmseg ADE20K pipeline (random resize 0.5-2.0 of
(2048, 512), crop 512 with cat_max_ratio 0.75, flip, photometric distortion, pad) into batches of 8
through torch's DataLoader; only where the bytes come from differs (a tar index and pread vs. one file
open per image and label). Prints samples/s for 1 and 2 workers, medians of interleaved repeats, and the
ratio shards / raw. Target: >= 1.0x. It also times reading the bytes alone (no decode), in the epoch's
order, which is where the two differ: one pread per member of an open tar vs. two file opens per sample.
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms
from torchvision.transforms import functional as TF

from shards import ade20k
from shards.loader import BatchStream, build_loader, collate
from shards.reader import ShardReader
from shards.synth import class_ids, encode, render_scene, write_ade20k
from shards.transforms import DinoMultiCrop, SegmenterTrain, WNetCrop, reduce_zero_label, rescale_size
from shards.writer import write_split

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class RandomGaussianBlur:
    """main_dino.py's utils.GaussianBlur: Pillow's GaussianBlur, radius uniform in 0.1..2, with probability p."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, image):
        if random.random() > self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class RandomSolarize:
    """main_dino.py's utils.Solarization."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, image):
        return ImageOps.solarize(image) if random.random() < self.p else image


def torchvision_dino():
    """main_dino.py's DataAugmentationDINO with the paper's parameters: (PIL image) -> 2 + 8 normalised tensors."""
    bicubic = transforms.InterpolationMode.BICUBIC
    flip_and_color_jitter = transforms.Compose([
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.RandomApply([transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
    ])
    normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(*IMAGENET)])
    global1 = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic),
                                  flip_and_color_jitter, RandomGaussianBlur(1.0), normalize])
    global2 = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic),
                                  flip_and_color_jitter, RandomGaussianBlur(0.1), RandomSolarize(0.2), normalize])
    local = transforms.Compose([transforms.RandomResizedCrop(96, scale=(0.05, 0.4), interpolation=bicubic),
                                flip_and_color_jitter, RandomGaussianBlur(0.5), normalize])
    return lambda image, label: [global1(image), global2(image), *(local(image) for _ in range(8))]


def torchvision_mmseg(crop: int = 512, scale: tuple[int, int] = (2048, 512)):
    """mmseg's ADE20K training steps from torchvision's functional ops on PIL images: keep-ratio resize by a
    random ratio in 0.5..2 (bilinear; the label nearest), a 512 crop whose largest class covers < 75% (10 tries),
    flip 0.5, ColorJitter with the distortion's ranges (brightness 32/255, contrast and saturation 0.5, hue
    18/180) for PhotoMetricDistortion, ToTensor + Normalize, then padding to 512 (image 0, label 255)."""
    jitter = transforms.ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=18 / 180)
    normalize = transforms.Normalize(*IMAGENET)

    def pipeline(image, label):
        ratio = random.uniform(0.5, 2.0)
        width, height = rescale_size(*image.size, (int(scale[0] * ratio), int(scale[1] * ratio)))
        image = TF.resize(image, [height, width], transforms.InterpolationMode.BILINEAR)
        label = TF.resize(label, [height, width], transforms.InterpolationMode.NEAREST)
        pixels = np.asarray(label)
        for _ in range(10):
            top, left = random.randint(0, max(height - crop, 0)), random.randint(0, max(width - crop, 0))
            counts = np.bincount(pixels[top : top + crop, left : left + crop].ravel(), minlength=256)[:255]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < 0.75:
                break
        image, label = TF.crop(image, top, left, crop, crop), TF.crop(label, top, left, crop, crop)
        if random.random() < 0.5:
            image, label = TF.hflip(image), TF.hflip(label)
        tensor = normalize(TF.to_tensor(jitter(image)))
        padding = [0, 0, crop - tensor.shape[-1], crop - tensor.shape[-2]]
        return TF.pad(tensor, padding, fill=0), TF.pad(TF.pil_to_tensor(label), padding, fill=255)

    return pipeline


def torchvision_wnet(size: int = 224):
    """W-Net's training crop from torchvision: Resize(224) (short side, bilinear), RandomCrop(224), flip 0.5."""
    steps = transforms.Compose([transforms.Resize(size), transforms.RandomCrop(size), transforms.RandomHorizontalFlip(),
                                transforms.PILToTensor()])
    return lambda image, label: steps(image)


def ade20k_sized_jpegs(count: int) -> list[tuple[bytes, bytes]]:
    """(JPEG, label PNG) bytes of synthetic scenes 512 high and 512..700 wide, as ADE20K's typical images."""
    out = []
    for i in range(count):
        rng = np.random.default_rng([11, i])
        image, label = render_scene(rng, 512, int(rng.integers(512, 701)), class_ids(8))
        out.append(encode(image, label))
    return out


def per_core(images: int, repeats: int) -> None:
    """Each family's pipeline vs. its baseline, one thread, decode included: images/s (see the module docstring)."""
    data = ade20k_sized_jpegs(images)

    def segjobs(pipeline, labelled: bool):
        def run() -> None:
            for n, (jpeg, png) in enumerate(data):
                image = Image.open(io.BytesIO(jpeg))
                image.load()
                label = reduce_zero_label(np.asarray(Image.open(io.BytesIO(png)))) if labelled else None
                pipeline(image, label, np.random.default_rng([0, 0, n]))
        return run

    def baseline(pipeline, labelled: bool):
        def run() -> None:
            random.seed(0)
            torch.manual_seed(0)
            for jpeg, png in data:
                image = Image.open(io.BytesIO(jpeg)).convert("RGB")
                label = Image.open(io.BytesIO(png)) if labelled else None
                if labelled:
                    label = Image.fromarray(reduce_zero_label(np.asarray(label)))
                pipeline(image, label)
        return run

    rows = [  # name, segjobs, baseline
        ("DINO multi-crop, 2 x 224 + 8 x 96", segjobs(DinoMultiCrop(), False), "dino"),
        ("DINO, photometric on the device", segjobs(DinoMultiCrop(photometric_on_device=True), False), "dino"),
        ("Segmenter mmseg ADE20K, crop 512", segjobs(SegmenterTrain(), True), "mmseg"),
        ("Segmenter, photometric on the device", segjobs(SegmenterTrain(photometric_on_device=True), True), "mmseg"),
        ("W-Net crop 224", segjobs(WNetCrop(), False), "wnet"),
    ]
    baselines = {"dino": baseline(torchvision_dino(), False), "mmseg": baseline(torchvision_mmseg(), True),
                 "wnet": baseline(torchvision_wnet(), False)}
    timings: dict[str, list[float]] = {}
    for _ in range(repeats):  # interleaved: a slow moment of the machine touches every pipeline alike
        for name, run in [*((name, run) for name, run, _ in rows), *baselines.items()]:
            start = time.perf_counter()
            run()
            timings.setdefault(name, []).append(len(data) / (time.perf_counter() - start))
    print(f"Per core (1 thread), {images} ADE20K-sized JPEGs (512 x 512..700), decode included, images/s, "
          f"median of {repeats} interleaved repeats")
    print(f"{'pipeline':<38} {'segjobs':>8} {'baseline':>9} {'ratio':>7}")
    for name, _, reference in rows:
        ours, theirs = statistics.median(timings[name]), statistics.median(timings[reference])
        print(f"{name:<38} {ours:8.1f} {theirs:9.1f} {ours / theirs:6.2f}x")


class RawFolder(torch.utils.data.Dataset):
    """The baseline: the same decode and pipeline, reading ADEChallengeData2016 files directly."""

    def __init__(self, root: Path, pipeline):
        self.samples, _ = ade20k.list_split(root, "training")
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = Image.open(sample.image).convert("RGB")
        label = reduce_zero_label(np.asarray(Image.open(sample.label)))
        out = self.pipeline(image, label, np.random.default_rng([0, 0, index]))
        out["key"] = sample.key
        return out


def read_raw_bytes(samples, order) -> int:
    return sum(len(samples[i].image.read_bytes()) + len(samples[i].label.read_bytes()) for i in order)


def read_shard_bytes(reader: ShardReader, starts: np.ndarray, order) -> int:
    total = 0
    for flat in order:
        shard = int(np.searchsorted(starts, flat, side="right") - 1)
        sample = reader.read(shard, flat - int(starts[shard]))
        total += len(sample["jpg"]) + len(sample["seg.png"])
    return total


def drain(batches) -> int:
    return sum(len(batch["key"]) for batch in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", default="512x683", help="HxW of synthetic images (ADE20K's typical size)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", choices=["all", "pipelines", "shards"], default="all")
    parser.add_argument("--pipeline-images", type=int, default=48, help="images per repeat of the per-core part")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part in ("all", "pipelines"):
        per_core(args.pipeline_images, args.repeats)
    if args.part in ("all", "shards"):
        shards_vs_raw(args)


def shards_vs_raw(args) -> None:
    """The Segmenter pipeline through the loader from shards vs. from the raw folder (see the module docstring)."""
    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        root = work / "ADEChallengeData2016"
        height, width = (int(v) for v in args.size.split("x"))
        write_ade20k(root, train=args.images, val=0, height=height, width=width, seed=0)
        samples, _ = ade20k.list_split(root, "training")
        write_split(samples, work / "shards", dataset="ade20k", split="training", num_classes=150,
                    samples_per_shard=100)
        pipeline = SegmenterTrain()

        def from_shards(workers: int) -> int:
            loader = build_loader(work / "shards", pipeline, batch_size=args.batch_size, num_workers=workers)
            try:
                return drain(loader)
            finally:
                loader.close()

        def from_raw(workers: int) -> int:
            loader = torch.utils.data.DataLoader(RawFolder(root, pipeline), batch_size=args.batch_size, shuffle=True,
                                                 drop_last=True, num_workers=workers, collate_fn=collate)
            return drain(loader)

        rates: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeats):
            for workers in (1, 2):
                for name, run in (("raw", from_raw), ("shards", from_shards)):
                    start = time.perf_counter()
                    count = run(workers)
                    rates.setdefault((name, workers), []).append(count / (time.perf_counter() - start))

        stream = BatchStream(work / "shards", pipeline, batch_size=1, seed=0, rank=0, world_size=1, train=True,
                             shuffle_buffer=2000, skip_corrupt=False)
        order = stream.order(0)
        reader = ShardReader(work / "shards", stream.shard_names)
        start = time.perf_counter()
        for shard in range(len(stream.shard_names)):
            reader.read(shard, 0)  # builds the shard's index, as each loader worker does once
        index_ms = (time.perf_counter() - start) * 1e3 / len(stream.shard_names)
        read_times = {"raw": [], "shards": []}
        for _ in range(args.repeats):
            for name, read in (("raw", lambda: read_raw_bytes(samples, order)),
                               ("shards", lambda: read_shard_bytes(reader, stream.starts, order))):
                start = time.perf_counter()
                read()
                read_times[name].append(time.perf_counter() - start)
        raw_read, shard_read = (statistics.median(read_times[k]) for k in ("raw", "shards"))
        print(f"reading bytes only, epoch order: raw files {len(order) / raw_read:.0f} samples/s, shards "
              f"{len(order) / shard_read:.0f} samples/s ({raw_read / shard_read:.2f}x); indexing a 100-sample "
              f"shard once per worker: {index_ms:.1f} ms")
        print(f"Segmenter training pipeline, {args.images} images of {args.size}, batch {args.batch_size}, "
              f"median of {args.repeats}")
        print(f"{'workers':>7} {'raw samples/s':>14} {'shards samples/s':>17} {'shards / raw':>13}")
        for workers in (1, 2):
            raw = statistics.median(rates[("raw", workers)])
            sharded = statistics.median(rates[("shards", workers)])
            print(f"{workers:7} {raw:14.1f} {sharded:17.1f} {sharded / raw:12.2f}x")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
