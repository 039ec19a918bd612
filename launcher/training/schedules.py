"""Schedules of the optimizer: the value of every optimizer step, computed up front (deterministic, resumable).

    lrs = learning_rates(spec, total_steps)     # lrs[step] is the rate of the step taken at `step`
    wds = weight_decays(spec, total_steps)
"""

from __future__ import annotations

import numpy as np

from launcher.spec import JobSpec


def learning_rates(spec: JobSpec, total_steps: int) -> np.ndarray:
    """The learning rate of every optimizer step, computed up front (deterministic, resumable)."""
    sched, base = spec.schedule, spec.optim.lr
    warmup = min(sched.warmup_steps, total_steps)
    steps = np.arange(total_steps - warmup)
    rest = max(total_steps - warmup, 1)
    if sched.kind == "poly":
        decay = sched.min_lr + (base - sched.min_lr) * (1 - steps / rest) ** sched.power
    elif sched.kind == "cosine":
        decay = sched.min_lr + 0.5 * (base - sched.min_lr) * (1 + np.cos(np.pi * steps / rest))
    else:
        decay = np.full(len(steps), base)
    return np.concatenate([np.linspace(0, base, warmup, endpoint=False), decay])


def weight_decays(spec: JobSpec, total_steps: int) -> np.ndarray:
    """Cosine from optim.weight_decay to optim.weight_decay_end (DINO: 0.04 -> 0.4), else constant."""
    start, end = spec.optim.weight_decay, spec.optim.weight_decay_end
    if end is None:
        return np.full(total_steps, start)
    return end + 0.5 * (start - end) * (1 + np.cos(np.pi * np.arange(total_steps) / max(total_steps, 1)))
