"""Schedules of the optimizer as pure functions of the optimizer step: nothing is allocated per step, a
resumed run continues the same curve, and what `segjobs plan` shows is what runs.

    learning_rate(spec, step, total_steps)     # the rate of the step taken at `step` (0-based)
    weight_decay(spec, step, total_steps)
    cosine(0.996, 1.0, step, total_steps)      # DINO's teacher momentum
"""

from __future__ import annotations

import math

from launcher.spec import JobSpec


def cosine(base: float, final: float, step: int, total_steps: int) -> float:
    """Half a cosine from `base` at step 0 towards `final` at `total_steps` (DINO's cosine_scheduler)."""
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * step / max(total_steps, 1)))


def learning_rate(spec: JobSpec, step: int, total_steps: int) -> float:
    """Linear warmup from 0 over schedule.warmup_steps, then poly, cosine or constant down to schedule.min_lr."""
    sched, base = spec.schedule, spec.optim.lr
    warmup = min(sched.warmup_steps, total_steps)
    if step < warmup:
        return step * (base / warmup)
    done, rest = step - warmup, max(total_steps - warmup, 1)
    if sched.kind == "poly":
        return sched.min_lr + (base - sched.min_lr) * (1 - done / rest) ** sched.power
    if sched.kind == "cosine":
        return cosine(base, sched.min_lr, done, rest)
    return base


def weight_decay(spec: JobSpec, step: int, total_steps: int) -> float:
    """Cosine from optim.weight_decay to optim.weight_decay_end (DINO: 0.04 -> 0.4), else constant."""
    start, end = spec.optim.weight_decay, spec.optim.weight_decay_end
    return start if end is None else cosine(start, end, step, total_steps)
