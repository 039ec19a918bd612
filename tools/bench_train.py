"""Trainer throughput against the bare model step, measured in the same run.

    .venv/bin/python tools/bench_train.py                  # CPU: the three demo specs, small sizes
    .venv/bin/python tools/bench_train.py --gpu            # GPU: DINO ViT-S/8 and Segmenter S/16-mask at paper sizes

For each case: images/s through `launcher.training.trainer` (loader workers, augmentation, autocast, optimizer, schedules,
logging) and images/s of the bare step (forward, backward, optimizer step on random tensors of the same shapes,
already on the device), each after warm-up steps; the ratio is what to compare (target >= 0.90 on a GPU).
Synthetic shards are made first (images sized for the case).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import models
from launcher.spec import load_spec
from launcher.training.trainer import Trainer
from models.dino import DINOLoss
from shards import ade20k
from shards.synth import write_ade20k
from shards.writer import write_split

REPO = Path(__file__).resolve().parents[1]

CPU_CASES = {
    "demo_segmenter": ["train.max_steps=30"],
    "demo_wnet": ["train.max_steps=30"],
    "demo_dino": ["train.max_steps=30"],
}
GPU_CASES = {  # reference sizes: DINO ViT-S/8 2x224 + 8x96 crops, batch 32; Segmenter S/16-mask at 512, batch 8
    "dino_vits8": ["train.max_steps=60", "data.batch_size=32", "data.local_crops=8", "train.precision=bf16",
                   "data.num_workers=12", "model.options={out_dim: 65536, drop_path_rate: 0.1}"],
    "segmenter_small16": ["train.max_steps=80", "data.batch_size=8", "train.precision=bf16", "data.num_workers=12"],
}


def make_shards(work: Path, count: int, height: int, width: int) -> Path:
    root = work / "ADEChallengeData2016"
    write_ade20k(root, train=count, val=0, height=height, width=width, seed=0)
    samples, _ = ade20k.list_split(root, "training")
    write_split(samples, work / "shards" / "training", dataset="ade20k", split="training", num_classes=150,
                samples_per_shard=200, workers=2)
    return work / "shards" / "training"


def trainer_rate(spec_file: Path, overrides: list[str], warmup_steps: int) -> float:
    spec = load_spec(spec_file, overrides)
    trainer = Trainer(spec, str(spec_file))
    trainer.run()
    records = [json.loads(line) for line in (spec.run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r and r["step"] > warmup_steps]
    return statistics.median(rates)


def bare_rate(spec_file: Path, overrides: list[str], steps: int, warmup: int) -> float:
    """Forward, backward and optimizer step on random inputs already on the device."""
    spec = load_spec(spec_file, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = models.create(spec.model.name, **spec.model.options).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = torch.bfloat16 if spec.train.precision == "bf16" else None
    batch = spec.data.batch_size
    family = models.entry(spec.model.name).family
    if family == "dino":
        teacher = models.create(spec.model.name, **spec.model.options).to(device).requires_grad_(False)
        crops = [torch.randn(batch, 3, spec.data.global_crop_size, spec.data.global_crop_size, device=device)] * 2
        crops += [torch.randn(batch, 3, spec.data.local_crop_size, spec.data.local_crop_size, device=device)] * spec.data.local_crops
        loss_fn = DINOLoss(model.config.out_dim, len(crops), 0.04, 0.04, 0).to(device)

        def loss():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                target = teacher(crops[:2])
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(crops)
            return loss_fn(out.float(), target.float(), 0)
    elif family == "segmenter":
        images = torch.randn(batch, 3, spec.data.crop_size, spec.data.crop_size, device=device)
        labels = torch.randint(0, 150, (batch, spec.data.crop_size, spec.data.crop_size), device=device)

        def loss():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                return F.cross_entropy(model(images).float(), labels)
    else:
        images = torch.rand(batch, 3, spec.data.image_size, spec.data.image_size, device=device)
        from models.wnet import soft_ncut_loss

        def loss():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                probs, reconstruction = model(images)
            return soft_ncut_loss(probs, images * 255) + F.mse_loss(reconstruction.float(), images)
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the GPU cases (paper sizes)")
    args = parser.parse_args()
    cases = GPU_CASES if args.gpu else CPU_CASES
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        shards = make_shards(work, 600 if args.gpu else 200, 512 if args.gpu else 256, 683 if args.gpu else 320)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        print(f"trainer vs bare step on {device}")
        print(f"{'spec':20} {'trainer img/s':>14} {'bare img/s':>11} {'ratio':>7}")
        for name, overrides in cases.items():
            overrides = overrides + [f"data.train={shards}", "data.val=null", f"output_dir={work / name}",
                                     "train.log_every=5", "checkpoint.every_steps=100000"]
            spec_file = REPO / "jobs" / f"{name}.yaml"
            trainer = trainer_rate(spec_file, overrides, warmup_steps=10)
            bare = bare_rate(spec_file, overrides, steps=20, warmup=5)
            print(f"{name:20} {trainer:14.1f} {bare:11.1f} {trainer / bare:6.2f}x")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
