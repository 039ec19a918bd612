"""Fault handling without a cluster: the stall watchdog, the fault record and its budget, what counts as a lost
rank. tests/slurm/test_faults.py runs the same paths in real jobs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from launcher import runs
from launcher.cluster.job import communication_failure

WATCHED = """
import sys, time
from launcher.training.watchdog import StallWatchdog
watchdog = StallWatchdog({timeout}, on_stall=lambda step: print("stalled at", step, flush=True))
watchdog.start()
for step in range(1, 6):
    time.sleep(0.05)
    watchdog.beat(step)
with watchdog.paused():
    time.sleep({paused})
watchdog.beat(6)
time.sleep({hang})
print("finished", flush=True)
"""


def run_watched(timeout: float, paused: float, hang: float) -> subprocess.CompletedProcess:
    code = textwrap.dedent(WATCHED.format(timeout=timeout, paused=paused, hang=hang))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_a_stall_dumps_every_threads_stack_and_ends_the_process():
    done = run_watched(timeout=0.5, paused=0.0, hang=30)
    assert done.returncode == 1 and "stalled at 6" in done.stdout and "finished" not in done.stdout
    assert "Thread" in done.stderr and "most recent call first" in done.stderr and "<module>" in done.stderr


def test_steps_and_pauses_keep_the_watchdog_quiet():
    start = time.monotonic()
    done = run_watched(timeout=0.5, paused=1.5, hang=0.2)  # a checkpoint longer than the timeout: not a stall
    assert done.returncode == 0 and "finished" in done.stdout and "stalled" not in done.stdout, done.stderr
    assert time.monotonic() - start < 30


def fault(restart: int, rank: int = 0) -> dict:
    return {"job_id": "7", "restart_count": restart, "time": time.time(), "kind": "stall", "step": 10 * restart,
            "rank": rank, "host": "n1", "detail": f"stalled at step {10 * restart}"}


def test_a_fault_is_recorded_once_per_start_and_requeued_until_max_faults(tmp_path):
    assert runs.faulted(tmp_path, fault(0), max_faults=2) == (True, True)
    assert runs.faulted(tmp_path, fault(0, rank=1), max_faults=2) == (False, True), "another rank, the same fault"
    record = runs.read_run(tmp_path)
    assert record["state"] == "REQUEUED" and record["error"] == "stalled at step 0" and len(record["faults"]) == 1
    assert runs.faulted(tmp_path, fault(1), max_faults=2) == (True, True)
    assert runs.faulted(tmp_path, fault(2), max_faults=2) == (True, False)
    assert runs.faulted(tmp_path, fault(2, rank=1), max_faults=2) == (False, False)
    record = runs.read_run(tmp_path)
    assert record["state"] == "FAILED" and "resources.max_faults=2" in record["error"]
    assert [f["requeued"] for f in record["faults"]] == [True, True, False]


@pytest.mark.parametrize("message, lost", [
    ("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:44946", True),
    ("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 60000ms for recv operation to complete", True),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)", False),
])
def test_only_communication_failures_count_as_a_lost_rank(message, lost):
    assert communication_failure(RuntimeError(message)) is lost
    assert communication_failure(ValueError(message)) is False
