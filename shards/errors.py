"""Errors a user can cause with their data; the command line turns each into one paragraph and an exit status."""

import re


class ShardsError(Exception):
    """Base class: a problem with the user's files, explained in the message."""


class BadSourceError(ShardsError):
    """The source folder or the arguments are not usable (exit status 2): nothing was written."""


class CorruptShardError(ShardsError):
    """A shard does not match its manifest, or a sample in it cannot be read (exit status 1)."""


def decode_failure(what: str, exc: Exception) -> str:
    """A decode failure as deterministic text (Pillow quotes the BytesIO it read with its memory address)."""
    message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the bytes", str(exc))
    return f"{what} does not decode ({type(exc).__name__}: {message[:200]})"


class UnusableVideo(ShardsError):
    """A video file that cannot give frames; the message is the reason alone (callers name the file): `shard
    video` records it in the manifest's rejected list, `visualize --video` turns it into a BadSourceError."""
