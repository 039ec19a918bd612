"""`segjobs visualize`: the pictures of a trained model, written under runs/<name>/pictures/.

    segjobs visualize demo_segmenter                 # image | ground truth | prediction, ADE20K colours
    segjobs visualize demo_wnet                      # image | segmentation (a colour per cluster) | reconstruction
    segjobs visualize demo_dino                      # per-head CLS attention and its 60%-mass masks
    segjobs visualize demo_dino --frames ~/frames    # + attention.gif over a folder of frames
    segjobs visualize demo_wnet --video clip.mp4 --fps 6   # + clip_wnet.mp4 and clip_wnet.gif, a frame per 1/6 s
    segjobs visualize dino_vits8_pretrain.pth --model dino_vits8 --frames ~/frames --out pictures
    segjobs visualize demo_segmenter demo_wnet demo_dino --curves   # loss and mIoU curves of several runs

What each picture shows is the family's (its Task's `pictures`, `frame_picture` and `video_frame`); this module
finds the model, the samples, the frames and the folder. A video (--video) is decoded as `segjobs shard video`
decodes it (shards.video: frames kept by presentation time at --fps, shorter side scaled down to 512), each
kept frame drawn by the family (DINO: image | mean attention of the heads | 60%-mass mask; W-Net: image |
segments | reconstruction; Segmenter: image | prediction), and written as <stem>_<family>.mp4 (shards.mp4: H.264
when the FFmpeg inside PyAV has it, else MPEG-4 part 2) and .gif, both at the rate of the kept frames. With
--video, a run without data.val (one trained on video frames alone) gets the video only, no validation grid.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from launcher import runs
from launcher.spec import SpecError
from shards.errors import BadSourceError, UnusableVideo
from shards.mp4 import write_mp4
from shards.video import VideoFrames, video_key


def validation_samples(spec, count: int, split: str = "validation") -> list[tuple[np.ndarray, np.ndarray | None]]:
    """The first `count` samples of a split as (H x W x 3 uint8 image, H x W label with 255 ignored, or None)."""
    from launcher.commands.eval import split_folder
    from shards.loader import build_loader

    def raw(image: Image.Image, label: np.ndarray | None, rng) -> dict:
        return {"image": np.asarray(image.convert("RGB")), **({"label": label} if label is not None else {})}

    loader = build_loader(split_folder(spec, split), raw, batch_size=1, rank=0, world_size=1, train=False,
                          seed=spec.seed, num_workers=0)
    samples = []
    try:
        for batch in loader:
            image = batch["image"][0]
            label = batch["label"][0] if "label" in batch else None
            samples.append((np.asarray(image), None if label is None else np.asarray(label)))
            if len(samples) == count:
                break
    finally:
        loader.close()
    return samples


def curves_picture(run_dirs: list[Path], out: Path) -> Path:
    """Training loss (left) and validation mIoU (right) against the step, one line per run (compare.plot)."""
    from launcher.commands.compare import plot, read_curves

    curves = []
    for run_dir in run_dirs:
        if not (run_dir / "metrics.jsonl").exists():
            raise SpecError(f"{run_dir}: no metrics.jsonl to plot.")
        curves.append((runs.read_run(run_dir).get("name", run_dir.name), read_curves(run_dir)))
    return plot(curves, "miou", out, metric_title="validation mIoU (unsupervised for W-Net, DINO)")


# ---- the command ------------------------------------------------------------------------------------------
def frames_gif(task_class, network, frames_dir: Path, out: Path, device, duration_ms: int = 120) -> Path:
    """An animated GIF: the family's frame picture of every image of `frames_dir`, in name order."""
    paths = sorted(p for p in frames_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise SpecError(f"--frames {frames_dir}: no .jpg or .png images there.")
    frames = [task_class.frame_picture(network, np.asarray(Image.open(p).convert("RGB")), device) for p in paths]
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return out


def video_pictures(draw, video: Path, fps: float | None, stem: Path) -> list[Path]:
    """`stem`.mp4 and `stem`.gif: draw(H x W x 3 uint8 frame) -> PIL picture for every kept frame of `video`.
    The frames are drawn before anything is written, so a video that fails to decode midway leaves no file.
    Note: the GIF holds every picture in memory; for a long video pass --fps."""
    try:
        with VideoFrames(video, fps) as frames:
            pictures = [draw(np.asarray(frame.image)) for frame in frames]
            rate = frames.rate
    except UnusableVideo as exc:
        raise BadSourceError(f"--video {video}: {exc}; nothing was written for it.") from None
    mp4, gif = stem.with_suffix(".mp4"), stem.with_suffix(".gif")
    write_mp4(mp4, pictures, rate)
    pictures[0].save(gif, save_all=True, append_images=pictures[1:], duration=round(1000 / float(rate)), loop=0)
    return [mp4, gif]


def check_video(video: Path, fps: float | None) -> None:
    """Refuse a --video that is missing or that FFmpeg cannot open, before any model is loaded."""
    if fps is not None and not 0 < fps <= 1000:
        raise SpecError(f"--fps must be in (0, 1000] frames per second, got {fps}.")
    if not video.is_file():
        raise BadSourceError(f"--video {video}: no such file.")
    try:
        with VideoFrames(video, fps):
            pass
    except UnusableVideo as exc:
        raise BadSourceError(f"--video {video}: {exc}; nothing was written.") from None


def backbone_file(path: Path, model: str, device):
    """A weights file of a registered variant (e.g. an official DINO checkpoint) as (Task class, network)."""
    import models
    from launcher.training.families import task_for_model

    try:
        task_class = task_for_model(model)
    except KeyError:
        raise SpecError(f"--model {model}: not a registered model (see `segjobs models`).") from None
    return task_class, models.create(model, pretrained=str(path)).to(device).eval()


def visualize(targets: list[str], curves: bool = False, frames: Path | None = None, samples: int = 4,
              model: str = "dino_vits8", out: Path | None = None, overrides: list[str] = (), video: Path | None = None,
              fps: float | None = None) -> list[Path]:
    from launcher.training.restore import output_folder, restore

    written = []
    if video is not None and not curves:
        check_video(video, fps)
    if curves:
        run_dirs = [runs.resolve_run(t) for t in targets]
        folder = out or run_dirs[0] / "pictures"
        folder.mkdir(parents=True, exist_ok=True)
        return [curves_picture(run_dirs, folder / "curves.png")]
    for target in targets:
        if Path(target).is_file():  # a weights file: frame animations only
            if frames is None and video is None:
                raise SpecError(f"{target}: a weights file has no validation data; pass --frames DIR or --video FILE.")
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            task_class, network = backbone_file(Path(target), model, device)
            folder = out or Path("pictures")
            if video is not None and task_class.frames_name is None:
                raise SpecError(f"--video: a {task_class.family} weights file draws no video; DINO backbones do.")
            draw = partial(task_class.frame_picture, network, device=device)
        else:
            spec, task, accelerator, checkpoint = restore(target, overrides)
            device, folder = accelerator.device, out or output_folder(checkpoint) / "pictures"
            task_class, network = type(task), task.picture_network()
            draw = partial(task.video_frame, device=device)
            folder.mkdir(parents=True, exist_ok=True)
            if video is None or spec.data.val is not None:  # a run trained on frames alone has no validation split
                for name, picture in task.pictures(validation_samples(spec, samples), device).items():
                    picture.save(folder / name)
                    written.append(folder / name)
        if frames is not None:
            if task_class.frames_name is None:
                raise SpecError(f"--frames: the {task_class.family} family draws no frame animation ({target}); "
                                "DINO runs and backbone files do.")
            folder.mkdir(parents=True, exist_ok=True)
            written.append(frames_gif(task_class, network, Path(frames), folder / task_class.frames_name, device))
        if video is not None:
            folder.mkdir(parents=True, exist_ok=True)
            written.extend(video_pictures(draw, video, fps, folder / f"{video_key(video)}_{task_class.family}"))
    return written


def main(targets: list[str], curves: bool, frames: Path | None, samples: int, model: str, out: Path | None,
         overrides: list[str], video: Path | None = None, fps: float | None = None) -> int:
    for path in visualize(targets, curves, frames, samples, model, out, overrides, video, fps):
        print(path)
    return 0
