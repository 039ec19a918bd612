"""manifest.json: what a split directory of shards holds.

    {"format": "segjobs-shards/1", "dataset": "ade20k", "split": "training", "num_samples": 20210,
     "num_classes": 150, "reduce_zero_label": true, "class_names": ["wall", ...],
     "shards": [{"name", "num_samples", "bytes", "sha256"}, ...], "rejected": [{"source", "reason"}, ...]}

Dataset knowledge travels here, so that training, evaluation and pictures need no dataset-specific code:
num_classes (0: image-only shards), reduce_zero_label (label 0 is "other": ignored, k -> k - 1) and
class_names (one per class, in label order after the reduction). The last two are optional; manifests
without them (written before they existed) mean ADE20K's values: reduce_zero_label true, ADE20K's 150 names.

The loader plans epochs from these counts alone (it never scans a shard to count or skip samples), so the
manifest must match the tars byte for byte: `segjobs shard verify DIR` checks that.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shards import ade20k
from shards.errors import CorruptShardError

FORMAT = "segjobs-shards/1"
MANIFEST = "manifest.json"


@dataclass
class ShardEntry:
    name: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class Rejection:
    source: str
    reason: str


@dataclass
class Manifest:
    dataset: str
    split: str
    num_classes: int
    shards: list[ShardEntry] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    reduce_zero_label: bool = True
    class_names: list[str] | None = None
    format: str = FORMAT

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def labelled(self) -> bool:
        return self.num_classes > 0

    def names(self) -> list[str]:
        """A name per class: the manifest's, else ADE20K's (when it has ADE20K's 150 classes), else numbers."""
        if self.class_names is not None:
            return list(self.class_names)
        if self.num_classes == ade20k.NUM_CLASSES:
            return list(ade20k.CLASSES)
        return [str(k) for k in range(self.num_classes)]

    def to_json(self) -> str:
        body = {
            "format": self.format,
            "dataset": self.dataset,
            "split": self.split,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            **({"reduce_zero_label": self.reduce_zero_label} if self.labelled else {}),
            **({"class_names": self.class_names} if self.class_names is not None else {}),
            "shards": [asdict(s) for s in self.shards],
            "rejected": [asdict(r) for r in self.rejected],
        }
        return json.dumps(body, indent=1) + "\n"

    def save(self, split_dir: Path) -> None:
        write_atomic(split_dir / MANIFEST, self.to_json().encode())


def load(split_dir: Path) -> Manifest:
    """Read `<split_dir>/manifest.json`; a missing or malformed one is explained, naming the file."""
    path = Path(split_dir) / MANIFEST
    if not path.is_file():
        raise CorruptShardError(
            f"{path}: no manifest. A shard directory is made by `segjobs shard`; pass the split folder "
            f"(e.g. data/shards/ade20k/training), not its parent."
        )
    try:
        body = json.loads(path.read_text())
        if body.get("format") != FORMAT:
            raise ValueError(f"format is {body.get('format')!r}, expected {FORMAT!r}")
        manifest = Manifest(
            dataset=body["dataset"],
            split=body["split"],
            num_classes=int(body["num_classes"]),
            shards=[ShardEntry(**s) for s in body["shards"]],
            rejected=[Rejection(**r) for r in body["rejected"]],
            reduce_zero_label=bool(body.get("reduce_zero_label", True)),
            class_names=body.get("class_names"),
        )
        names = manifest.class_names
        if names is not None and (not isinstance(names, list) or len(names) != manifest.num_classes
                                  or not all(isinstance(n, str) for n in names)):
            raise ValueError(f"class_names must list {manifest.num_classes} names, one per class")
        if manifest.num_samples != body["num_samples"]:
            raise ValueError(f"num_samples is {body['num_samples']} but the shards hold {manifest.num_samples}")
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptShardError(f"{path}: not a valid segjobs manifest ({exc}).") from None
    return manifest


def write_atomic(path: Path, data: bytes) -> None:
    """Write a small file so that readers see the old or the new content, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
