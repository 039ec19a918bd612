"""The stall watchdog: when no optimizer step completes for `train.stall_timeout_min`, write every thread's
Python stack to stderr (the rank's log) and hand the step to `on_stall`, which ends the process.

    watchdog = StallWatchdog(30 * 60, on_stall=lambda step: ...)
    watchdog.start()
    watchdog.beat(step)            # after every optimizer step
    with watchdog.paused():        # a checkpoint or an evaluation takes as long as it takes
        ...
    watchdog.close()

It is a thread, so it sees a main thread stuck anywhere: in a collective waiting for a hung rank (collectives
release the GIL), in a loader that stopped delivering, in a `time.sleep`. Every rank runs one; when one rank
hangs, the others wait for it in their next collective and stall too, so every rank's log gets its stacks.

Note: `on_stall` runs on the watchdog's thread while the main thread is still stuck: it ends the process
(os._exit), since nothing else would; when it returns or raises, the watchdog does.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("segjobs.train")


class StallWatchdog:
    def __init__(self, timeout_s: float, on_stall: Callable[[int], None]):
        self.timeout_s, self.on_stall = timeout_s, on_stall
        self.step, self.last_beat, self.pauses = 0, time.monotonic(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="segjobs-stall-watchdog", daemon=True)

    def start(self) -> None:
        self.last_beat = time.monotonic()
        self._thread.start()

    def beat(self, step: int) -> None:
        self.step, self.last_beat = step, time.monotonic()

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.pauses += 1
        try:
            yield
        finally:
            self.pauses -= 1
            self.last_beat = time.monotonic()

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(self.timeout_s / 10, 30.0)):
            if self.pauses or time.monotonic() - self.last_beat < self.timeout_s:
                continue
            log.error("no optimizer step completed for %.0f s after step %d (train.stall_timeout_min): the Python "
                      "stacks of this rank follow", time.monotonic() - self.last_beat, self.step)
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            try:
                self.on_stall(self.step)
            except Exception:  # noqa: BLE001 - the process ends below whatever happened
                log.exception("the stall handler failed")
            os._exit(1)  # on_stall ends the process; should it return or fail, the watchdog does
