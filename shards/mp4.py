"""MP4 files written with PyAV: the synthetic clip of `segjobs synth video` and the videos of `segjobs visualize`.

    codec = write_mp4(Path("out.mp4"), frames, rate=Fraction(12))   # frames: PIL RGB images of one size

The codec is H.264 when the FFmpeg inside the PyAV wheel has an encoder for it (the wheels on PyPI carry
libx264), else MPEG-4 part 2 (FFmpeg's own `mpeg4` encoder, in every build); hardware encoders (h264_nvenc)
are never chosen, they need a GPU and its driver. H.264 is encoded at CRF 18 (visually lossless for these
flat-coloured pictures) with macroblock-tree rate control off, so that the same frames give the same bytes;
MPEG-4 part 2 at about 0.25 bits per pixel.

Note: both use yuv420p, the only pixel format every player decodes, which halves the chroma resolution, so
both sides of a frame must be even: a frame with an odd side gets one white row or column (the background of
the picture grids). The file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

from PIL import Image

PREFERRED_ENCODERS = ("libx264", "h264", "mpeg4")  # H.264 (by library, then FFmpeg's own choice), MPEG-4 part 2


def encoder() -> str:
    """The encoder (FFmpeg's name for it) of the first of PREFERRED_ENCODERS that this FFmpeg build has."""
    import av

    for name in PREFERRED_ENCODERS:
        try:
            return av.codec.Codec(name, "w").name
        except ValueError:  # UnknownCodecError: not in this build
            continue
    raise RuntimeError("the FFmpeg inside PyAV has neither an H.264 nor an MPEG-4 part 2 encoder")


def even_sized(image: Image.Image) -> Image.Image:
    """The image with a white row or column added where a side is odd (yuv420p needs even sides)."""
    width, height = image.size
    if width % 2 == 0 and height % 2 == 0:
        return image
    canvas = Image.new("RGB", (width + width % 2, height + height % 2), "white")
    canvas.paste(image, (0, 0))
    return canvas


def write_mp4(path: Path, frames: Iterable[Image.Image], rate: Fraction) -> str:
    """Encode `frames` (RGB, all of one size) at `rate` frames per second into `path`; returns the encoder used."""
    import av

    codec = encoder()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = None
            for index, image in enumerate(frames):
                image = even_sized(image.convert("RGB"))
                if stream is None:
                    stream = container.add_stream(codec, rate=rate)
                    stream.width, stream.height = image.size
                    stream.pix_fmt = "yuv420p"
                    if codec == "mpeg4":
                        stream.bit_rate = max(200_000, int(image.size[0] * image.size[1] * float(rate) / 4))
                    elif codec == "libx264":
                        # mbtree off: with it, this x264 gave different bytes for the same frames from run to
                        # run at some sizes; without it the same frames always give the same file.
                        stream.options = {"crf": "18", "x264-params": "mbtree=0"}
                    else:
                        stream.options = {"crf": "18"}
                if image.size != (stream.width, stream.height):
                    raise ValueError(f"frame {index} is {image.size}, the first was {(stream.width, stream.height)}")
                frame = av.VideoFrame.from_image(image)
                frame.pts = index
                frame.time_base = Fraction(1) / rate
                container.mux(stream.encode(frame))
            if stream is None:
                raise ValueError("no frames to encode")
            container.mux(stream.encode(None))  # flush the encoder's delayed frames
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return codec
