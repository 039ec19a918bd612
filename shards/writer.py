"""Pack a source folder into WebDataset tar shards plus manifest.json.

A sample is `<key>.jpg` (the original bytes, never re-encoded), `<key>.json` and, for labelled splits,
`<key>.seg.png` (original bytes). Every file is checked before it is packed: the image and the label must
decode, the label must be single-channel 8-bit with values 0..150 and the image's size. A sample that fails
is left out and listed in the manifest's `rejected` with the reason; the run still succeeds unless strict.

Output is deterministic: members in sorted order, mtime 0, uid/gid 0, no user names, the same shard
boundaries whatever the number of workers. A shard is written to `.<name>.tmp` and renamed when complete, so an
interrupted run never leaves a partial tar under a final name; a rerun skips shards that are complete and
match their recorded sha256, and whose source files (names, sizes, mtimes) are unchanged.

Note: workers read each file once, check it and lay runs of consecutive samples out as finished tar
members (the bytes checked are the bytes packed); the parent only
appends those bytes in order and hashes them, so shards are identical for any --workers and the parallel
part is nearly all the work.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from shards import ade20k
from shards.ade20k import SourceSample
from shards.errors import BadSourceError, ShardsError, decode_failure
from shards.manifest import Manifest, Rejection, ShardEntry, write_atomic

STATE_FILE = ".shard-state.json"  # per-shard source fingerprints, for reruns; not part of the format
JSON_OVERHEAD = 512 + 1024  # tar header + a generous JSON member, used only to plan shard sizes
RUN = 32  # samples a worker checks and packs per task: large enough to amortise IPC, small for balance


@dataclass
class CheckResult:
    """What a worker found out about one source sample."""

    key: str
    reason: str | None  # None when the sample is good
    width: int = 0
    height: int = 0


@dataclass
class SplitSummary:
    split: str
    out: Path
    num_samples: int
    num_rejected: int
    num_shards: int
    reused_shards: int
    bytes: int
    seconds: float

    def line(self) -> str:
        rate = self.num_samples / max(self.seconds, 1e-9)
        mb_s = self.bytes / 1e6 / max(self.seconds, 1e-9)
        reused = f", {self.reused_shards} reused" if self.reused_shards else ""
        return (
            f"{self.split}: {self.num_samples} samples in {self.num_shards} shards{reused} "
            f"({self.bytes / 1e6:.1f} MB), {self.num_rejected} rejected, {self.seconds:.1f} s "
            f"({rate:.0f} samples/s, {mb_s:.1f} MB/s) -> {self.out}"
        )


def key_problem(key: str) -> str | None:
    """Why a source file's stem cannot be a sample key, or None. Keys hold no dot: readers split a member
    name at its first dot into key and extension."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "the file name is not valid UTF-8"
    if "." in key:
        return f"the file name's stem {key!r} holds a dot, which a sample key cannot (rename the file)"
    return None


def printable(text: str) -> str:
    """A file name as text for the manifest, whatever bytes it holds (invalid UTF-8 as \\x escapes)."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def check_sample(sample: SourceSample, image_bytes: bytes, label_bytes: bytes | None) -> CheckResult:
    """Decode the image (and label) from the bytes read once for packing; say why the sample cannot be
    used, or None."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            size = image.size
            # JPEG: libjpeg still decodes every entropy-coded block (truncation and broken streams raise
            # as in a full decode) but skips the full-resolution inverse DCT, about 30% of a full load.
            image.draft("RGB", (size[0] // 8, size[1] // 8))
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return CheckResult(sample.key, decode_failure("image", exc))
    if sample.label is None:
        return CheckResult(sample.key, None, *size)
    if label_bytes is None:
        return CheckResult(sample.key, f"no label: {sample.label.name} is missing")
    try:
        with Image.open(io.BytesIO(label_bytes)) as label:
            if label.format != "PNG" or label.mode not in ("L", "P"):
                return CheckResult(
                    sample.key, f"label is not a single-channel 8-bit PNG (format {label.format}, mode {label.mode})"
                )
            label.load()
            highest = label.getextrema()[1]  # raw indices for both modes, no copy
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return CheckResult(sample.key, decode_failure("label", exc))
    if highest > ade20k.NUM_CLASSES:
        return CheckResult(sample.key, f"label value {highest} > {ade20k.NUM_CLASSES}")
    if label.size != size:
        return CheckResult(sample.key, f"image is {size[0]}x{size[1]} but label is {label.size[0]}x{label.size[1]}")
    return CheckResult(sample.key, None, *size)


def plan_shards(samples: list[SourceSample], samples_per_shard: int, max_shard_bytes: float) -> list[list[SourceSample]]:
    """Cut the sample list into shards by count and by source bytes; depends on the sources only."""
    shards: list[list[SourceSample]] = [[]]
    size = 0
    for sample in samples:
        sample_bytes = sample.image.stat().st_size + JSON_OVERHEAD
        if sample.label is not None and sample.label.is_file():
            sample_bytes += sample.label.stat().st_size + 512
        current = shards[-1]
        if current and (len(current) >= samples_per_shard or size + sample_bytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(sample)
        size += sample_bytes
    return shards


def fingerprint(samples: list[SourceSample]) -> str:
    """Identifies a shard's sources: names, sizes and mtimes of every file."""
    digest = hashlib.sha256()
    for sample in samples:
        for path in (sample.image, sample.label):
            if path is not None:
                stat = path.stat() if path.exists() else None
                digest.update(os.fsencode(path) + f"\0{stat and stat.st_size}\0{stat and stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


BLOCK = 512
RECORD = 20 * BLOCK  # tar's record size: the archive is padded to a multiple of it, as GNU tar and tarfile do


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member, header and NUL-padded data, with fixed metadata (mtime 0, uid/gid 0, no user names)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT) + data + b"\0" * (-len(data) % BLOCK)


@dataclass
class PackedRun:
    """A run of consecutive samples of one shard, checked and laid out as tar members: in memory, or in a
    part file when a worker process packed it (a file read is far cheaper than pickling through a pipe)."""

    blocks: bytes | None
    part: Path | None
    size: int
    num_samples: int
    rejected: list[Rejection]

    def take_blocks(self) -> bytes:
        if self.part is None:
            return self.blocks
        data = self.part.read_bytes()
        self.part.unlink()
        return data


def pack_run(job: tuple[list[SourceSample], str, str, Path | None]) -> PackedRun:
    """Check each sample and lay the good ones out as tar members, kept in memory or written to `part`."""
    samples, dataset, split, part = job
    blocks, rejected, count = [], [], 0
    for sample in samples:
        problem = key_problem(sample.key)
        if problem is not None:
            rejected.append(Rejection(printable(sample.source), problem))
            continue
        try:
            image = sample.image.read_bytes()
            label = sample.label.read_bytes() if sample.label is not None and sample.label.is_file() else None
        except OSError as exc:
            rejected.append(Rejection(printable(sample.source), f"cannot read: {exc.strerror}"))
            continue
        check = check_sample(sample, image, label)
        if check.reason is not None:
            rejected.append(Rejection(printable(sample.source), check.reason))
            continue
        members = sample_members(sample, check, image, label, dataset, split)
        blocks.extend(tar_member(name, data) for name, data in members)
        count += 1
    data = b"".join(blocks)
    if part is None:
        return PackedRun(data, None, len(data), count, rejected)
    part.write_bytes(data)
    return PackedRun(None, part, len(data), count, rejected)


def write_shard(path: Path, runs: Iterator[PackedRun]) -> tuple[ShardEntry, list[Rejection]]:
    """Concatenate packed runs into `path` atomically (temp name, then rename); returns its manifest entry.

    Note: not fsynced. A shard under its final name is complete for every process (rename comes last); a
    shard a power loss damaged fails the sha256 check of the next run (rewritten) and of `shard verify`.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    sha256, size, count, rejected = hashlib.sha256(), 0, 0, []
    with open(tmp, "wb") as f:
        for run in runs:
            blocks = run.take_blocks()
            sha256.update(blocks)
            f.write(blocks)
            size += len(blocks)
            count += run.num_samples
            rejected.extend(run.rejected)
        end = b"\0" * (2 * BLOCK)  # end-of-archive marker, then padding to a whole record
        end += b"\0" * (-(size + len(end)) % RECORD)
        sha256.update(end)
        f.write(end)
        size += len(end)
    os.replace(tmp, path)
    return ShardEntry(path.name, count, size, sha256.hexdigest()), rejected


def sample_members(sample: SourceSample, check: CheckResult, image: bytes, label: bytes | None, dataset: str,
                   split: str) -> list[tuple[str, bytes]]:
    """The tar members of one good sample (the original bytes), in sorted name order."""
    suffix = "jpg" if sample.image.suffix.lower() in (".jpg", ".jpeg") else sample.image.suffix.lower()[1:]
    meta = {"dataset": dataset, "split": split, "source": sample.source, "width": check.width, "height": check.height,
            **dict(sample.meta)}
    members = [
        (f"{sample.key}.{suffix}", image),
        (f"{sample.key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()),
    ]
    if label is not None:
        members.append((f"{sample.key}.seg.png", label))
    return sorted(members)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _load_state(split_dir: Path) -> dict:
    try:
        return json.loads((split_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _reusable(split_dir: Path, recorded: dict | None, fp: str) -> bool:
    if not recorded or recorded.get("fingerprint") != fp:
        return False
    path = split_dir / recorded["entry"]["name"]
    return path.is_file() and path.stat().st_size == recorded["entry"]["bytes"] and sha256_file(path) == recorded["entry"]["sha256"]


def write_split(
    samples: list[SourceSample],
    split_dir: Path,
    *,
    dataset: str,
    split: str,
    num_classes: int,
    class_names: list[str] | None = None,
    samples_per_shard: int = 1000,
    max_shard_bytes: float = 1e9,
    workers: int = 1,
    strict: bool = False,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    rejected: Sequence[Rejection] = (),
) -> tuple[Manifest, SplitSummary]:
    """Shard one split; `progress(samples_done, bytes_done)` is called as samples are packed. num_classes and
    class_names go into the manifest (labels are stored as the source has them, 0 = "other"); `rejected`
    lists sources refused before they became samples (an unreadable video), ahead of the samples rejected here."""
    if samples_per_shard < 1 or max_shard_bytes <= 0 or workers < 1:
        raise BadSourceError("--samples-per-shard, --max-shard-bytes and --workers must be positive.")
    start = time.perf_counter()
    plan = plan_shards(samples, samples_per_shard, max_shard_bytes)
    state = _load_state(split_dir)
    planned = {shard_name(dataset, split, index): fingerprint(shard) for index, shard in enumerate(plan)}
    foreign = _foreign_shards(split_dir, dataset, split, planned, state)
    if foreign and not force:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise BadSourceError(f"{split_dir} holds {len(foreign)} shard(s) that were not written from this source: {shown}. "
                             "Sharding would replace or remove them; nothing in that folder was changed. Pass --force to replace them, "
                             "or choose another output folder.")
    split_dir.mkdir(parents=True, exist_ok=True)
    new_state: dict[str, dict] = {}
    manifest = Manifest(dataset=dataset, split=split, num_classes=num_classes, class_names=class_names,
                        rejected=list(rejected))
    reused = done = written = 0
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        for index, shard_samples in enumerate(plan):
            name = shard_name(dataset, split, index)
            fp = planned[name]
            if _reusable(split_dir, state.get(name), fp):
                record = state[name]
                reused += 1
                done += record["entry"]["num_samples"]
                written += record["entry"]["bytes"]
            else:
                jobs = [(shard_samples[i : i + RUN], dataset, split, split_dir / f".{name}.{i:08d}.part" if pool else None)
                        for i in range(0, len(shard_samples), RUN)]
                runs = pool.imap(pack_run, jobs) if pool else map(pack_run, jobs)
                entry, rejected = write_shard(split_dir / name, _reporting(runs, progress, done, written))
                done += entry.num_samples
                written += entry.bytes
                record = {"fingerprint": fp, "entry": asdict(entry), "rejected": [asdict(r) for r in rejected]}
            new_state[name] = record
            manifest.shards.append(ShardEntry(**record["entry"]))
            manifest.rejected.extend(Rejection(**r) for r in record["rejected"])
            write_atomic(split_dir / STATE_FILE, json.dumps(new_state, indent=1).encode())
    finally:
        if pool:
            pool.terminate()
    _remove_stale_shards(split_dir, dataset, split, {s.name for s in manifest.shards})
    if strict and manifest.rejected:
        first = manifest.rejected[0]
        raise ShardsError(
            f"{len(manifest.rejected)} sample(s) rejected in {split} and --strict is set; first: {first.source}: "
            f"{first.reason}. Shards were written, the manifest was not."
        )
    manifest.save(split_dir)
    total_bytes = sum(s.bytes for s in manifest.shards)
    summary = SplitSummary(
        split, split_dir, manifest.num_samples, len(manifest.rejected), len(plan), reused, total_bytes,
        time.perf_counter() - start,
    )
    return manifest, summary


def _reporting(runs: Iterator[PackedRun], progress, done: int, written: int) -> Iterator[PackedRun]:
    for run in runs:
        done, written = done + run.num_samples, written + run.size
        if progress:
            progress(done, written)
        yield run


def shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}-{split}-{index:06d}.tar"


def _shard_files(split_dir: Path, dataset: str, split: str) -> list[str]:
    pattern = re.compile(rf"^{re.escape(dataset)}-{re.escape(split)}-\d{{6}}\.tar$")
    return sorted(p.name for p in split_dir.iterdir() if pattern.match(p.name)) if split_dir.is_dir() else []


def _foreign_shards(split_dir: Path, dataset: str, split: str, planned: dict[str, str], state: dict) -> list[str]:
    """Shards in `split_dir` that this run would replace or remove although they were not written from this
    source: every shard file except those the shard state records with the planned source fingerprint (a
    rerun, or a resumed interrupted run, of the same source)."""
    return [name for name in _shard_files(split_dir, dataset, split)
            if planned.get(name) is None or (state.get(name) or {}).get("fingerprint") != planned[name]]


def _remove_stale_shards(split_dir: Path, dataset: str, split: str, keep: set[str]) -> None:
    """Delete shards that the current plan no longer has (only reached when they are this source's, or --force)."""
    for name in _shard_files(split_dir, dataset, split):
        if name not in keep:
            (split_dir / name).unlink()
