"""`segjobs demo` (what `make demo` runs): the main job end to end on this machine.

    segjobs demo                                   # synthetic ADE20K -> shards -> three jobs -> eval -> pictures
    segjobs demo --cluster slurm                   # the same through SLURM (e.g. tools/minicluster)

1. writes a synthetic ADE20K under <root>/ADEChallengeData2016 (skipped when present),
2. shards and verifies it (a rerun reuses unchanged shards),
3. submits jobs/demo_segmenter.yaml, demo_wnet.yaml and demo_dino.yaml with `segjobs submit --cluster auto`
   (SLURM when a controller answers, else the local executor), skipping runs already completed or running,
4. shows the live status table until the three have finished,
5. reports each run's final evaluation (`segjobs eval` where the training wrote none), draws the pictures
   (`segjobs visualize`, with the DINO attention GIF over validation frames) and the curves of the three runs,
6. writes a synthetic clip (`segjobs synth video`), packs its frames into image-only shards (`segjobs shard
   video`) and draws W-Net's and DINO's picture of every frame as an MP4 and a GIF (`visualize --video`),
and prints where everything is. A rerun resumes what was interrupted and reuses what is done.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from launcher.cluster.submit import choose_cluster, load_points, submit_all
from launcher.commands import data as data_commands
from launcher.commands import status

DEMO_SPECS = ("jobs/demo_segmenter.yaml", "jobs/demo_wnet.yaml", "jobs/demo_dino.yaml")
GIF_FRAMES = 8
VIDEO_FAMILIES = ("wnet", "dino")  # drawn over the clip; Segmenter's picture of it is its prediction alone


def prepare_data(root: Path, train: int, val: int, size: tuple[int, int]) -> Path:
    source = root / "ADEChallengeData2016"
    if not (source / "objectInfo150.txt").exists():
        data_commands.synth(source, train, val, size, classes=8, seed=0)
    shards = root / "shards"
    data_commands.shard_ade20k(source, shards, None, samples_per_shard=100, max_shard_bytes=1e9, workers=2, strict=True)
    if data_commands.verify(shards) != 0:
        raise RuntimeError(f"{shards}: shards failed verification right after sharding")
    return shards


def submit_demo_jobs(specs: list[Path], shards: Path, cluster: str, overrides: list[str]) -> list[Path]:
    """Submit each demo spec unless its run is completed or already active; returns the run directories."""
    run_dirs = []
    data = [f"data.train={shards / 'training'}", f"data.val={shards / 'validation'}"]
    for spec in specs:
        (item,), folder = load_points(str(spec), data + list(overrides), [])
        run_dirs.append(item.spec.run_dir)
        row = status.refresh_row(item.spec.run_dir)
        if row.active or row.state == "COMPLETED":
            print(f"{item.spec.name}: {row.state.lower()}, not submitted again")
            continue
        submit_all([item], folder, cluster, str(spec))
        print(f"{item.spec.name}: job {item.job_id} ({cluster}) -> {item.spec.run_dir}")
    return run_dirs


def prepare_clip(root: Path) -> Path:
    """The synthetic clip (48 frames, 128x160, 12 fps: 4 s) and its frames as verified image-only shards."""
    clip = root / "clip.mp4"
    if not clip.exists():
        data_commands.synth_video(clip, frames=48, size=(128, 160), fps=12.0, seed=0)
    frames = root / "shards-clip"
    data_commands.shard_video([clip], frames, "training", "clip", None, 512, samples_per_shard=100,
                              max_shard_bytes=1e9, workers=1, strict=True, force=False)
    if data_commands.verify(frames) != 0:
        raise RuntimeError(f"{frames}: the clip's shards failed verification right after sharding")
    return clip


def demo_frames(root: Path, count: int) -> Path:
    """The first validation images as the frames of the attention GIF."""
    frames = root / "frames"
    if not frames.exists():
        frames.mkdir()
        for image in sorted((root / "ADEChallengeData2016" / "images" / "validation").glob("*.jpg"))[:count]:
            shutil.copy(image, frames / image.name)
    return frames


def headline(result: dict) -> str:
    """The figures a demo run is judged by: mIoU, and W-Net's reconstruction PSNR or DINO's attention Jaccard
    beside the untrained network's."""
    parts = [f"{'unsupervised mIoU' if result['unsupervised'] else 'mIoU'} {result['miou']:.3f}",
             f"pixel accuracy {result['pixel_acc']:.3f}"]
    if "psnr" in result:
        parts.append(f"reconstruction PSNR {result['psnr']:.1f} dB")
    if "jaccard_mean_heads" in result:
        parts.append(f"attention Jaccard {result['jaccard_mean_heads']:.3f} "
                     f"(untrained {result['untrained_jaccard_mean_heads']:.3f})")
    return "  ".join(parts)


def run_demo(root: Path = Path("data/demo"), train: int = 400, val: int = 100, size: tuple[int, int] = (256, 320),
             cluster: str = "auto", overrides: list[str] = (), interval: float = 5.0) -> int:
    from launcher.commands import eval as report
    from launcher.commands import visualize
    from launcher.training.families import task_class

    start = time.time()
    repo = Path(__file__).resolve().parents[2]
    shards = prepare_data(root, train, val, size)
    cluster = choose_cluster(cluster)
    # The three jobs share this machine: one core each at most, or their threads oversubscribe the cores
    # (with 2 threads each on 2 cores the demo ran over 10x slower than with 1).
    share = [f"resources.cpus_per_task={max(1, (os.cpu_count() or 1) // len(DEMO_SPECS))}"]
    run_dirs = submit_demo_jobs([repo / s for s in DEMO_SPECS], shards, cluster, share + list(overrides))
    status.show([str(d) for d in run_dirs], [], show_all=True, watch=True, as_json=False, interval=interval)
    rows = [status.refresh_row(d) for d in run_dirs]
    failed = [r for r in rows if r.state != "COMPLETED"]
    if failed:
        for row in failed:
            print(f"{row.name}: {row.state} {row.error or ''} (segjobs logs {row.name})")
        return 1
    summary = []
    frames, clip = demo_frames(root, GIF_FRAMES), prepare_clip(root)
    for run_dir in run_dirs:
        result = report.evaluate(str(run_dir), reuse=True)  # the training's final evaluation, when it wrote one
        report.show(result)
        animated = task_class(result["family"]).frames_name is not None
        video = clip if result["family"] in VIDEO_FAMILIES else None
        pictures = visualize.visualize([str(run_dir)], frames=frames if animated else None, video=video)
        summary.append((result, pictures))
    curves = visualize.visualize([str(d) for d in run_dirs], curves=True)
    print()
    print(f"segjobs demo finished in {(time.time() - start) / 60:.1f} min ({cluster}); data in {root}")
    for result, pictures in summary:
        print(f"  {result['model']:<22} {headline(result)}  run {Path(result['checkpoint']).parent.parent}")
        for picture in pictures:
            print(f"      {picture}")
    print(f"  curves: {curves[0]}")
    return 0
