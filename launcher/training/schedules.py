"""Every schedule as a pure function of training progress: nothing is allocated per step, a resumed run continues
the same curve (at another world size too), and what `segjobs plan` shows is what runs.

    horizon = Horizon.of(spec, steps_per_epoch=19, global_batch=1024)
    learning_rate(spec, horizon, position)      # position: optimizer steps done, samples seen / global batch
    weight_decay(spec, horizon, position)
    cosine(0.996, 1.0, position, horizon.steps)  # DINO's teacher momentum

Semantics (facebookresearch/dino, utils.cosine_scheduler and main_dino.py):
- The horizon is train.epochs x steps per epoch when epochs is set, else train.max_steps. With both set,
  max_steps only stops training early: a run stopped at step k has followed the full run's curve up to k.
- Warmup rises linearly from 0 and reaches the peak on its last step (np.linspace, end point included), over
  schedule.warmup_epochs x steps per epoch, or schedule.warmup_steps; the decay spans the rest of the horizon.
- poly as segm's PolynomialLR: (peak - min_lr) x (1 - done / rest)^power + min_lr (Segmenter: power 0.9).
- optim.lr_scaling linear256: the peak is optim.lr x global batch / 256, for the global batch of this start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from launcher.spec import JobSpec, SpecError


@dataclass(frozen=True)
class Horizon:
    steps_per_epoch: int
    steps: int  # the length of every schedule, in optimizer steps
    stop: int  # where training stops: `steps`, or train.max_steps when it comes first
    global_batch: int
    warmup: int  # warmup steps

    @classmethod
    def for_samples(cls, spec: JobSpec, samples: int, world_size: int) -> "Horizon":
        """The horizon of a spec trained on `samples` training samples by `world_size` processes. Each rank
        reads floor(samples / (world_size x batch_size)) batches an epoch (shards.loader), `grad_accum` of
        them per optimizer step."""
        batches = samples // (world_size * spec.data.batch_size)
        if batches < spec.train.grad_accum:
            raise SpecError(f"train.grad_accum: an optimizer step takes {spec.train.grad_accum} batches of "
                            f"{spec.data.batch_size} on each of {world_size} processes, more than the {samples} training "
                            "samples hold; lower grad_accum or batch_size.")
        return cls.of(spec, batches // spec.train.grad_accum, spec.data.batch_size * spec.train.grad_accum * world_size)

    @classmethod
    def of(cls, spec: JobSpec, steps_per_epoch: int, global_batch: int) -> "Horizon":
        epochs, max_steps = spec.train.epochs, spec.train.max_steps
        steps = epochs * steps_per_epoch if epochs else max_steps
        stop = min(steps, max_steps) if max_steps else steps
        warmup_epochs = spec.schedule.warmup_epochs
        warmup = round(warmup_epochs * steps_per_epoch) if warmup_epochs is not None else spec.schedule.warmup_steps
        return cls(steps_per_epoch, steps, stop, global_batch, min(warmup, steps))

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch


def peak_learning_rate(spec: JobSpec, global_batch: int) -> float:
    """optim.lr, scaled by the linear rule of main_dino.py when optim.lr_scaling is linear256."""
    return spec.optim.lr * global_batch / 256 if spec.optim.lr_scaling == "linear256" else spec.optim.lr


def cosine(base: float, final: float, position: float, steps: int) -> float:
    """Half a cosine from `base` at position 0 towards `final` at `steps` (DINO's cosine_scheduler, no warmup)."""
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * position / max(steps, 1)))


def learning_rate(spec: JobSpec, horizon: Horizon, position: float) -> float:
    """Linear warmup to the peak, then poly, cosine or constant down to schedule.min_lr at the horizon, or step
    decay (the peak x gamma^floor(steps after the warmup / step_size), torch's StepLR, never below min_lr)."""
    sched, peak, warmup = spec.schedule, peak_learning_rate(spec, horizon.global_batch), horizon.warmup
    if position < warmup:
        return position * (peak / (warmup - 1)) if warmup > 1 else 0.0
    done, rest = position - warmup, max(horizon.steps - warmup, 1)
    if sched.kind == "step":
        return max(peak * sched.gamma ** (done // sched.step_size), sched.min_lr)
    if sched.kind == "poly":
        return sched.min_lr + (peak - sched.min_lr) * max(1 - done / rest, 0.0) ** sched.power
    if sched.kind == "cosine":
        return cosine(peak, sched.min_lr, done, rest)
    return peak


def weight_decay(spec: JobSpec, horizon: Horizon, position: float) -> float:
    """Cosine from optim.weight_decay to optim.weight_decay_end over the horizon (DINO: 0.04 -> 0.4), else constant."""
    start, end = spec.optim.weight_decay, spec.optim.weight_decay_end
    return start if end is None else cosine(start, end, position, horizon.steps)
