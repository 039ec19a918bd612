"""Loader throughput: the Segmenter training pipeline from shards vs. from the raw ADE20K folder.

    .venv/bin/python tools/bench_loader.py --images 400 --repeats 3

Both sides decode with Pillow and run the same mmseg ADE20K pipeline (random resize 0.5-2.0 of
(2048, 512), crop 512 with cat_max_ratio 0.75, flip, photometric distortion, pad) into batches of 8
through torch's DataLoader; only where the bytes come from differs (a tar index and pread vs. one file
open per image and label). Prints samples/s for 1 and 2 workers, medians of interleaved repeats, and the
ratio shards / raw. Target: >= 1.0x. It also times reading the bytes alone (no decode), in the epoch's
order, which is where the two differ: one pread per member of an open tar vs. two file opens per sample.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shards import ade20k
from shards.loader import BatchStream, build_loader, collate
from shards.reader import ShardReader
from shards.synth import write_ade20k
from shards.transforms import SegmenterTrain, reduce_zero_label
from shards.writer import write_split


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
    args = parser.parse_args()
    torch.set_num_threads(1)

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
