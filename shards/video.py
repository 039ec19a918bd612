"""Video files as a source of frames: `segjobs shard video` packs them, `segjobs visualize --video` draws them.

    with VideoFrames(Path("clip.mp4"), fps=4, short_side=512) as video:
        for frame in video:         # Frame(index, time, image): index among the frames kept, time in seconds
            ...

Decoding is PyAV's (FFmpeg inside the wheel: every common container and codec). Frames are sampled by
presentation time: with `fps` F, the first frame of each 1/F-second slot counted from the first frame is kept,
never a frame twice (a video with fewer than F frames a second gives every frame); without, every frame. A kept
frame is converted to RGB and scaled down (Lanczos) so that its shorter side is `short_side`; a smaller frame
keeps its size (never upscaled).

A file is refused with UnusableVideo, whose message is the reason, when FFmpeg cannot open or decode it, it has
no video stream, a frame is over MAX_FRAME_PIXELS (checked from the stream header before decoding, then per
frame), no frame decodes, fewer frames decode than its container announces (a truncated file), or it would
give more than MAX_FRAMES frames.

Sample keys: the file's stem with every character outside [A-Za-z0-9_-] replaced by "_", then "_f" and the
kept frame's index in 6 digits (`my clip.v2.mp4` -> `my_clip_v2_f000000`), so keys never hold a dot and sort
in time order.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from PIL import Image

from shards.ade20k import SourceSample
from shards.errors import UnusableVideo
from shards.manifest import Rejection
from shards.writer import printable

DEFAULT_SHORT_SIDE = 512  # ADE20K's images are about 512 on their shorter side; every family trains on crops of it
MAX_FRAME_PIXELS = 40_000_000  # shards.loader.MAX_PIXELS (not imported: it imports torch)
MAX_FRAMES = 1_000_000  # the 6 digits of a key: over 9 hours of a 30 fps video
JPEG_QUALITY = 90  # as the synthetic ADE20K; Pillow's encoder is deterministic, so are the shards
FALLBACK_RATE = Fraction(25)  # a video whose container states no frame rate


@dataclass(frozen=True)
class Frame:
    index: int  # among the frames kept: 0, 1, 2, ...
    time: float  # presentation time in seconds, as the container states it
    image: Image.Image  # RGB, scaled down to the short side


def video_key(path: Path) -> str:
    """The key stem of a video's frames: its file stem with every character outside [A-Za-z0-9_-] as '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)


def failure(exc: Exception) -> str:
    """An FFmpeg error as text without the file's path (it goes into manifests, which must not depend on it)."""
    return getattr(exc, "strerror", None) or f"{type(exc).__name__}: {str(exc)[:200]}"


class VideoFrames:
    """The sampled frames of one video file, decoded once, in presentation order; use as a context manager.
    Opening checks the container and the stream header; iterating decodes (UnusableVideo either way)."""

    def __init__(self, path: Path, fps: float | None = None, short_side: int | None = DEFAULT_SHORT_SIDE):
        import av

        self.path, self.short_side = path, short_side
        self.fps = None if fps is None else Fraction(fps).limit_denominator(1001)
        try:
            self.container = av.open(str(path), metadata_errors="ignore")
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise UnusableVideo(f"FFmpeg cannot open it as a video ({failure(exc)})") from None
        try:
            if not self.container.streams.video:
                raise UnusableVideo("it holds no video stream")
            self.stream = self.container.streams.video[0]
            self.stream.thread_type = "AUTO"  # frame threads: the decoded pictures are the same, sooner
            if self.stream.codec_context is None:
                raise UnusableVideo("FFmpeg has no decoder for its video codec")
            width, height = self.stream.codec_context.width, self.stream.codec_context.height
            if width * height > MAX_FRAME_PIXELS:
                raise UnusableVideo(f"its frames are {width} x {height} pixels, over the {MAX_FRAME_PIXELS:,} a frame may have")
        except BaseException:
            self.container.close()
            raise

    @property
    def rate(self) -> Fraction:
        """Frames per second of the frames kept: `fps`, or the video's own rate when that is lower or no fps."""
        own = self.stream.average_rate or self.stream.guessed_rate
        own = Fraction(own) if own else FALLBACK_RATE
        return own if self.fps is None else min(self.fps, own)

    def __enter__(self) -> VideoFrames:
        return self

    def __exit__(self, *exc) -> bool:
        self.container.close()
        return False

    def __iter__(self) -> Iterator[Frame]:
        import av

        kept = decoded = next_slot = 0
        start = None
        try:
            for frame in self.container.decode(self.stream):
                decoded += 1
                time = frame.pts * frame.time_base if frame.pts is not None and frame.time_base else (decoded - 1) / self.rate
                start = time if start is None else start
                if self.fps is not None:
                    slot = math.floor((time - start) * self.fps)
                    if slot < next_slot:
                        continue
                    next_slot = slot + 1
                if frame.width * frame.height > MAX_FRAME_PIXELS:
                    raise UnusableVideo(f"frame {decoded - 1} is {frame.width} x {frame.height} pixels, over the "
                                        f"{MAX_FRAME_PIXELS:,} a frame may have")
                if kept == MAX_FRAMES:
                    raise UnusableVideo(f"it gives more than {MAX_FRAMES:,} frames; pass a lower --fps or cut it")
                yield Frame(kept, round(float(time), 6), self.scaled(frame.to_image()))
                kept += 1
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise UnusableVideo(f"frame {decoded} does not decode ({failure(exc)})") from None
        if kept == 0:
            raise UnusableVideo("no frame decodes")
        announced = self.stream.frames  # from the container's index (0: not stated)
        if decoded < announced:
            raise UnusableVideo(f"only {decoded} of the {announced} frames its container announces decode (a truncated file?)")

    def scaled(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        width, height = image.size
        if self.short_side is None or min(width, height) <= self.short_side:
            return image
        scale = self.short_side / min(width, height)
        return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.LANCZOS)


def stage_frames(files: list[Path], staging: Path, fps: float | None,
                 short_side: int | None) -> tuple[list[SourceSample], list[Rejection]]:
    """Decode the kept frames of every video into JPEG files under `staging`, for the shard writer to pack as
    it packs a folder of images; returns the samples in key order and the videos refused, with the reason.

    A sample's JSON gets `source` (the video's file name), `frame` (its index among the frames kept) and `time`
    (seconds). A video refused midway leaves no frame behind; so does the second of two videos whose keys
    would be the same (`a b.mp4` and `a_b.mp4`, or one name in two folders).

    Note: each frame file's mtime is set to its video's, and its name and bytes depend only on the video and the
    options, so the writer's fingerprint of a shard (names, sizes, mtimes) is the same when the same videos
    are sharded again: the shards are reused, and a changed video counts as another source (--force).
    """
    staging.mkdir(parents=True, exist_ok=True)
    samples: list[SourceSample] = []
    rejected: list[Rejection] = []
    owners: dict[str, Path] = {}
    for path in sorted(files, key=lambda p: (video_key(p), str(p))):
        stem = video_key(path)
        if stem in owners:
            rejected.append(Rejection(printable(path.name), f"its frames' keys ({stem}_f000000, ...) would be those of "
                                      f"{printable(owners[stem].name)}; rename one of them"))
            continue
        owners[stem] = path
        try:
            samples.extend(stage_video(path, stem, staging, fps, short_side))
        except UnusableVideo as exc:
            rejected.append(Rejection(printable(path.name), str(exc)))
    return samples, rejected


def stage_video(path: Path, stem: str, staging: Path, fps: float | None, short_side: int | None) -> list[SourceSample]:
    """One video's frames as JPEG files under `staging`; none are left when it turns out unusable midway."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as exc:
        raise UnusableVideo(f"cannot read it ({exc.strerror})") from None
    samples: list[SourceSample] = []
    try:
        with VideoFrames(path, fps, short_side) as video:
            for frame in video:
                key = f"{stem}_f{frame.index:06d}"
                buffer = io.BytesIO()
                frame.image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
                target = staging / f"{key}.jpg"
                target.write_bytes(buffer.getvalue())
                os.utime(target, ns=(mtime, mtime))
                samples.append(SourceSample(key, target, None, printable(path.name),
                                            meta=(("frame", frame.index), ("time", frame.time))))
    except BaseException:
        for sample in samples:
            sample.image.unlink(missing_ok=True)
        raise
    return samples
