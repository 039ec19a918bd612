"""What a log step records about the machine: throughput, the data-wait share, memory and GPU utilisation.

    window = LogWindow(cuda=torch.cuda.is_available())
    batch = window.next_batch(batches)       # times the loader on the host
    window.samples += global_batch_of_this_micro_step
    with window.paused(): save(); evaluate() # not steps
    record.update(window.fields()); window.reset()   # after the log step's loss .item()

Nothing here synchronizes the device. The fields of metrics.jsonl it writes:
    samples_per_s   samples (all ranks) per second of the window's steps (checkpoints and evaluation excluded)
    data_wait       share of that time rank 0 waited in the loader's next(), measured on the host. `fields()`
                    is called after the log step's loss .item() (a sync the log step has anyway), so the window's
                    host time covers its device work: a GPU-bound loop waits in CUDA calls and reads near 0, a
                    loader-bound one near 1.
    rss_peak_gb     peak resident memory of rank 0's process since it started (GiB; getrusage): the memory
                    that matters on CPU, where torch's allocator keeps no statistics. Loader workers not included.
    peak_mem_gb     torch's peak allocated GPU memory of rank 0 since its process started (GiB); GPU only
    gpu_util        percent of NVML's last sample period (1/6 to 1 s, set by the GPU) in which a kernel ran on
                    rank 0's GPU: a sample at the log step, not the window's mean; GPU only, with nvidia-ml-py
    gpu_mem_gb      memory in use on rank 0's GPU as nvidia-smi shows it, every process and the CUDA context
                    included (GiB); GPU only, with nvidia-ml-py
    time            seconds since the epoch (segjobs show: when it was written)
On CPU the GPU fields are absent, never 0.
"""

from __future__ import annotations

import importlib.util
import logging
import resource
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import torch

log = logging.getLogger("segjobs.train")

GIB = 2**30


class LogWindow:
    """The steps since the last log step. Samples are counted by the caller (`samples += ...`)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.nvml = cuda and importlib.util.find_spec("pynvml") is not None  # the nvidia-ml-py package
        self.reset()

    def reset(self) -> None:
        self.start, self.wait, self.samples, self.pause_s = time.perf_counter(), 0.0, 0, 0.0

    def next_batch(self, batches: Iterator):
        """next(batches), None at the end of the epoch; the wait counts as data wait."""
        fetch = time.perf_counter()
        batch = next(batches, None)
        self.wait += time.perf_counter() - fetch
        return batch

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time that is not training steps (checkpoints, evaluation): left out of the window."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.pause_s += time.perf_counter() - start

    def fields(self) -> dict:
        elapsed = max(time.perf_counter() - self.start - self.pause_s, 1e-9)
        fields = {"samples_per_s": self.samples / elapsed, "data_wait": self.wait / elapsed, "time": time.time(),
                  "rss_peak_gb": peak_rss_bytes() / GIB}
        if self.cuda:
            fields["peak_mem_gb"] = torch.cuda.max_memory_allocated() / GIB
        if self.nvml:
            try:
                fields["gpu_util"] = torch.cuda.utilization()
                fields["gpu_mem_gb"] = torch.cuda.device_memory_used() / GIB
            except Exception as exc:  # noqa: BLE001 - NVML is a view: a driver without it must not end training
                log.warning("GPU utilisation is not recorded: NVML failed (%s)", str(exc)[:200])
                self.nvml = False
        return fields


def peak_rss_bytes() -> int:
    """This process's peak resident set size: ru_maxrss is KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
