"""The training and evaluation stream of one split of shards, deterministic and resumable mid-epoch.

    loader = build_loader("data/shards/ade20k/training", SegmenterTrain(), batch_size=8, seed=0,
                          rank=rank, world_size=world_size, num_workers=4)
    for batch in loader:            # one epoch (the rest of it after a resume); the next loop is the next epoch
        ...
    state = loader.state_dict()     # {"epoch", "position", ...}: store it in the checkpoint
    loader.load_state_dict(state)   # the next batch is the one an uninterrupted run would have yielded

How an epoch is read
--------------------
1. The epoch's global order of all N samples is computed from (seed, epoch) alone, from manifest counts:
   shards in a shuffled order, their samples concatenated, then passed through a shuffle buffer of
   `shuffle_buffer` samples (webdataset's usual shard shuffle + sample buffer, done on indices). Evaluation
   reads in manifest order.
2. Training steps are global: step s gives rank r the samples at positions (s * W + r) * B ... + B of that
   order (W ranks, B per-rank batch size). Every rank gets the same number of batches, floor(N / (W * B)):
   the epoch's last N mod (W * B) samples of the shuffled order are dropped (a different few each epoch), so
   DDP never waits on a rank with an extra batch. Evaluation keeps every sample: the last batch may be
   short and ranks may differ by one batch, so evaluation sums must be reduced once, after the loop.
3. Loader workers take whole batches in turn; what a batch holds does not depend on which worker builds it,
   and augmentation draws from a generator seeded per sample with (seed, epoch, sample index).

So what each rank sees is a function of (seed, epoch, world size) only, and the state is one number: the
position in the epoch's global order. Resuming skips to it by arithmetic, decoding nothing; resuming with
another world size (elastic) splits the rest of the epoch among the new ranks, each remaining sample once.

Corrupt data (a truncated tar, an undecodable image) stops the run with an error naming the shard and the
key, unless `skip_corrupt`: then the sample is left out of its batch and counted in `loader.skipped`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from shards import manifest as manifest_io
from shards.errors import CorruptShardError, ShardsError, decode_failure
from shards.reader import ShardReader
from shards.transforms import reduce_zero_label

Pipeline = Callable[[Image.Image, np.ndarray | None, np.random.Generator], dict[str, Any]]
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
MAX_PIXELS = 40_000_000  # per image: ADE20K's largest are about 10 Mpx; a decompression bomb has billions


def epoch_order(shard_sizes: list[int], seed: int, epoch: int, shuffle: bool, shuffle_buffer: int) -> np.ndarray:
    """Flat sample indices (manifest order numbering) in the order epoch `epoch` reads them."""
    starts = np.concatenate([[0], np.cumsum(shard_sizes)])
    if not shuffle:
        return np.arange(starts[-1], dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    shard_order = rng.permutation(len(shard_sizes))
    stream = np.concatenate([np.arange(starts[i], starts[i + 1], dtype=np.int64) for i in shard_order])
    return buffer_shuffle(stream, shuffle_buffer, rng)


def buffer_shuffle(stream: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """webdataset's shuffle buffer: fill `size` slots, then each new item evicts a random slot."""
    if size <= 1 or len(stream) <= 1:
        return stream.copy()
    size = min(size, len(stream))
    buffer = list(stream[:size])
    slots = rng.integers(0, size, size=len(stream) - size)
    out = []
    for item, slot in zip(stream[size:].tolist(), slots.tolist()):
        out.append(buffer[slot])
        buffer[slot] = item
    tail = np.array(buffer, dtype=np.int64)
    rng.shuffle(tail)
    return np.concatenate([np.array(out, dtype=np.int64), tail])


def check_sizes(split_dir: Path, manifest) -> None:
    """Every shard is there with the size its manifest records (a stat each; `segjobs shard verify` and
    `data.verify` check the content too)."""
    for entry in manifest.shards:
        path = split_dir / entry.name
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise CorruptShardError(f"{path}: the manifest lists this shard but it cannot be read ({exc.strerror}).") from None
        if size != entry.bytes:
            raise CorruptShardError(f"{path}: {size} bytes, but {split_dir / manifest_io.MANIFEST} records {entry.bytes}; "
                                    "the shard changed since it was written (`segjobs shard verify` checks it).")


class BatchStream(torch.utils.data.IterableDataset):
    """Builds batches from positions; in loader workers, worker w builds batches w, w + n, w + 2n, ..."""

    def __init__(self, split_dir: Path, pipeline: Pipeline, *, batch_size: int, seed: int, rank: int,
                 world_size: int, train: bool, shuffle_buffer: int, skip_corrupt: bool):
        manifest = manifest_io.load(split_dir)
        check_sizes(Path(split_dir), manifest)
        self.split_dir = Path(split_dir)
        self.shard_names = [s.name for s in manifest.shards]
        self.shard_sizes = [s.num_samples for s in manifest.shards]
        self.starts = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self.num_samples = int(self.starts[-1])
        self.manifest = manifest
        self.pipeline = pipeline
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.train, self.shuffle_buffer, self.skip_corrupt = train, shuffle_buffer, skip_corrupt
        self.start_epoch, self.start_position = 0, 0
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.shard_sizes, self.seed, epoch, self.train, self.shuffle_buffer)}
        return self._orders[epoch]

    def batches_left(self, position: int) -> int:
        """This rank's batches from `position` to the end of an epoch."""
        left = self.num_samples - position
        per_step = self.world_size * self.batch_size
        if self.train:
            return left // per_step
        return max(0, -(-(left - self.rank * self.batch_size) // per_step))

    def batch_positions(self, epoch: int, position: int) -> Iterator[tuple[int, np.ndarray]]:
        """(epoch, flat sample indices) of this rank's batches from (epoch, position) on; endless when training."""
        while True:
            order = self.order(epoch)
            for step in range(self.batches_left(position)):
                first = position + (step * self.world_size + self.rank) * self.batch_size
                yield epoch, order[first : first + self.batch_size]
            if not self.train:
                return
            epoch, position = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = ShardReader(self.split_dir, self.shard_names)
        try:
            stream = self.batch_positions(self.start_epoch, self.start_position)
            for n, (epoch, indices) in enumerate(stream):
                if n % workers == worker:
                    yield self.build_batch(reader, epoch, indices)
        finally:
            reader.close()

    def build_batch(self, reader: ShardReader, epoch: int, indices: np.ndarray) -> dict[str, Any]:
        samples, errors = [], []
        for flat in indices.tolist():
            try:
                samples.append(self.load_sample(reader, epoch, flat))
            except CorruptShardError as exc:
                if not self.skip_corrupt:
                    return {"error": str(exc)}
                errors.append(str(exc))
        if not samples:
            return {"error": f"every sample of a batch is corrupt (skipping is on); the last: {errors[-1]}"}
        batch = collate(samples)
        batch["skipped"] = len(errors)
        return batch

    def load_sample(self, reader: ShardReader, epoch: int, flat: int) -> dict[str, Any]:
        shard = int(np.searchsorted(self.starts, flat, side="right") - 1)
        raw = reader.read(shard, flat - int(self.starts[shard]))
        key = raw["__key__"]
        where = f"{self.split_dir / self.shard_names[shard]}: sample {key}"
        suffix = next((s for s in IMAGE_SUFFIXES if s in raw), None)
        if suffix is None:
            raise CorruptShardError(f"{where} has no image member.")
        image = decode(raw[suffix], where, "image")
        if image.mode != "RGB":  # convert() would copy an RGB image
            image = image.convert("RGB")
        label = None
        if self.manifest.labelled:
            if "seg.png" not in raw:  # the writer packs a label with every sample of a labelled split
                raise CorruptShardError(f"{where} has no label member, though manifest.json says the split is labelled.")
            # Raw indices: Pillow keeps palette PNGs as indices ("P"), unlike converting to greyscale.
            label = np.asarray(decode(raw["seg.png"], where, "label"))
            if label.ndim != 2:
                raise CorruptShardError(f"{where}: the label is not a single-channel image (shape {label.shape}).")
            if self.manifest.reduce_zero_label:
                label = reduce_zero_label(label)
        rng = np.random.default_rng([self.seed, epoch, flat])
        sample = self.pipeline(image, label, rng)
        sample["key"] = key
        return sample


def decode(data: bytes, where: str, what: str) -> Image.Image:
    """An image member decoded, at most MAX_PIXELS pixels (checked from the header, before decoding)."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_PIXELS:
            raise CorruptShardError(f"{where}: the {what} is {image.width} x {image.height} pixels, over the "
                                    f"{MAX_PIXELS:,} a sample may have.")
        image.load()
        return image
    except CorruptShardError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever Pillow raises on these bytes (DecompressionBombError too) is the file's
        raise CorruptShardError(f"{where}: the {decode_failure(what, exc)}.") from None


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack arrays of equal shape into tensors; lists of tensors where shapes differ (eval sizes vary)."""
    batch: dict[str, Any] = {}
    for name, first in samples[0].items():
        values = [s[name] for s in samples]
        if isinstance(first, np.ndarray):
            batch[name] = _stack(values)
        elif isinstance(first, list):  # multi-crop: one stacked tensor per crop
            batch[name] = [_stack([v[i] for v in values]) for i in range(len(first))]
        else:
            batch[name] = values
    return batch


def _stack(arrays: list[np.ndarray]) -> torch.Tensor | list[torch.Tensor]:
    if all(a.shape == arrays[0].shape for a in arrays):
        return torch.from_numpy(np.stack(arrays))
    return [torch.from_numpy(a) for a in arrays]


class ShardLoader:
    """Iterating yields the rest of the current epoch, then moves to the next epoch. See the module docstring."""

    def __init__(self, stream: BatchStream, num_workers: int, pin_memory: bool):
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.epoch, self.position, self.skipped = 0, 0, 0
        self._batches: Iterator[dict[str, Any]] | None = None

    @property
    def manifest(self):
        """The split's manifest: num_classes, class names, label offset."""
        return self.stream.manifest

    def __len__(self) -> int:
        """Batches per full epoch on this rank."""
        return self.stream.batches_left(0)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (nothing changes when already at that point)."""
        if (epoch, 0) != (self.epoch, self.position):
            self._restart(epoch, 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.stream.train and self.position >= self.stream.num_samples:
            self._restart(self.epoch, 0)  # evaluation: each loop is a full pass
        if self._batches is None:
            self._start()
        per_step = self.stream.world_size * self.stream.batch_size
        for _ in range(self.stream.batches_left(self.position)):
            batch = next(self._batches)
            if "error" in batch:
                self.close()
                raise CorruptShardError(batch["error"])
            self.skipped += batch.pop("skipped")
            self.position += per_step
            yield batch
        if self.stream.train:
            self.epoch, self.position = self.epoch + 1, 0
        else:
            self.position = self.stream.num_samples
            self.close()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "skipped": self.skipped, "seed": self.stream.seed,
                "num_samples": self.stream.num_samples, "world_size": self.stream.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position; the world size may differ (the rest of the epoch is re-split)."""
        if state["num_samples"] != self.stream.num_samples or state["seed"] != self.stream.seed:
            raise ShardsError(
                f"cannot resume the loader of {self.stream.split_dir}: the checkpoint was taken with "
                f"{state['num_samples']} samples and seed {state['seed']}, this split has "
                f"{self.stream.num_samples} samples and the seed is {self.stream.seed}."
            )
        self.skipped = state["skipped"]
        self._restart(state["epoch"], state["position"])

    def close(self) -> None:
        """Stop the loader workers now (they otherwise prefetch into the next epoch until garbage-collected)."""
        shutdown = getattr(self._batches, "_shutdown_workers", None)
        if shutdown:
            shutdown()
        self._batches = None

    def _restart(self, epoch: int, position: int) -> None:
        self.close()
        self.epoch, self.position = epoch, position

    def _start(self) -> None:
        self.stream.start_epoch, self.stream.start_position = self.epoch, self.position
        # A private generator: creating the iterator would otherwise draw from the global torch RNG, and a
        # resumed run (which creates it at another moment) would see different dropout masks.
        loader = torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.stream.seed),
        )
        self._batches = iter(loader)


def build_loader(split_dir: str | Path, pipeline: Pipeline, *, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, train: bool = True, shuffle_buffer: int = 2000,
                 skip_corrupt: bool = False, pin_memory: bool = False) -> ShardLoader:
    """The stream of batches of one split for one rank; `train=False` reads every sample once, in order.

    Batches are dicts: the pipeline's arrays stacked into uint8 tensors ("image" B x 3 x H x W, "label"
    B x H x W with 255 = ignore, or "crops": a list of tensors; "photometric": float32 draws, per view a tensor
    for DINO, when the pipeline leaves its photometric steps to the device), plus "key": the samples' keys.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
        raise ValueError(f"bad loader arguments: batch_size={batch_size}, rank={rank}/{world_size}, workers={num_workers}")
    stream = BatchStream(Path(split_dir), pipeline, batch_size=batch_size, seed=seed, rank=rank,
                         world_size=world_size, train=train, shuffle_buffer=shuffle_buffer, skip_corrupt=skip_corrupt)
    if train and stream.batches_left(0) == 0:
        raise ShardsError(
            f"{split_dir}: {stream.num_samples} samples cannot fill one step of {world_size} rank(s) x "
            f"{batch_size} samples; lower data.batch_size or add data."
        )
    return ShardLoader(stream, num_workers, pin_memory)
