"""What a start runs: the segjobs code (git), the software versions, the GPU model and every rank's host.

    about = describe(trainer.host_group, trainer.rank)   # collective; rank 0 gets the start's fields

Recorded in run.json at each start (launcher.history describes the fields), so that `segjobs show` and
`segjobs status` can tell when a requeued job ran other code or software than the start before it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

log = logging.getLogger("segjobs.train")

GIT_TIMEOUT_S = 10  # a checkout on a slow network file system must not hold up the start
CHECKOUT = Path(__file__).resolve().parents[2]  # the folder holding launcher/


def git(checkout: Path, *args: str) -> bytes | None:
    """stdout of a read-only git command in `checkout`; None when git is missing, fails or takes too long.
    GIT_DIR and the like are dropped from the environment: the job's own must not point git elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(checkout), *args], capture_output=True,
                              timeout=GIT_TIMEOUT_S, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("git %s: %s", " ".join(args), exc)
        return None
    return done.stdout if done.returncode == 0 else None


def code_version(checkout: Path = CHECKOUT) -> dict | None:
    """{commit, dirty, diff_sha256} of `checkout` when it is the top of a git work tree; None otherwise (an
    installed wheel, no git, a repository without commits, one git refuses: another user's). A segjobs
    installed inside somebody else's repository (a venv in a project) is not that repository's code.
    diff_sha256 hashes `git diff HEAD --binary`: staged and unstaged changes of tracked files."""
    top = git(checkout, "rev-parse", "--show-toplevel")
    if top is None or Path(top.decode(errors="replace").strip()).resolve() != Path(checkout).resolve():
        return None
    commit, diff = git(checkout, "rev-parse", "HEAD"), git(checkout, "diff", "HEAD", "--binary")
    if commit is None or diff is None:
        return None
    return {"commit": commit.decode().strip(), "dirty": bool(diff),
            "diff_sha256": hashlib.sha256(diff).hexdigest() if diff else None}


def versions() -> dict[str, str]:
    """python, torch, timm, accelerate, segjobs; cuda and nccl when a GPU trains (a CPU run uses neither)."""
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("timm", "accelerate", "segjobs"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        if torch.version.cuda:
            found["cuda"] = torch.version.cuda
        if torch.distributed.is_nccl_available():
            found["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return found


def describe(host_group, rank: int) -> dict:
    """Collective over the host-side (gloo) group when there is one: every rank calls it. Rank 0 gets
    {code, versions, gpu, hosts}, the other ranks {}. `hosts` is every rank's host name, gathered once at
    the start (a few bytes per rank)."""
    import torch

    here = socket.gethostname()
    hosts = [here]
    if host_group is not None:
        hosts = [None] * torch.distributed.get_world_size() if rank == 0 else None
        torch.distributed.gather_object(here, hosts, dst=0, group=host_group)
    if rank != 0:
        return {}
    about = {"versions": versions(), "hosts": hosts}
    code = code_version()
    if code is not None:
        about["code"] = code
    if torch.cuda.is_available():
        about["gpu"] = torch.cuda.get_device_name()
    return about
