"""Sharding throughput against the floor of the work: reading and decoding every file.

    .venv/bin/python tools/bench_shard.py --images 3000 --repeats 3

Synthesises an ADE20K set (or uses --src), then times, in one run and in the same page-cache state:
  pil loop   open + fully load every image and label with Pillow (the unavoidable work, the baseline)
  tar -cf    GNU tar of the same files (the I/O floor)
  shard x1   segjobs sharding with 1 worker
  shard x2   segjobs sharding with 2 workers
and prints medians of images/s and MB/s with the ratio to the Pillow loop. Targets: x1 >= 0.8, x2 >= 1.6.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from PIL import Image

from shards import ade20k
from shards.synth import write_ade20k
from shards.writer import write_split


def pil_loop(samples) -> None:
    for sample in samples:
        with Image.open(sample.image) as image:
            image.load()
        with Image.open(sample.label) as label:
            label.load()


def tar_cf(root: Path, out: Path) -> None:
    subprocess.run(["tar", "-cf", str(out), "-C", str(root), "images/training", "annotations/training"], check=True)


def shard(samples, out: Path, workers: int) -> None:
    write_split(samples, out, dataset="ade20k", split="training", num_classes=150, workers=workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", default="384x512", help="HxW of synthetic images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--src", type=Path, help="an existing ADEChallengeData2016 folder instead of synthetic data")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_shard_"))
    try:
        root = args.src
        if root is None:
            root = work / "ADEChallengeData2016"
            height, width = (int(v) for v in args.size.split("x"))
            start = time.perf_counter()
            write_ade20k(root, train=args.images, val=0, height=height, width=width, seed=0)
            print(f"synthesised {args.images} images of {args.size} in {time.perf_counter() - start:.0f} s")
        samples, _ = ade20k.list_split(root, "training")
        total_bytes = sum(s.image.stat().st_size + s.label.stat().st_size for s in samples)
        pil_loop(samples)  # warm the page cache once so every contender reads from memory

        contenders = {
            "pil loop": lambda i: pil_loop(samples),
            "tar -cf": lambda i: tar_cf(root, work / f"plain{i}.tar"),
            "shard x1": lambda i: shard(samples, work / f"x1_{i}", 1),
            "shard x2": lambda i: shard(samples, work / f"x2_{i}", 2),
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for i in range(args.repeats):
            for name, run in contenders.items():  # interleaved, so drift hits every contender alike
                os.sync()  # no contender pays for the previous one's dirty pages
                start = time.perf_counter()
                run(i)
                times[name].append(time.perf_counter() - start)
            for path in work.glob("plain*.tar"):
                path.unlink()
            for path in work.glob("x*_*"):
                shutil.rmtree(path)

        base = statistics.median(times["pil loop"])
        print(f"{len(samples)} samples, {total_bytes / 1e6:.0f} MB, median of {args.repeats}")
        print(f"{'':10} {'images/s':>10} {'MB/s':>8} {'vs pil loop':>12}")
        for name, runs in times.items():
            t = statistics.median(runs)
            print(f"{name:10} {len(samples) / t:10.0f} {total_bytes / 1e6 / t:8.1f} {base / t:11.2f}x")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
