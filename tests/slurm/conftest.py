"""tests/slurm/ needs a SLURM controller (`make test` starts tools/minicluster when it can). Without one these
tests skip with one line saying why, except under CI=true, where they fail."""

from __future__ import annotations

import os
import subprocess

import pytest



def slurm_answers() -> str | None:
    """None when sinfo reaches a controller with idle or mixed nodes, else why not."""
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        return "sinfo is not installed"
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s"
    if done.returncode != 0:
        return f"sinfo failed: {done.stderr.strip()}"
    return None


@pytest.fixture(scope="session")
def cluster() -> None:
    why = slurm_answers()
    if why is None:
        return
    message = (f"NO SLURM CLUSTER ({why}): tests/slurm skipped. Start one with `sudo tools/minicluster up` and "
               "`eval \"$(tools/minicluster env)\"`, or run `make test` as root.")
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
