"""GPU throughput of every family at paper size: the bare training step, segjobs' trainer on in-memory batches,
and the trainer fed by the real loader from shards. One JSON line per case, printed as each case ends.

    python tools/bench_gpu.py                 # on one GPU, about 5 minutes; --only dino to run one family
    python tools/bench_gpu.py --smoke         # every case, 2 steps, small sizes, CPU, no compile (the suite runs it)

Cases per family (DINO ViT-S/8 2x224 + 8x96 crops, batch 32; Segmenter S/16 mask 512x512, batch 8; W-Net
224x224, batch 8, K 20):
- bare, bare+compile: the family's step written directly in torch (bf16 autocast, the ViT's fused attention,
  fused optimizer; DINO with its teacher forward, loss and EMA, W-Net with both of its losses).
- trainer, trainer+compile: segjobs' Trainer (Accelerate, schedules, metrics) over one real batch repeated.
- trainer+loader: the Trainer fed by shards.loader with the node's cores as workers, compiled.
Plus the soft N-cut loss alone (forward + backward). Images/s comes from the trainer's own metrics
(samples_per_s of the second half of the steps, so compilation is not counted) or, for the bare steps, from
the median of timed steps after warm-up. MFU: the FLOPs of one step (torch's FlopCounterMode, counted once on the
uncompiled bare step) x steps/s / the device's dense bf16 peak. Targets: trainer+compile >= 0.9x
bare+compile; trainer+loader >= 0.95x trainer+compile.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import models  # noqa: E402
from launcher.spec import apply_override, parse_spec  # noqa: E402
from launcher.training.trainer import Trainer  # noqa: E402
from models.dino import DINOLoss, ema_update  # noqa: E402
from models.wnet import reconstruction_loss, soft_ncut_loss  # noqa: E402

# Dense bf16 peak FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name(); the first match counts.
BF16_PEAK = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
             ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12)]

PAPER = {  # job spec, overrides for paper size, (batch, steps) in full and smoke mode
    "dino": ("jobs/dino_vits8.yaml", ["data.batch_size=32"],
             ["data.batch_size=2", "model.options.depth=2", "model.options.out_dim=1024",
              "data.global_crop_size=64", "data.local_crop_size=32", "data.local_crops=2"]),
    "segmenter": ("jobs/segmenter_small16.yaml", ["data.batch_size=8", "model.pretrained=null"],
                  ["data.batch_size=2", "model.pretrained=null", "data.crop_size=128", "data.scale=[512,128]",
                   "model.options.img_size=128"]),
    "wnet": ("jobs/wnet.yaml", ["data.batch_size=8"], ["data.batch_size=2", "data.image_size=32"]),
}


def device_peak() -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((peak for key, peak in BF16_PEAK if key in name), None)


def job_spec(family: str, smoke: bool, shards: Path, run_dir: Path, extra: list[str]):
    path, full, small = PAPER[family]
    raw = yaml.safe_load((REPO / path).read_text())
    for assignment in [*(small if smoke else full), f"data.train={shards}", "data.val=null", f"output_dir={run_dir}",
                       "train.epochs=null", "train.max_steps=2", "train.eval_every=null", "checkpoint.every_steps=null",
                       "checkpoint.every_minutes=null", "schedule.warmup_epochs=null", "schedule.warmup_steps=0", *extra]:
        apply_override(raw, assignment, path)
    if not torch.cuda.is_available():
        apply_override(raw, "train.precision='no'", path)
    return parse_spec(raw, path)


# ---- the bare steps ---------------------------------------------------------------------------------------
def bare_step(family: str, spec, device: torch.device, compile_model: bool):
    """(step function, number of images per step): the family's step in plain torch, inputs made up once."""
    data, autocast = spec.data, torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    fused = True if device.type == "cuda" else None
    batch = data.batch_size
    model = models.create(spec.model.name, **spec.model.options).to(device)
    wrap = torch.compile if compile_model else (lambda m: m)
    if family == "dino":
        teacher = copy.deepcopy(model).requires_grad_(False)
        student, teacher_run = wrap(model), wrap(teacher)
        loss_fn = DINOLoss(model.config.out_dim, 2 + data.local_crops, 0.04, 0.04, 0).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)
        crops = ([torch.randn(batch, 3, data.global_crop_size, data.global_crop_size, device=device)] * 2
                 + [torch.randn(batch, 3, data.local_crop_size, data.local_crop_size, device=device)] * data.local_crops)

        def step():
            with torch.no_grad(), autocast:
                target = teacher_run(crops[:2])
            with autocast:
                output = student(crops)
            loss_fn(output.float(), target.float(), 0).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema_update(teacher, model, 0.996)
    elif family == "segmenter":
        network = wrap(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, fused=fused)
        images = torch.randn(batch, 3, data.crop_size, data.crop_size, device=device)
        labels = torch.randint(0, 150, (batch, data.crop_size, data.crop_size), device=device)

        def step():
            with autocast:
                logits = network(images)
            F.cross_entropy(logits.float(), labels, ignore_index=255).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        model = model.to(memory_format=torch.channels_last)
        network = wrap(model)
        encoder_opt = torch.optim.AdamW(model.encoder.parameters(), lr=1e-4, fused=fused)
        full_opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        pixels = torch.rand(batch, 3, data.image_size, data.image_size, device=device) * 255
        images = (pixels / 255).contiguous(memory_format=torch.channels_last)

        def step():
            with autocast:
                probs, _ = network(images, decode=False)
            soft_ncut_loss(probs.float(), pixels, radius=spec.wnet.radius).backward()
            encoder_opt.step()
            full_opt.zero_grad(set_to_none=True)
            with autocast:
                _, reconstruction = network(images)
            reconstruction_loss(reconstruction.float(), images.float()).backward()
            full_opt.step()
            full_opt.zero_grad(set_to_none=True)
    return step, batch


def ncut_step(smoke: bool, device: torch.device):
    size = 32 if smoke else 224
    logits = torch.randn(2 if smoke else 8, 20, size, size, device=device)
    image = torch.rand(logits.shape[0], 3, size, size, device=device) * 255

    def step():
        soft_ncut_loss(logits.detach().requires_grad_().softmax(dim=1), image).backward()
    return step, logits.shape[0]


def step_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def time_steps(step, steps: int, warmup: int) -> float:
    """Median seconds per step after `warmup` steps (compilation happens there)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- segjobs' trainer --------------------------------------------------------------------------------------
class RepeatedBatch:
    """The train loader's first batch, yielded again and again: the trainer without data loading."""

    def __init__(self, loader):
        self.loader, self.batch = loader, next(iter(loader))
        self.epoch, self.skipped = 0, 0

    def __iter__(self):
        while True:
            yield self.batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def close(self) -> None:
        self.loader.close()


def trainer_rate(spec, in_memory: bool) -> float:
    """Images/s of the trainer's second log window (the first holds compilation and loader start-up)."""
    trainer = Trainer(spec, "bench_gpu")
    if in_memory:
        trainer.train_loader = RepeatedBatch(trainer.train_loader)
    trainer.run()
    trainer.train_loader.close()
    records = [json.loads(line) for line in (spec.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "samples_per_s" in r][-1]["samples_per_s"]


def peak_memory_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="2 steps per case, small sizes, CPU, no compile")
    parser.add_argument("--only", choices=[*PAPER, "ncut"], action="append", help="families to run (default: all)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case (after as many warm-up steps)")
    args = parser.parse_args()
    steps = 2 if args.smoke else args.steps
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    name, peak = device_peak() if device.type == "cuda" else ("cpu", None)
    workers = max(1, len(os.sched_getaffinity(0)) - 1)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as folder:  # synthetic shards and checkpoints: ~1 GB
        work = Path(folder)
        shards = work / "shards"
        from shards import ade20k
        from shards.synth import write_ade20k
        from shards.writer import write_split

        write_ade20k(work / "ade", train=16 if args.smoke else 256, val=0, height=512, width=683, seed=0)
        write_split(ade20k.list_split(work / "ade", "training")[0], shards, dataset="ade20k", split="training",
                    num_classes=150, samples_per_shard=64)

        def report(case: dict) -> None:
            print(json.dumps({"device": name, **case}), flush=True)

        for family in args.only or [*PAPER, "ncut"]:
            if family == "ncut":
                step, images = ncut_step(args.smoke, device)
                seconds = time_steps(step, steps, 1 if args.smoke else 3)
                report({"family": "ncut", "case": "bare", "images_per_s": images / seconds, "peak_mem_gb": peak_memory_gb()})
                continue
            spec = job_spec(family, args.smoke, shards, work / f"{family}_bare", [])
            flops = None
            for compiled in ([False] if args.smoke else [False, True]):
                torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
                step, images = bare_step(family, spec, device, compiled)
                flops = flops or step_flops(step)
                seconds = time_steps(step, steps, 1 if args.smoke else (steps if compiled else 3))
                report({"family": family, "case": "bare+compile" if compiled else "bare", "images_per_s": images / seconds,
                        "peak_mem_gb": peak_memory_gb(), "gflop_per_step": flops / 1e9,
                        "mfu": flops / seconds / peak if peak else None})
            trainer_cases = [("trainer", False, True), ("trainer+loader", False, False)] if args.smoke else [
                ("trainer", False, True), ("trainer+compile", True, True), ("trainer+loader", True, False)]
            for case, compiled, in_memory in trainer_cases:
                torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
                extra = [f"train.max_steps={2 * steps}", f"train.log_every={steps}", f"train.compile={str(compiled).lower()}",
                         f"data.num_workers={0 if in_memory else workers}"]
                run_spec = job_spec(family, args.smoke, shards, work / f"{family}_{case}", extra)
                rate = trainer_rate(run_spec, in_memory)
                report({"family": family, "case": case, "images_per_s": rate, "peak_mem_gb": peak_memory_gb(),
                        "mfu": flops * rate / run_spec.data.batch_size / peak if peak else None,
                        "loader_workers": None if in_memory else workers})


if __name__ == "__main__":
    main()
