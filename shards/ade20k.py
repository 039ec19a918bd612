"""The ADE20K scene-parsing release (ADEChallengeData2016) as it lies on disk.

Layout (http://sceneparsing.csail.mit.edu, Zhou et al. 2017)::

    ADEChallengeData2016/
      images/training/ADE_train_00000001.jpg        20,210 images
      images/validation/ADE_val_00000001.jpg          2,000 images
      annotations/training/ADE_train_00000001.png   single-channel 8-bit, 0..150, 0 = "other"
      annotations/validation/...
      objectInfo150.txt                             Idx, Ratio, Train, Val, Name (tab separated)

A split without an annotations folder (the challenge's test images) is image-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shards.errors import BadSourceError

NUM_CLASSES = 150
SPLITS = ("training", "validation")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# The 150 class names in label order (label k names CLASSES[k - 1]); first alias of objectInfo150.txt.
CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
assert len(CLASSES) == NUM_CLASSES
# Label k's colour is COLOURS[k - 1] (label 0, "other", is black): the colours of the scene-parsing benchmark's
# color150.mat, as mmsegmentation's ADE20KDataset.PALETTE lists them.
COLOURS = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255), (255, 71, 0),
    (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255),
    (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255),
    (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82), (0, 10, 255),
    (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10),
    (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255),
    (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0),
    (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255), (255, 0, 122),
    (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255),
    (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255), (71, 0, 255),
    (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194),
    (102, 255, 0), (92, 0, 255),
)
assert len(COLOURS) == NUM_CLASSES


@dataclass(frozen=True)
class SourceSample:
    """One image (and its label, when the split has labels) found in a source folder."""

    key: str
    image: Path
    label: Path | None
    source: str  # the image's path relative to the source root, as recorded in the sample's JSON
    meta: tuple[tuple[str, int | float | str], ...] = ()  # more fields of the sample's JSON (a video frame's time)


def split_prefix(split: str) -> str:
    """File-name prefix of a split: ADE_train_ for training, ADE_val_ for validation."""
    return {"training": "ADE_train_", "validation": "ADE_val_"}.get(split, f"ADE_{split}_")


def find_root(src: Path) -> Path:
    """The folder holding images/ and annotations/: SRC itself, or SRC/ADEChallengeData2016."""
    if not src.exists():
        raise BadSourceError(f"{src}: no such folder; pass the ADEChallengeData2016 folder of the ADE20K release.")
    for root in (src, src / "ADEChallengeData2016"):
        if (root / "images").is_dir():
            return root
    raise BadSourceError(
        f"{src} is not an ADE20K layout: expected images/training/*.jpg and annotations/training/*.png "
        f"(the ADEChallengeData2016 folder of the release), found no images/ folder."
    )


def available_splits(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "images").iterdir() if p.is_dir())


def list_split(root: Path, split: str) -> tuple[list[SourceSample], bool]:
    """Every image of a split in file-name order, and whether the split has labels.

    An image whose label file is missing still appears (label path set, file absent): the writer rejects it
    with a reason instead of silently dropping it.
    """
    image_dir = root / "images" / split
    if not image_dir.is_dir():
        found = ", ".join(available_splits(root)) or "none"
        raise BadSourceError(f"{root}: split {split!r} not found (expected {image_dir}/); splits present: {found}.")
    label_dir = root / "annotations" / split
    labelled = label_dir.is_dir()
    samples = []
    for path in sorted(image_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        label = label_dir / f"{path.stem}.png" if labelled else None
        samples.append(SourceSample(path.stem, path, label, str(path.relative_to(root))))
    if not samples:
        raise BadSourceError(f"{image_dir}: no .jpg images; is this the ADEChallengeData2016 folder?")
    return samples, labelled


def object_info_lines(pixel_ratio: list[float], train_counts: list[int], val_counts: list[int]) -> list[str]:
    """objectInfo150.txt in the release's format: header, then one tab-separated row per class."""
    rows = ["Idx\tRatio\tTrain\tVal\tName"]
    for k, name in enumerate(CLASSES):
        rows.append(f"{k + 1}\t{pixel_ratio[k]:.4f}\t{train_counts[k]}\t{val_counts[k]}\t{name}")
    return rows


def read_class_names(object_info: Path) -> list[str]:
    """Class names from an objectInfo150.txt (first alias of each `a;b;c` name)."""
    names = []
    for line in object_info.read_text().splitlines()[1:]:
        fields = line.split("\t")
        if len(fields) >= 5:
            names.append(fields[4].split(";")[0].strip())
    return names


def image_folder_samples(src: Path) -> list[SourceSample]:
    """Every image under `src` (recursively) as an unlabelled sample; keys are relative paths without dots."""
    if not src.is_dir():
        raise BadSourceError(f"{src}: no such folder; pass a folder of .jpg/.png images.")
    samples, seen = [], set()
    for path in sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        relative = path.relative_to(src)
        key = str(relative.with_suffix("")).replace(".", "_")
        if key in seen:
            continue  # a.jpg and a.png: the first (in sorted order) is kept
        seen.add(key)
        samples.append(SourceSample(key, path, None, str(relative)))
    if not samples:
        raise BadSourceError(f"{src}: no .jpg or .png images found.")
    return samples
