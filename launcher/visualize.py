"""`segjobs visualize`: the pictures of a trained model, written under runs/<name>/pictures/.

    segjobs visualize demo_segmenter                 # image | ground truth | prediction, ADE20K colours
    segjobs visualize demo_wnet                      # image | segmentation (a colour per cluster) | reconstruction
    segjobs visualize demo_dino                      # per-head CLS attention and its 60%-mass masks
    segjobs visualize demo_dino --frames ~/frames    # + attention.gif over a folder of frames
    segjobs visualize dino_vits8_pretrain.pth --model dino_vits8 --frames ~/frames --out pictures
    segjobs visualize demo_segmenter demo_wnet demo_dino --curves   # loss and mIoU curves of several runs

Colours: class (or cluster) k is drawn with the bit-interleaved colour map of PASCAL VOC and the ADE20K
toolkits' label images, so the same class has the same colour in every picture; "ignore" pixels show the image.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from launcher.spec import SpecError

log = logging.getLogger("segjobs.visualize")
IGNORE_INDEX = 255
ATTENTION_SIZE = 224  # DINO pictures: the shorter side, as in the paper's figures (a multiple of 8 and 16)


def palette(count: int = 256) -> np.ndarray:
    """count x 3 uint8 colours: the bits of k spread over the high bits of R, G and B (k = 0 is black)."""
    colours = np.zeros((count, 3), dtype=np.uint8)
    for k in range(count):
        value, shift = k, 7
        while value:
            for channel in range(3):
                colours[k, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
    return colours


def colourize(labels: np.ndarray, offset: int = 1) -> np.ndarray:
    """H x W integer map -> H x W x 3 colours; class k gets colour k + offset (0 stays for ignore)."""
    colours = palette(256)
    index = np.where(labels == IGNORE_INDEX, 0, (labels.astype(np.int64) + offset) % 256)
    return colours[index]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    coloured = colourize(labels).astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * coloured
    return np.where((labels == IGNORE_INDEX)[..., None], image, blended.round()).astype(np.uint8)


def heatmap(values: np.ndarray) -> np.ndarray:
    """H x W floats -> H x W x 3 (dark blue to yellow), scaled to the map's own range."""
    low, high = float(values.min()), float(values.max())
    t = (values - low) / (high - low) if high > low else np.zeros_like(values)
    anchors = np.array([[48, 18, 59], [33, 145, 140], [253, 231, 37]], dtype=np.float32)
    position = t * (len(anchors) - 1)
    lower = np.clip(position.astype(int), 0, len(anchors) - 2)
    frac = (position - lower)[..., None]
    return (anchors[lower] * (1 - frac) + anchors[lower + 1] * frac).astype(np.uint8)


def grid(rows: list[list[np.ndarray]], gap: int = 4) -> Image.Image:
    """Tiles (H x W x 3 uint8, sizes may differ) in rows and columns on a white background."""
    heights = [max(t.shape[0] for t in row) for row in rows]
    widths = [max(row[c].shape[1] for row in rows if c < len(row)) for c in range(max(len(r) for r in rows))]
    canvas = Image.new("RGB", (sum(widths) + gap * (len(widths) + 1), sum(heights) + gap * (len(heights) + 1)), "white")
    y = gap
    for row, height in zip(rows, heights):
        x = gap
        for column, tile in enumerate(row):
            canvas.paste(Image.fromarray(tile), (x, y))
            x += widths[column] + gap
        y += height + gap
    return canvas


def validation_samples(spec, count: int, split: str = "validation") -> list[tuple[np.ndarray, np.ndarray | None]]:
    """The first `count` samples of a split as (H x W x 3 uint8 image, H x W label with 255 ignored, or None)."""
    from launcher.report import split_folder
    from shards.loader import build_loader

    def raw(image: Image.Image, label: np.ndarray | None, rng) -> dict:
        return {"image": np.asarray(image.convert("RGB")), **({"label": label} if label is not None else {})}

    loader = build_loader(split_folder(spec, split), raw, batch_size=1, rank=0, world_size=1, train=False,
                          seed=spec.seed, num_workers=0)
    samples = []
    try:
        for batch in loader:
            image = batch["image"][0] if isinstance(batch["image"], list) else batch["image"][0]
            label = batch["label"][0] if "label" in batch else None
            samples.append((np.asarray(image), None if label is None else np.asarray(label)))
            if len(samples) == count:
                break
    finally:
        loader.close()
    return samples


def to_batch(image: np.ndarray, size: tuple[int, int], device) -> torch.Tensor:
    """H x W x 3 uint8 -> 1 x 3 x h x w uint8 tensor resized to size (h, w)."""
    resized = Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)[None].to(device)


def patch_multiple(height: int, width: int, patch: int, shorter: int) -> tuple[int, int]:
    scale = shorter / min(height, width)
    return max(patch, round(height * scale / patch) * patch), max(patch, round(width * scale / patch) * patch)


# ---- the three families -----------------------------------------------------------------------------------
@torch.no_grad()
def segmenter_picture(spec, task, accelerator, samples) -> Image.Image:
    from launcher.tasks import normalize
    from shards.transforms import rescale_size

    rows = []
    for image, label in samples:
        width, height = rescale_size(image.shape[1], image.shape[0], tuple(spec.data.scale))
        logits = task.model(normalize(to_batch(image, (height, width), accelerator.device)))
        prediction = F.interpolate(logits.float(), size=image.shape[:2], mode="bilinear").argmax(1)[0].cpu().numpy()
        truth = label if label is not None else np.full(image.shape[:2], IGNORE_INDEX)
        rows.append([image, overlay(image, truth), overlay(image, prediction)])
    return grid(rows)


@torch.no_grad()
def wnet_picture(spec, task, accelerator, samples) -> Image.Image:
    rows = []
    for image, _ in samples:  # W-Net pads to its own multiple: any size goes
        pixels = to_batch(image, image.shape[:2], accelerator.device).float() / 255.0
        probs, reconstruction = task.model(pixels, decode=True)
        clusters = probs.argmax(1)[0].cpu().numpy()
        rebuilt = (reconstruction[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        shown = image
        rows.append([shown, colourize(clusters, offset=1), rebuilt])
    return grid(rows)


@torch.no_grad()
def dino_attention(network, image: np.ndarray, device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image resized, heads x h x w attention upsampled to it, heads x h x w 60%-mass masks) for one image."""
    from launcher.tasks import normalize
    from models.dino import attention_masks

    patch = network.config.backbone.patch_size
    height, width = patch_multiple(image.shape[0], image.shape[1], patch, ATTENTION_SIZE)
    pixels = normalize(to_batch(image, (height, width), device))
    attention = network.attention_maps(pixels)[0].float()  # heads x patches
    masks = attention_masks(attention, mass=0.6).float()
    grid_shape = (height // patch, width // patch)

    def upsample(maps: torch.Tensor) -> np.ndarray:
        return F.interpolate(maps.reshape(1, -1, *grid_shape), size=(height, width), mode="nearest")[0].cpu().numpy()

    shown = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    return shown, upsample(attention), upsample(masks)


def dino_picture(network, samples, device) -> Image.Image:
    rows = []
    for image, _ in samples:
        shown, attention, masks = dino_attention(network, image, device)
        rows.append([shown, *(heatmap(a) for a in attention)])
        rows.append([shown, *(overlay(shown, np.where(m > 0, 0, IGNORE_INDEX), alpha=0.6) for m in masks)])
    return grid(rows)


def attention_gif(network, frames_dir: Path, out: Path, device, duration_ms: int = 120) -> Path:
    """One frame per image of `frames_dir` (sorted): image | mean attention over heads | its 60% mask."""
    paths = sorted(p for p in frames_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise SpecError(f"--frames {frames_dir}: no .jpg or .png images there.")
    frames = []
    for path in paths:
        shown, attention, masks = dino_attention(network, np.asarray(Image.open(path).convert("RGB")), device)
        mean_mask = np.where(masks.max(0) > 0, 0, IGNORE_INDEX)
        frames.append(grid([[shown, heatmap(attention.mean(0)), overlay(shown, mean_mask, alpha=0.6)]]))
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return out


def curves_picture(run_dirs: list[Path], out: Path) -> Path:
    """Training loss (left) and validation mIoU (right) against the step, one line per run."""
    import matplotlib

    from launcher import runs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, miou_axis) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for run_dir in run_dirs:
        path = run_dir / "metrics.jsonl"
        if not path.exists():
            raise SpecError(f"{run_dir}: no metrics.jsonl to plot.")
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval" in r]
        name = runs.read_run(run_dir).get("name", run_dir.name)
        loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], label=name)
        if evals:
            miou_axis.plot([r["step"] for r in evals], [r["eval"]["miou"] for r in evals], marker="o", label=name)
    loss_axis.set(title="training loss", xlabel="step", yscale="log")
    miou_axis.set(title="validation mIoU (unsupervised for W-Net, DINO)", xlabel="step", ylim=(0, 1))
    for axis in (loss_axis, miou_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
    return out


# ---- the command ------------------------------------------------------------------------------------------
def backbone_file(path: Path, model: str, device):
    """An official DINO checkpoint file (backbone weights; a head is optional) as a DINO network."""
    import models

    network = models.create(model, pretrained=str(path)).to(device).eval()
    if not hasattr(network, "attention_maps"):
        raise SpecError(f"--model {model}: attention pictures need a DINO model (e.g. dino_vits8, dino_vits16).")
    return network


def visualize(targets: list[str], curves: bool = False, frames: Path | None = None, samples: int = 4,
              model: str = "dino_vits8", out: Path | None = None, overrides: list[str] = ()) -> list[Path]:
    from launcher import runs
    from launcher.restore import output_folder, restore

    written = []
    if curves:
        run_dirs = [runs.resolve_run(t) for t in targets]
        folder = out or run_dirs[0] / "pictures"
        folder.mkdir(parents=True, exist_ok=True)
        return [curves_picture(run_dirs, folder / "curves.png")]
    for target in targets:
        if Path(target).is_file():  # an official backbone file: attention pictures only
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            network, folder = backbone_file(Path(target), model, device), out or Path("pictures")
            if frames is None:
                raise SpecError(f"{target}: a backbone file has no validation data; pass --frames DIR.")
        else:
            spec, task, accelerator, checkpoint = restore(target, overrides)
            device, folder = accelerator.device, out or output_folder(checkpoint) / "pictures"
            network = getattr(task, "teacher", None)  # DINO: the teacher, as in the paper's figures
            folder.mkdir(parents=True, exist_ok=True)
            chosen = validation_samples(spec, samples)
            if network is not None:
                written.append(folder / "dino_attention.png")
                dino_picture(_unwrapped(network), chosen, device).save(written[-1])
            elif task.supervised:
                written.append(folder / "segmenter.png")
                segmenter_picture(spec, task, accelerator, chosen).save(written[-1])
            else:
                written.append(folder / "wnet.png")
                wnet_picture(spec, task, accelerator, chosen).save(written[-1])
        if frames is not None:
            if network is None:
                raise SpecError(f"--frames: attention GIFs need a DINO run or backbone file, not {target}.")
            folder.mkdir(parents=True, exist_ok=True)
            written.append(attention_gif(_unwrapped(network), Path(frames), folder / "attention.gif", device))
    return written


def _unwrapped(module):
    return getattr(module, "module", module)


def main(targets: list[str], curves: bool, frames: Path | None, samples: int, model: str, out: Path | None,
         overrides: list[str]) -> int:
    for path in visualize(targets, curves, frames, samples, model, out, overrides):
        print(path)
    return 0
