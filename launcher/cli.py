"""The `segjobs` command: argument parsing only; each subcommand calls one function.

    segjobs synth ade20k data/synth --train 200 --val 50 --size 256x320 --seed 0
    segjobs shard ade20k data/synth data/shards/ade20k --workers 2
    segjobs shard images ~/frames data/shards/frames --split training
    segjobs synth video data/clip.mp4 --frames 48 --size 128x160 --fps 12
    segjobs shard video data/clip.mp4 ~/walk.mov data/shards/video --fps 4 --short-side 512
    segjobs shard verify data/shards/ade20k/training
    segjobs models --json
    segjobs train jobs/demo_segmenter.yaml --set train.max_steps=100
    segjobs plan jobs/dino_vits16.yaml --world-size 16 --plot plan.png
    segjobs submit jobs/dino_vits8.yaml --set resources.partition=gpu
    segjobs profiles; segjobs submit jobs/dino_vits8.yaml --profile lab --dry-run
    segjobs submit jobs/segmenter_tiny16.yaml --after dino_vits8; segjobs eval dino_vits8 --submit
    segjobs visualize demo_dino --video data/clip.mp4 --fps 6
    segjobs status --watch
    segjobs compare runs/demo_wnet-sweep --metric many_to_one_miou --plot sweep.png
    segjobs predict demo_segmenter photos/*.jpg --out predictions; segjobs export demo_segmenter --out seg.safetensors
    segjobs show dino_vits8 --json
    segjobs logs dino_vits8 --follow; segjobs cancel dino_vits8; segjobs resume dino_vits8

Exit status: 0 success, 1 the work failed, 2 a usage or input error. Errors are one paragraph on stderr;
`--debug` adds the traceback. Each subcommand is one function in launcher.commands or launcher.cluster,
imported when it runs: torch is imported only by those that need it, so `segjobs --help`, `status`, `logs`,
`cancel`, `synth` and `shard` start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

USAGE_ERROR, WORK_FAILED = 2, 1


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 256x320, got {text!r}") from None
    if height < 32 or width < 32:
        raise argparse.ArgumentTypeError(f"images must be at least 32x32, got {text!r}")
    return height, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segjobs", description="Train segmentation models on ADE20K shards, locally or on SLURM.")
    overriding = argparse.ArgumentParser(add_help=False)
    overriding.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a spec field (value parsed as YAML), e.g. --set train.max_steps=100")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser("synth", help="write a synthetic dataset in a real dataset's layout, or a synthetic clip")
    synths = synth.add_subparsers(dest="dataset", required=True, metavar="KIND")
    scenes = synths.add_parser("ade20k", help="scenes of textured shapes in the ADEChallengeData2016 layout")
    scenes.add_argument("out", type=Path, help="folder to create (the ADEChallengeData2016 layout)")
    scenes.add_argument("--train", type=int, default=200, help="training images (default 200)")
    scenes.add_argument("--val", type=int, default=50, help="validation images (default 50)")
    scenes.add_argument("--size", type=parse_size, default=(256, 320), help="image size HxW (default 256x320)")
    scenes.add_argument("--classes", type=int, default=8, help="classes in use, spread over 1..150 (default 8)")
    scenes.add_argument("--seed", type=int, default=0)
    scenes.add_argument("--force", action="store_true", help="write into a folder that already holds files")
    clip = synths.add_parser("video", help="an MP4 of textured shapes moving over a background and occluding each other")
    clip.add_argument("out", type=Path, help="the .mp4 file to write")
    clip.add_argument("--frames", type=int, default=48, help="frames (default 48)")
    clip.add_argument("--size", type=parse_size, default=(128, 160), help="frame size HxW, both even (default 128x160)")
    clip.add_argument("--fps", type=float, default=12.0, help="frames per second (default 12)")
    clip.add_argument("--seed", type=int, default=0)
    clip.add_argument("--force", action="store_true", help="replace the file if it exists")

    shard = commands.add_parser("shard", help="pack a dataset into WebDataset tar shards, or verify shards")
    kinds = shard.add_subparsers(dest="kind", required=True, metavar="KIND")
    packing = argparse.ArgumentParser(add_help=False)
    packing.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar (default 1000)")
    packing.add_argument("--max-shard-bytes", type=float, default=1e9, help="size cap per tar (default 1e9)")
    packing.add_argument("--workers", type=int, default=1, help="processes decoding samples (default 1)")
    packing.add_argument("--strict", action="store_true", help="fail (exit 1) if any sample is rejected")
    packing.add_argument("--force", action="store_true",
                         help="replace shards in the output that were not written from this source (listed otherwise)")

    ade = kinds.add_parser("ade20k", parents=[packing], help="ADEChallengeData2016 -> <out>/<split>/*.tar")
    ade.add_argument("src", type=Path, help="the ADEChallengeData2016 folder")
    ade.add_argument("out", type=Path, help="output folder; one sub-folder per split")
    ade.add_argument("--splits", default=None, help="comma-separated splits (default: training,validation as present)")

    images = kinds.add_parser("images", parents=[packing], help="any folder of images, no labels (W-Net, DINO)")
    images.add_argument("src", type=Path)
    images.add_argument("out", type=Path)
    images.add_argument("--split", required=True, help="split name, e.g. training")
    images.add_argument("--dataset", default="images", help="dataset name used in shard names (default images)")

    video = kinds.add_parser("video", parents=[packing], help="frames of video files, no labels (W-Net, DINO)")
    video.add_argument("files", nargs="+", type=Path, metavar="FILE", help="video files (any container and codec FFmpeg reads)")
    video.add_argument("out", type=Path, help="output folder; the frames go to <out>/<split>/")
    video.add_argument("--fps", type=float, default=None,
                       help="frames kept per second of video, by presentation time (default: every frame)")
    video.add_argument("--short-side", type=int, default=512,
                       help="frames scaled down to this shorter side, never up (default 512, about ADE20K's)")
    video.add_argument("--split", default="training", help="split name (default training)")
    video.add_argument("--dataset", default="video", help="dataset name used in shard names (default video)")

    train = commands.add_parser("train", parents=[overriding],
                                help="train a job spec on this machine (resumes a run with checkpoints)")
    train.add_argument("spec", nargs="?", help="a job spec YAML file, e.g. jobs/demo_segmenter.yaml")
    shortcut = train.add_argument_group("shortcut without a spec file (starts from the family's job spec)")
    shortcut.add_argument("--model", metavar="FAMILY", help="a model family: segmenter, wnet or dino")
    shortcut.add_argument("--batch-size", type=int)
    shortcut.add_argument("--epochs", type=int)
    shortcut.add_argument("--learning-rate", type=float)
    shortcut.add_argument("--pretrained", nargs="?", const="", metavar="FILE",
                          help="Segmenter: a DINO ViT-S/16 backbone (file, or found in the torch hub cache)")

    submit = commands.add_parser("submit", parents=[overriding],
                                 help="submit a job spec to SLURM (or run it with the local executor)")
    submit.add_argument("spec", help="a job spec YAML file, e.g. jobs/dino_vits8.yaml")
    submit.add_argument("--cluster", choices=["auto", "slurm", "local"], default="auto",
                        help="auto (default): slurm when a SLURM controller answers, else local processes")
    submit.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="one run per value (several --sweep: every combination), submitted as one job array "
                             "(several when SLURM's MaxArraySize is smaller); recorded in <name>-sweep/sweep.json")
    submit.add_argument("--max-parallel", type=positive_int, default=None, metavar="N",
                        help="run at most N tasks of a sweep's array at once (--array=0-K%%N)")
    submit.add_argument("--dry-run", action="store_true",
                        help="print the sbatch script, and where each resources value came from; submit nothing")
    submit.add_argument("--profile", metavar="NAME",
                        help="a cluster profile of $SEGJOBS_HOME/clusters.yaml (default: the file's `default:`); "
                             "only keys written in the spec or given with --set override it")
    submit.add_argument("--after", metavar="RUN",
                        help="start once RUN's current job has completed (SLURM --dependency=afterok; its latest "
                             "job after any resume)")

    listing_profiles = commands.add_parser("profiles", help="list the cluster profiles of $SEGJOBS_HOME/clusters.yaml")
    listing_profiles.add_argument("--json", action="store_true", help="the file, its default and every profile as JSON")

    planning = commands.add_parser("plan", parents=[overriding],
                                   help="what a spec will do: batch, steps, epochs, peak lr, every schedule (before any GPU hour)")
    planning.add_argument("spec", help="a job spec YAML file")
    planning.add_argument("--world-size", type=int, help="processes (default: resources.nodes x tasks per node)")
    planning.add_argument("--samples", type=int, help="training samples (default: from data.train's manifest)")
    planning.add_argument("--json", action="store_true", help="one JSON object with every schedule's value per step")
    planning.add_argument("--plot", type=Path, metavar="FILE.png", help="draw every schedule against the step")

    status = commands.add_parser("status", help="a table of runs: SLURM state, progress, loss, ETA, checkpoints")
    status.add_argument("runs", nargs="*", metavar="RUN", help="run names or folders (default: recent runs)")
    status.add_argument("--all", action="store_true", help="every known run, not only those active in the last 7 days")
    status.add_argument("--runs", dest="run_dirs", action="append", default=[], type=Path, metavar="DIR",
                        help="also show the runs in DIR (a run folder or a folder of runs)")
    status.add_argument("--watch", action="store_true", help="refresh until every shown run has finished")
    status.add_argument("--interval", type=float, default=30.0,
                        help="seconds between refreshes with --watch (default 30: each asks sacct and squeue once)")
    status.add_argument("--json", action="store_true", help="print the rows as JSON")

    comparing = commands.add_parser("compare", help="runs of a sweep (or any runs) side by side: axes, state, loss, scores")
    comparing.add_argument("targets", nargs="+", metavar="SWEEP_OR_RUN",
                           help="a <name>-sweep folder (or its sweep.json), or run names or folders")
    comparing.add_argument("--metric", default="miou",
                           help="validation score shown (default miou; W-Net, DINO: clusters matched to classes); "
                                "an unknown name lists those the runs report")
    comparing.add_argument("--json", action="store_true", help="print the runs (and the points over seeds) as JSON")
    comparing.add_argument("--plot", type=Path, metavar="FILE.png", help="draw every run's loss and metric curves")
    showing = commands.add_parser("show", help="one run: history, what each start ran (code, versions, hosts), goodput, spec")
    showing.add_argument("run", help="run name or folder")
    showing.add_argument("--json", action="store_true", help="print it as one JSON object")

    logs = commands.add_parser("logs", help="print the log of a run's latest job")
    logs.add_argument("run", help="run name or folder")
    logs.add_argument("--follow", action="store_true", help="keep printing while the job runs")
    logs.add_argument("--rank", type=int, default=0, help="which task's log (default 0)")

    cancel = commands.add_parser("cancel", help="cancel a run's job (scancel, or stop the local processes)")
    cancel.add_argument("run", help="run name or folder")

    resume = commands.add_parser("resume", help="resubmit a stopped, failed or cancelled run from its latest checkpoint")
    resume.add_argument("run", help="run name or folder")
    resume.add_argument("--cluster", choices=["auto", "slurm", "local"], default=None,
                        help="default: where its last job ran")

    evaluation = commands.add_parser("eval", parents=[overriding],
                                     help="evaluate a run's latest checkpoint (or a checkpoint folder) on a shard split")
    evaluation.add_argument("target", metavar="RUN_OR_CHECKPOINT", help="run name or folder, or a checkpoints/step_NNNNNNNN folder")
    evaluation.add_argument("--split", default="validation", help="shard split beside the spec's data.val (default validation)")
    evaluation.add_argument("--mode", choices=["whole", "slide", "ms-flip"], default=None,
                            help="Segmenter: sliding windows (the reference's protocol, its default), whole images or multi-scale + flip")
    evaluation.add_argument("--json", action="store_true", help="print the report as JSON")
    evaluation.add_argument("--submit", action="store_true",
                            help="run the evaluation as its own small SLURM job (one task, at most one GPU; the run's "
                                 "partition and account), after the run's job when that is still live; the report "
                                 "goes to the run's eval/ and `segjobs status` shows its score")
    evaluation.add_argument("--profile", metavar="NAME",
                            help="with --submit: take partition, account, setup, ... from this cluster profile")

    pictures = commands.add_parser("visualize", parents=[overriding],
                                   help="pictures of a trained model (PNG grids, attention GIF, curves)")
    pictures.add_argument("targets", nargs="+", metavar="TARGET",
                          help="run name or folder, checkpoint folder, or an official DINO backbone file")
    pictures.add_argument("--curves", action="store_true", help="loss and mIoU curves of the named runs in one PNG")
    pictures.add_argument("--frames", type=Path, help="a folder of frames: DINO attention as an animated GIF")
    pictures.add_argument("--video", type=Path, metavar="FILE",
                          help="a video file: the family's picture of each frame as <stem>_<family>.mp4 and .gif")
    pictures.add_argument("--fps", type=float, default=None,
                          help="with --video: frames drawn per second of video (default: every frame)")
    pictures.add_argument("--samples", type=int, default=4, help="validation images in a grid (default 4)")
    pictures.add_argument("--model", default="dino_vits8", help="architecture of a backbone file (default dino_vits8)")
    pictures.add_argument("--out", type=Path, help="folder for the pictures (default runs/<name>/pictures)")

    predicting = commands.add_parser("predict", parents=[overriding],
                                     help="a trained model on image files: class maps, segments or attention as PNGs")
    predicting.add_argument("target", metavar="RUN_OR_CHECKPOINT", help="run name or folder, or a checkpoint folder")
    predicting.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (any size Pillow reads)")
    predicting.add_argument("--out", type=Path, required=True, help="folder for the PNGs (created; see --force)")
    predicting.add_argument("--batch-size", type=positive_int, default=8, help="images decoded and predicted together (default 8)")
    predicting.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when there is a GPU")
    predicting.add_argument("--force", action="store_true",
                            help="replace files in --out that segjobs did not write (or that changed since)")

    exporting = commands.add_parser("export", help="a run's weights as one .safetensors file that models.create loads")
    exporting.add_argument("target", metavar="RUN_OR_CHECKPOINT", help="run name or folder, or a checkpoint folder")
    exporting.add_argument("--out", type=Path, required=True, metavar="FILE.safetensors")
    exporting.add_argument("--force", action="store_true", help="replace a file that is not a segjobs export")

    demo = commands.add_parser("demo", parents=[overriding],
                               help="the main job on this machine: synthetic data, three models, eval, pictures (--set: all three specs)")
    demo.add_argument("--root", type=Path, default=Path("data/demo"), help="data folder (default data/demo)")
    demo.add_argument("--train", type=int, default=400, help="synthetic training images (default 400)")
    demo.add_argument("--val", type=int, default=100, help="synthetic validation images (default 100)")
    demo.add_argument("--size", type=parse_size, default=(256, 320), help="image size HxW (default 256x320)")
    demo.add_argument("--cluster", choices=["auto", "slurm", "local"], default="auto")

    listing = commands.add_parser("models", help="list every model variant with its parameter count")
    listing.add_argument("--json", action="store_true", help="a JSON list of {name, family, params, ...}")

    verify = kinds.add_parser("verify", help="re-check shards against manifest.json (exit 1 on a bad shard)")
    verify.add_argument("dir", type=Path, help="a split folder, or a folder of split folders")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    try:
        return run(args)
    except KeyboardInterrupt:
        print("segjobs: interrupted", file=sys.stderr)
        return WORK_FAILED
    except Exception as exc:  # noqa: BLE001 - the boundary: user errors become one paragraph
        status = exit_status(exc)
        if status is None or args.debug:
            traceback.print_exc()
        if status is None:
            return WORK_FAILED
        print(f"segjobs: {exc}", file=sys.stderr)
        return status


def exit_status(exc: Exception) -> int | None:
    """The exit status for an error a user can cause; None for a bug (which keeps its traceback)."""
    from launcher.errors import InputError, WorkFailed
    from shards.errors import BadSourceError, ShardsError

    if isinstance(exc, (InputError, BadSourceError)):
        return USAGE_ERROR
    if isinstance(exc, (WorkFailed, ShardsError)):
        return WORK_FAILED
    if type(exc).__name__ == "PretrainedError":  # models.pretrained; not imported here, it imports torch
        return USAGE_ERROR
    return None


def run(args: argparse.Namespace) -> int:
    if args.command == "synth":
        from launcher.commands import data

        if args.dataset == "video":
            return data.synth_video(args.out, args.frames, args.size, args.fps, args.seed, args.force)
        return data.synth(args.out, args.train, args.val, args.size, args.classes, args.seed, args.force)
    if args.command == "shard":
        from launcher.commands import data

        if args.kind == "verify":
            return data.verify(args.dir)
        options = dict(samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes,
                       workers=args.workers, strict=args.strict, force=args.force)
        if args.kind == "ade20k":
            splits = args.splits.split(",") if args.splits else None
            return data.shard_ade20k(args.src, args.out, splits, **options)
        if args.kind == "video":
            return data.shard_video(args.files, args.out, args.split, args.dataset, args.fps, args.short_side, **options)
        return data.shard_images(args.src, args.out, args.split, args.dataset, **options)
    if args.command == "train":
        from launcher.commands import train

        return train.main(args.spec, args.overrides, args.model, args.batch_size, args.epochs, args.learning_rate,
                          args.pretrained)
    if args.command in ("submit", "resume", "cancel"):
        from launcher.cluster import submit

        if args.command == "submit":
            return submit.submit(args.spec, args.cluster, args.overrides, args.sweep, args.dry_run, args.max_parallel,
                                 args.profile, args.after)
        if args.command == "resume":
            return submit.resume(args.run, args.cluster)
        return submit.cancel(args.run)
    if args.command == "plan":
        from launcher.commands import plan

        return plan.main(args.spec, args.overrides, args.world_size, args.samples, args.json, args.plot)
    if args.command in ("status", "logs"):
        from launcher.commands import status

        if args.command == "logs":
            return status.logs(args.run, args.follow, args.rank)
        return status.show(args.runs, args.run_dirs, args.all, args.watch, args.json, args.interval)
    if args.command == "compare":
        from launcher.commands import compare

        return compare.main(args.targets, args.metric, args.json, args.plot)
    if args.command == "profiles":
        from launcher.cluster import profiles

        return profiles.show(args.json)
    if args.command == "show":
        from launcher.commands import show

        return show.main(args.run, args.json)
    if args.command == "eval":
        from launcher.commands import eval as evaluation

        if args.submit:
            return evaluation.submit(args.target, args.split, args.mode, args.overrides, args.profile)
        if args.profile:
            from launcher.errors import InputError

            raise InputError("eval --profile NAME: the profile chooses where an evaluation job runs; add --submit.")
        return evaluation.main(args.target, args.split, args.mode, args.json, args.overrides)
    if args.command == "visualize":
        from launcher.commands import visualize

        return visualize.main(args.targets, args.curves, args.frames, args.samples, args.model, args.out, args.overrides,
                              args.video, args.fps)
    if args.command == "predict":
        from launcher.commands import predict

        return predict.main(args.target, args.images, args.out, args.batch_size, args.device, args.force, args.overrides)
    if args.command == "export":
        from launcher.commands import export

        return export.main(args.target, args.out, args.force)
    if args.command == "demo":
        from launcher.commands import demo

        return demo.run_demo(args.root, args.train, args.val, args.size, args.cluster, args.overrides)
    if args.command == "models":
        from launcher.commands import models

        return models.show(as_json=args.json)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
