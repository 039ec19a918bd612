"""The training loop, the same for every model family (the family's Task supplies the rest).

    run_spec(load_spec("jobs/demo_segmenter.yaml"), "jobs/demo_segmenter.yaml")   # what every rank runs

Started by `segjobs train`, `-m launcher.train` (accelerate launch, torchrun) or a SLURM job
(launcher.cluster.job). Rank and world size come from the environment. A run directory that already holds
checkpoints is resumed from the latest one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

from launcher import checkpoint as layout
from launcher import runs
from launcher.runlock import RunLock
from launcher.checkpoint import CheckpointError
from launcher.errors import WorkFailed
from launcher.spec import MAX_STEPS, JobSpec, SpecError, check_environment, resume_conflict, resume_fingerprint
from launcher.training.checkpointer import Checkpointer, drop_state_not_saved, set_rng_state
from launcher.training.families import task_for_model
from launcher.training.families.base import StepContext
from launcher.training.metrics_log import LiveView, MetricsLog, to_json
from launcher.training.parallel import build_accelerator, make_wrap, raw_optimizer
from launcher.training.runtime import describe
from launcher.training.schedules import Horizon, peak_learning_rate
from launcher.training.utilisation import LogWindow
from launcher.training.watchdog import StallWatchdog
from shards.reader import verify_splits

log = logging.getLogger("segjobs.train")


class DivergedError(WorkFailed):
    """The loss became NaN or infinite (exit status 1)."""


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken
    samples: int = 0  # training samples consumed, all ranks


class Trainer:
    def __init__(self, spec: JobSpec, source: str):
        from accelerate.utils import set_seed

        from shards.loader import build_loader

        self.spec, self.source = spec, source
        task_class = task_for_model(spec.model.name)
        if not task_class.supports_grad_accum and spec.train.grad_accum != 1:
            raise SpecError(f"{source}: train.grad_accum: {spec.model.name} takes several optimizer steps per batch; "
                            f"expected 1, found {spec.train.grad_accum}.")
        cuda = torch.cuda.is_available()
        if spec.train.precision == "fp16" and not cuda:
            raise SpecError(f"{source}: train.precision: fp16 needs a GPU; use bf16 or no on CPU.")
        collective_timeout = timedelta(minutes=spec.train.collective_timeout_min)
        self.accelerator = accelerator = build_accelerator(spec.train.precision, spec.train.grad_accum,
                                                            task_class.ddp_find_unused_parameters, collective_timeout)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        if not accelerator.is_main_process:
            logging.getLogger("segjobs").setLevel(logging.WARNING)  # progress is logged by rank 0
        self.run_dir = spec.run_dir
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", accelerator.is_main_process)

        if spec.data.verify and accelerator.is_main_process:
            verify_splits([spec.data.train, *([spec.data.val] if spec.data.val else [])])
            log.info("data.verify: every shard matches its manifest")
        loader_options = dict(seed=spec.seed, num_workers=spec.data.num_workers, shuffle_buffer=spec.data.shuffle_buffer,
                              skip_corrupt=spec.data.skip_corrupt, pin_memory=cuda)
        self.train_loader = build_loader(spec.data.train, task_class.train_pipeline(spec), batch_size=spec.data.batch_size,
                                         rank=self.rank, world_size=self.world, **loader_options)
        self.eval_loader = None
        if spec.data.val is not None:
            # Each rank evaluates its share, except under FSDP, whose all-gathers need the same number of
            # forwards on every rank: there every rank evaluates the whole split.
            sharded = spec.train.strategy != "fsdp"
            self.eval_loader = build_loader(spec.data.val, task_class.eval_pipeline(spec), batch_size=spec.data.eval_batch_size,
                                            rank=self.rank if sharded else 0, world_size=self.world if sharded else 1,
                                            train=False, **{**loader_options, "pin_memory": False})
        self.horizon = Horizon.for_samples(spec, self.train_loader.stream.num_samples, self.world)  # as `segjobs plan`
        self.steps_per_epoch, self.global_batch = self.horizon.steps_per_epoch, self.horizon.global_batch
        self.total_steps = self.horizon.stop
        if self.horizon.steps > MAX_STEPS:
            raise SpecError(f"{source}: train.epochs: {spec.train.epochs} epochs of {self.steps_per_epoch} steps is "
                            f"{self.horizon.steps:,} steps, over the {MAX_STEPS:,} a schedule may span.")
        if spec.optim.lr_scaling == "linear256":
            log.info("lr_scaling linear256: peak learning rate %.3g = %g x global batch %d / 256",
                     peak_learning_rate(spec, self.global_batch), spec.optim.lr, self.global_batch)
        set_seed(spec.seed)  # identical initial weights on every rank
        self.task = task_class(spec, accelerator, self.horizon)
        self.schedules = task_class.schedules(spec, self.horizon)  # what `segjobs plan` shows
        self.task.check_data(self.train_loader.manifest)
        wrap = make_wrap(accelerator, spec.train.strategy, spec.train.compile, channels_last=task_class.channels_last,
                         shard_units=self.task.shard_units)
        self.task.parallel_wrap(wrap)
        self.task.optimizers = [accelerator.prepare_optimizer(o) for o in self.task.optimizers]
        self.checkpointer = Checkpointer(layout.checkpoints_folder(self.run_dir), spec.checkpoint.keep, self.rank, self.world)
        self.progress = Progress()
        self.checkpoint_requested = self.stop_requested = self.stopped = False
        self.terminate_requested = self.terminated = False
        self.on_stall: Callable[[int], None] = self._stalled  # a SLURM job replaces it: a stall is a fault there
        minutes = spec.train.stall_timeout_min
        self.watchdog = StallWatchdog(60 * minutes if minutes else math.inf, lambda step: self.on_stall(step))
        # SIGTERM is agreed on at every step over the host (gloo), never by a device sync.
        self.host_group = (torch.distributed.new_group(backend="gloo", timeout=collective_timeout)
                           if self.world > 1 else None)
        if not self._resume():
            # Dropout and drop path differ across ranks, as in the references (seed + rank).
            set_seed(spec.seed + self.rank + self.progress.step)
        self.redo_steps = self.metrics.truncate_after(self.progress.step)  # what a stopped start did past it
        if accelerator.is_main_process:  # only now: a refused resume leaves the run directory untouched
            (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "spec.yaml").write_text(spec.to_yaml())
        accelerator.wait_for_everyone()

    def request_termination(self) -> None:
        """SIGTERM (a preemption with a grace time, or a cancel): every rank checkpoints together at the next step
        boundary and the run stops. Only sets a flag, so a signal handler may call it."""
        self.terminate_requested = True

    def request_checkpoint(self, stop: bool = False) -> None:
        """Ask for a checkpoint at the next log step and, with stop=True, to end the run after it (SIGUSR2 before
        a requeue). Only sets flags, so a signal handler may call it; rank 0's flags decide for every rank."""
        self.checkpoint_requested = True
        self.stop_requested = self.stop_requested or stop

    # ---- state -----------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Collective: every rank calls it (FSDP gathers the full weights for rank 0)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        with self.watchdog.paused():  # gathering the state is collective too
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model = self.task.model
            shared = {
                "model": get_model_state_dict(model, options=options),
                "optimizers": [get_optimizer_state_dict(model, raw_optimizer(o), options=options) for o in self.task.optimizers],
                "task": self.task.extra_state(),
                "loader": self.train_loader.state_dict(),
                "progress": vars(self.progress).copy(),
            }
            # The spec travels with the checkpoint: `segjobs eval` and `visualize` rebuild the model from it alone.
            meta = {"resume": resume_fingerprint(self.spec), "time": time.time(), "spec": self.spec.model_dump(mode="json")}
            path = self.checkpointer.save(self.progress.step, shared if self.rank == 0 else None, meta)
        log.info("checkpoint %s", path)
        return path

    def _resume(self) -> bool:
        """Load the latest checkpoint, if any; True when this rank's RNG state was restored too."""
        if self.accelerator.is_main_process:
            self.checkpointer.set_aside_damaged()
        self.accelerator.wait_for_everyone()
        latest = self.checkpointer.latest()
        if latest is None:
            return False
        shared, meta, rng = self.checkpointer.load(latest)
        conflict = resume_conflict(meta["resume"], self.spec)
        if conflict:
            raise SpecError(f"{self.source}: cannot resume {latest}: {conflict}. Use another name or output_dir for a new run.")
        try:
            self._restore(shared, rng)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
            # The files match meta.json, yet hold something else than the checkpointer writes (edited and resealed).
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise CheckpointError(f"{latest}: its files are not the state segjobs writes ({type(exc).__name__}: {first}); "
                                  "move the folder away to resume from the checkpoint before it.") from None
        elastic = "" if meta["world_size"] == self.world else f" with {self.world} processes instead of {meta['world_size']} (elastic: the loader splits the rest of the epoch)"
        log.info("resumed from %s at step %d%s", latest, self.progress.step, elastic)
        return rng is not None

    def _restore(self, shared: dict, rng: dict | None) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        if not isinstance(shared, dict) or not (rng is None or isinstance(rng, dict)):
            raise TypeError("shared.pt and the RNG file hold dicts")
        model = self.task.model
        set_model_state_dict(model, shared["model"], options=StateDictOptions(full_state_dict=True))
        # Not strict: a parameter that never had a gradient (DINO's last layer in its first epoch) has no
        # optimizer state in the checkpoint, exactly as in the run that wrote it.
        optimizer_options = StateDictOptions(full_state_dict=True, strict=False)
        if len(shared["optimizers"]) != len(self.task.optimizers):
            raise ValueError(f"{len(shared['optimizers'])} optimizer states for {len(self.task.optimizers)} optimizers")
        for optimizer, state in zip(self.task.optimizers, shared["optimizers"]):
            set_optimizer_state_dict(model, raw_optimizer(optimizer), state, options=optimizer_options)
            drop_state_not_saved(raw_optimizer(optimizer), state)
        self.task.load_extra_state(shared["task"])
        self.train_loader.load_state_dict(shared["loader"])
        self.progress = Progress(**shared["progress"])
        if rng is not None:
            set_rng_state(rng)

    # ---- the loop --------------------------------------------------------------------------------------
    def run(self) -> dict:
        if self.progress.step >= self.total_steps:
            log.info("already trained %d steps", self.progress.step)
        view = LiveView(self.run_dir, self.total_steps, self.progress.step, self.accelerator.is_main_process)
        if self.spec.train.stall_timeout_min:
            self.watchdog.start()
        try:
            last_eval = self._loop(view)
        finally:
            self.watchdog.close()
            view.close()
        return {"step": self.progress.step, "total_steps": self.total_steps, "eval": last_eval,
                "stopped": self.stopped, "terminated": self.terminated, "main": self.accelerator.is_main_process}

    def _loop(self, view: LiveView) -> dict | None:
        spec, accelerator = self.spec, self.accelerator
        batch_size = spec.data.batch_size * self.world
        # Schedules follow samples seen, counted at optimizer steps: after an elastic resume, the same curve.
        step_samples = self.progress.samples
        running: dict[str, torch.Tensor] = {}
        window = LogWindow(cuda=torch.cuda.is_available())
        last_checkpoint = time.monotonic()
        last_eval: dict | None = None
        while self.progress.step < self.total_steps and not self.stopped:
            epoch = self.train_loader.epoch
            batches = iter(self.train_loader)
            while self.progress.step < self.total_steps:
                batch = window.next_batch(batches)
                if batch is None:
                    break
                step, position = self.progress.step, step_samples / self.global_batch
                lr = apply_schedules(self.task.optimizers, self.schedules, position)
                context = StepContext(step=step, epoch=epoch, position=position, accelerator=accelerator)
                losses = self.task.train_step(batch, context)
                for name, value in losses.items():
                    running[name] = running.get(name, 0) + value
                window.samples += batch_size
                self.progress.samples += batch_size
                if not accelerator.sync_gradients:
                    continue
                self.progress.step += 1
                step, step_samples = self.progress.step, self.progress.samples
                self.watchdog.beat(step)
                if step % spec.train.log_every == 0 or step == self.total_steps:
                    record = {"step": step, "epoch": epoch, "lr": lr, "skipped": self.train_loader.skipped}
                    for name, total in running.items():
                        record[name] = accelerator.reduce(total.detach().float(), reduction="mean").item() / (
                            window.samples // batch_size)
                    record.update(window.fields())  # after .item(): the window's time includes its device work
                    self.metrics.write(record)
                    if not math.isfinite(record["loss"]):
                        raise DivergedError(self._divergence(record["loss"], step))
                    view.update(step, record)
                    log.info("step %d/%d loss %.4f lr %.2e %.1f samples/s", step, self.total_steps, record["loss"], record["lr"], record["samples_per_s"])
                    running = {}
                    window.reset()
                    # Time and signals differ across ranks: rank 0 decides, at log steps (already a sync point).
                    overdue = bool(spec.checkpoint.every_minutes) and time.monotonic() - last_checkpoint > 60 * spec.checkpoint.every_minutes
                    save, stop = self._agree(overdue or self.checkpoint_requested, self.stop_requested)
                    if save or stop:
                        with window.paused():
                            self.save()
                        self.checkpoint_requested = False
                        last_checkpoint = time.monotonic()
                    if stop:
                        self.stopped = True
                        log.info("stopping at step %d after the checkpoint, as requested", step)
                        break
                else:
                    view.update(step)
                if self._terminating():  # at every step: a grace time is short (the metrics window restarts)
                    self.save()
                    self.stopped = self.terminated = True
                    log.info("SIGTERM: stopped at step %d after the checkpoint", step)
                    break
                with window.paused():
                    if spec.checkpoint.every_steps and step % spec.checkpoint.every_steps == 0 and step < self.total_steps:
                        self.save()
                        last_checkpoint = time.monotonic()
                    if self.eval_loader is not None and spec.train.eval_every and step % spec.train.eval_every == 0 and step < self.total_steps:
                        last_eval = self.evaluate()
        if self.stopped:
            self.train_loader.close()
            return last_eval
        if self.checkpointer.latest() is None or self.checkpointer.steps()[-1] != self.progress.step:
            self.save()
        if self.eval_loader is not None:
            last_eval = self.evaluate()
            view.update(self.progress.step, {"eval": {k: v for k, v in last_eval.items() if k != "iou"}})
        self.train_loader.close()
        return last_eval

    def _divergence(self, loss: float, step: int) -> str:
        latest = self.checkpointer.latest()
        resume = f"the last checkpoint is {latest}" if latest else "there is no checkpoint yet"
        return (f"{self.source}: the loss is {loss} at step {step}; training stopped ({resume}). Lower optim.lr, "
                "lengthen schedule.warmup_steps or set train.clip_grad, then train again (it resumes).")

    def _terminating(self) -> bool:
        """Whether any rank got SIGTERM: one integer all-reduced over the host group at every step."""
        if self.host_group is None:
            return self.terminate_requested
        flag = torch.tensor([int(self.terminate_requested)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.host_group)
        return bool(flag.item())

    def _stalled(self, step: int) -> None:
        """No step for train.stall_timeout_min (the watchdog's thread, the stacks are written): end the process."""
        if self.accelerator.is_main_process:
            runs.failed(self.run_dir, f"stalled at step {step}: no optimizer step for {self.spec.train.stall_timeout_min:g} "
                                      "minutes (train.stall_timeout_min); the Python stacks are in the log")
        os._exit(1)

    def _agree(self, *decisions: bool) -> list[bool]:
        """Rank 0's decisions, on every rank (time and signals differ across ranks; the ranks must not)."""
        flags = torch.tensor([1.0 if d else 0.0 for d in decisions], device=self.accelerator.device)
        if self.world > 1:
            torch.distributed.broadcast(flags, src=0)
        return [bool(f) for f in flags.tolist()]

    def evaluate(self) -> dict:
        with self.watchdog.paused():
            result = self.task.evaluate(self.eval_loader, self.accelerator)
        step = self.progress.step
        if self.accelerator.is_main_process:
            (self.run_dir / "eval").mkdir(exist_ok=True)
            (self.run_dir / "eval" / f"{layout.step_name(step)}.json").write_text(to_json(result, indent=1))
            self.metrics.write({"step": step, "epoch": self.train_loader.epoch,
                                "eval": {k: v for k, v in result.items() if k != "iou"}})
        log.info("eval at step %d: mIoU %.4f, pixel accuracy %.4f", step, result["miou"], result["pixel_acc"])
        return result


def apply_schedules(optimizers, schedules: dict, position: float) -> float:
    """Set every group's learning rate, and the decaying groups' weight decay, for the step at `position`, from
    the family's schedules (main_dino.py: param_group["lr"] = lr_schedule[it]; the regularized group's weight
    decay likewise). Returns the learning rate."""
    lr, decay = schedules["lr"](position), schedules["weight_decay"](position)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
            if group.get("decay"):
                group["weight_decay"] = decay
    return lr


def run_spec(spec: JobSpec, source: str, job_id: str | None = None, cluster: str = "foreground", restart_count: int = 0,
             on_trainer: Callable[[Trainer], None] | None = None,
             job_running: Callable[[str], bool | None] | None = None, record_failure: bool = True) -> dict:
    """Build the trainer and run it, holding the run lock and keeping run.json up to date (rank 0).
    `on_trainer` sees the trainer before the loop starts (the SLURM job attaches its signal handler);
    `job_running` asks SLURM whether a lock holder's job still runs (see launcher.runlock.stale_reason);
    `record_failure=False` leaves an error's state to the caller (a job tells a fault, requeued, from a failure)."""
    check_environment(spec, source)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # known before the Accelerator: rank 0 takes the run
    if main_rank:  # the other ranks would see rank 0's lock files appear
        runs.check_run_dir(spec.run_dir, source)
    with RunLock(spec.run_dir, job_id, job_running) if main_rank else contextlib.nullcontext():
        return _run_locked(spec, source, job_id, cluster, restart_count, on_trainer, record_failure)


def _run_locked(spec: JobSpec, source: str, job_id: str | None, cluster: str, restart_count: int,
                on_trainer: Callable[[Trainer], None] | None, record_failure: bool) -> dict:
    trainer = Trainer(spec, source)
    main = trainer.accelerator.is_main_process
    about = describe(trainer.host_group, trainer.rank)  # collective: every rank's host
    if main:
        start = {"job_id": job_id, "time": time.time(), "restart_count": restart_count, "world_size": trainer.world,
                 "from_step": trainer.progress.step, "redo_steps": trainer.redo_steps, **about}
        runs.started(trainer.run_dir, start, name=spec.name, model=spec.model.name, cluster=cluster,
                     total_steps=trainer.total_steps, global_batch=trainer.global_batch)
    if on_trainer is not None:
        on_trainer(trainer)
    try:
        result = trainer.run()
    except (Exception, KeyboardInterrupt) as exc:
        if main and record_failure:
            error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, KeyboardInterrupt):
                runs.cancelled(trainer.run_dir, error)
            else:
                runs.failed(trainer.run_dir, error)
        raise
    finally:
        trainer.train_loader.close()
    if main and not result["stopped"]:
        runs.completed(trainer.run_dir)
    # Only after a clean run: a rank that failed must not wait in a barrier that another rank, stuck in a
    # collective, never reaches. Destroying the group before exit keeps gloo's threads from aborting.
    if trainer.accelerator.num_processes > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result
