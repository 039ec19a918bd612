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
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise ValueError(f"over {MAX_MANIFEST_BYTES >> 20} MiB")
        manifest = _validated(json.loads(data.decode("utf-8")))
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise CorruptShardError(f"{path}: not a valid segjobs manifest ({str(exc)[:300]}).") from None
    return manifest


MAX_MANIFEST_BYTES = 256 << 20  # ADE20K's is 4 kB; a million shards would be ~150 MB
MIN_SAMPLE_BYTES = 1024  # a sample is at least two tar members of a 512-byte header and a 512-byte block


def _validated(body) -> Manifest:
    """The manifest a parsed manifest.json describes, or ValueError naming the first field that is wrong."""
    def require(condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(message)

    def count(value, what: str) -> int:
        require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                f"{what} must be a non-negative integer, found {str(value)[:40]!r}")
        return value

    require(isinstance(body, dict), f"expected a JSON object, found {type(body).__name__}")
    require(body.get("format") == FORMAT, f"format is {str(body.get('format'))[:40]!r}, expected {FORMAT!r}")
    for key in ("dataset", "split"):
        require(isinstance(body.get(key), str), f"{key} must be a string")
    num_classes = count(body.get("num_classes"), "num_classes")  # 0: image-only shards
    require(isinstance(body.get("shards"), list), "shards must be a list")
    shards, names = [], set()
    for index, entry in enumerate(body["shards"]):
        require(isinstance(entry, dict) and set(entry) == {"name", "num_samples", "bytes", "sha256"},
                f"shards[{index}] must hold exactly name, num_samples, bytes and sha256")
        name = entry["name"]
        require(isinstance(name, str) and name.endswith(".tar") and "/" not in name and "\\" not in name
                and not name.startswith(".") and name not in names,
                f"shards[{index}].name must be a distinct plain .tar file name inside the split folder, found {str(name)[:60]!r}")
        names.add(name)
        samples, size = count(entry["num_samples"], f"shards[{index}].num_samples"), count(entry["bytes"], f"shards[{index}].bytes")
        require(samples * MIN_SAMPLE_BYTES <= size, f"shards[{index}] claims {samples} samples in {size} bytes")
        require(isinstance(entry["sha256"], str) and len(entry["sha256"]) == 64
                and all(c in "0123456789abcdef" for c in entry["sha256"]), f"shards[{index}].sha256 must be 64 hex digits")
        shards.append(ShardEntry(name, samples, size, entry["sha256"]))
    rejected = body.get("rejected", [])
    require(isinstance(rejected, list) and all(isinstance(r, dict) and set(r) == {"source", "reason"}
                                               and all(isinstance(v, str) for v in r.values()) for r in rejected),
            "rejected must be a list of {source, reason} strings")
    reduce_zero_label = body.get("reduce_zero_label", True)
    require(isinstance(reduce_zero_label, bool), "reduce_zero_label must be true or false")
    names_field = body.get("class_names")
    require(names_field is None or (isinstance(names_field, list) and len(names_field) == num_classes
                                    and all(isinstance(n, str) for n in names_field)),
            f"class_names must list {num_classes} names, one per class")
    manifest = Manifest(dataset=body["dataset"], split=body["split"], num_classes=num_classes, shards=shards,
                        rejected=[Rejection(**r) for r in rejected], reduce_zero_label=reduce_zero_label,
                        class_names=names_field)
    require(body.get("num_samples") == manifest.num_samples,
            f"num_samples is {str(body.get('num_samples'))[:40]} but the shards hold {manifest.num_samples}")
    return manifest


def write_atomic(path: Path, data: bytes) -> None:
    """Write a small file so that readers see the old or the new content, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
