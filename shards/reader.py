"""Random access to the samples of a shard, by position, through an index of the tar headers.

A shard is indexed once per process by walking its tar headers (512 bytes each; the data is seeked over,
never read), then any sample is one `pread` per member. File names split into key and suffix by webdataset's
rule (`webdataset.tariterators.base_plus_ext`, restated here because importing webdataset imports torch, and
`segjobs shard verify` must start fast), so these tars read the same here and in webdataset.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from shards import manifest as manifest_io
from shards.errors import CorruptShardError
from shards.writer import sha256_file


_KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def split_name(name: str) -> tuple[str | None, str | None]:
    """'dir/ADE_train_1.seg.png' -> ('dir/ADE_train_1', 'seg.png'): the key ends at the basename's first dot."""
    match = _KEY_AND_SUFFIX.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


@dataclass
class ShardIndex:
    """Per sample, in tar order: its key and where each member's bytes lie."""

    path: Path
    keys: list[str] = field(default_factory=list)
    members: list[dict[str, tuple[int, int]]] = field(default_factory=list)  # suffix -> (offset, size)
    damage: str | None = None  # why the tar ends early, when it does


def index_shard(path: Path) -> ShardIndex:
    """Index a shard; a truncated or damaged tar yields the samples before the damage and says why."""
    index = ShardIndex(path)
    file_size = path.stat().st_size
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                if info.offset_data + info.size > file_size:
                    index.damage = f"truncated at byte {file_size} inside {info.name}"
                    break
                key, suffix = split_name(info.name)
                if key is None:
                    continue
                if not index.keys or index.keys[-1] != key:
                    index.keys.append(key)
                    index.members.append({})
                index.members[-1][suffix.lower()] = (info.offset_data, info.size)
    except tarfile.TarError as exc:
        index.damage = f"not a readable tar after {len(index.keys)} samples ({exc})"
    return index


class ShardReader:
    """Reads samples of one split's shards by (shard number, sample number); keeps a few files open."""

    def __init__(self, split_dir: Path, shard_names: list[str], max_open: int = 8):
        self.split_dir = Path(split_dir)
        self.shard_names = shard_names
        self.max_open = max_open
        self._open: OrderedDict[int, tuple[int, ShardIndex]] = OrderedDict()

    def _shard(self, shard: int) -> tuple[int, ShardIndex]:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        path = self.split_dir / self.shard_names[shard]
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CorruptShardError(f"{path}: cannot open shard ({exc.strerror}).") from None
        entry = (fd, index_shard(path))
        self._open[shard] = entry
        if len(self._open) > self.max_open:
            old_fd, _ = self._open.popitem(last=False)[1]
            os.close(old_fd)
        return entry

    def read(self, shard: int, position: int) -> dict[str, bytes | str]:
        """{'__key__': key, suffix: bytes, ...} of the sample at `position` in tar order."""
        fd, index = self._shard(shard)
        if position >= len(index.keys):
            why = index.damage or f"it holds {len(index.keys)} samples, the manifest more"
            raise CorruptShardError(f"{index.path}: sample #{position} cannot be read: {why}.")
        sample: dict[str, bytes | str] = {"__key__": index.keys[position]}
        for suffix, (offset, size) in index.members[position].items():
            sample[suffix] = os.pread(fd, size, offset)
        return sample

    def close(self) -> None:
        for fd, _ in self._open.values():
            os.close(fd)
        self._open.clear()


def verify_split(split_dir: Path) -> list[str]:
    """Check every shard against the manifest (count, bytes, sha256, tar parses); returns the problems."""
    manifest = manifest_io.load(split_dir)
    problems = []
    for entry in manifest.shards:
        path = Path(split_dir) / entry.name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != entry.bytes:
            problems.append(f"{path}: {size} bytes, manifest says {entry.bytes}")
            continue
        if sha256_file(path) != entry.sha256:
            problems.append(f"{path}: sha256 differs from the manifest (the file changed or is damaged)")
            continue
        index = index_shard(path)
        if index.damage:
            problems.append(f"{path}: {index.damage}")
        elif len(index.keys) != entry.num_samples:
            problems.append(f"{path}: {len(index.keys)} samples, manifest says {entry.num_samples}")
        elif any("json" not in m for m in index.members):
            problems.append(f"{path}: a sample has no .json member")
    return problems


def verify_splits(split_dirs: list[Path]) -> None:
    """data.verify: every shard's size and sha256 as its manifest records them (CorruptShardError otherwise)."""
    problems = [problem for split_dir in split_dirs for problem in verify_split(split_dir)]
    if problems:
        raise CorruptShardError(f"data.verify: {len(problems)} shard(s) differ from their manifest: {'; '.join(problems[:5])}.")
