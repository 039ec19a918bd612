"""The workstation entry: one rank of a run, started by accelerate launch or torchrun.

    accelerate launch --multi_gpu -m launcher.train jobs/segmenter_tiny16.yaml        # a GPU workstation
    torchrun --standalone --nproc_per_node 2 -m launcher.train jobs/demo_segmenter.yaml   # CPU, 2 processes, gloo
    python -m launcher.train jobs/demo_segmenter.yaml --set train.max_steps=50        # one process

The same as `segjobs train` (arguments, exit status, errors). Note: `accelerate launch --cpu --num_processes 2`
starts one process; on CPU use torchrun.
"""

from __future__ import annotations

import logging
import os
import sys

from launcher.cli import main as segjobs


def main(argv: list[str] | None = None) -> int:
    status = segjobs(["train", *(sys.argv[1:] if argv is None else argv)])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # One process of several (torchrun, accelerate launch, SLURM): leave without interpreter finalization,
        # where gloo's worker threads can abort or crash the process after a successful run (seen on CPU).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
