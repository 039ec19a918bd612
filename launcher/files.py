"""Reading files that anyone could have written (run folders, checkpoints' meta.json, metrics.jsonl): regular
files only, never more than a stated number of bytes, so a FIFO cannot hang a command and a 3 GB file or a link
to /dev/zero cannot exhaust memory.

    data = read_bounded(path, 16 << 20)     # bytes; ValueError (naming why) for anything else
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. FileNotFoundError when it is absent; ValueError
    when it is a FIFO, a device, a folder, or larger than `limit`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO must not wait for a writer
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{info.st_size:,} bytes, over the {limit:,} expected at most")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"over the {limit:,} bytes expected at most")
    return data
