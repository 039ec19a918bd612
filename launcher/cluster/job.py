"""Inside a submitted job: the distributed environment from SLURM, the requeue signal, the trainer call.

Requeue: SLURM sends SIGUSR2 `resources.signal_delay_s` before the time limit (and a preempting scheduler may
send it at any time). Every rank's handler only sets a flag; at the next log step rank 0's flag is broadcast,
all ranks write the checkpoint together (FSDP gathers from every rank), rank 0 runs `scontrol requeue`, and the
next start resumes from that checkpoint. This replaces submitit's own handler, which checkpoints on rank 0
alone. A signal counts as a timeout when it comes within signal_delay_s (+90 s: SLURM may signal up to a
minute early) of the time limit, else as a preemption; timeouts are bounded by `resources.max_requeues`,
preemptions are not.

The time limit is the job's real end time, which rank 0 reads from squeue a few times an hour (`watch_end_time`):
an administrator may change the limit of a running job, and a requeued job's limit counts from its new start.
When no SIGUSR2 has come by signal_delay_s before that end time, the job checkpoints and requeues by itself.

SIGTERM (a preemption with a grace time, `scancel`, `segjobs cancel`): every rank checkpoints at the next step
boundary (agreed over a host-side process group), then the job waits for SLURM to requeue or end it
(`wait_for_slurm`).

Faults: a rank lost (its node died; the survivors' collectives fail, or time out after
train.collective_timeout_min) or a stalled step (train.stall_timeout_min) ends the start; the first rank to
report it records it in run.json and requeues the job while resources.max_faults allows (`report_fault`).

Nothing here imports torch at import time: the login node pickles TrainingJob without it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib

import submitit
import yaml

from launcher import runs
from launcher.cluster import queue
from launcher.spec import JobSpec, parse_spec

log = logging.getLogger("segjobs.submit")

# After SIGTERM's checkpoint, how long to wait for SLURM's kill (GraceTime, KillWait are usually seconds to
# minutes): a SIGTERM sent by hand (`scancel --signal=TERM`) would otherwise hold the job to its time limit.
SIGTERM_WAIT_S = 1800
# Seconds of slack when telling a timeout from a preemption: SLURM may send --signal up to 60 s early.
SIGNAL_SLACK_S = 90
# How often rank 0 reads the job's end time: a tenth of the time left, within these bounds (6 times an hour at most).
END_TIME_POLL_S = (15, 600)
# After a fault, how long a rank waits for SLURM to kill the requeued job: exiting at once could end the job
# FAILED before the requeue (from another rank, a moment later) reaches the controller.
FAULT_WAIT_S = 120
# What a collective says when a peer is gone or silent (gloo and NCCL put these in their RuntimeErrors).
COMMUNICATION_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "Broken pipe",
                          "NCCL communicator was aborted", "NCCL error", "Watchdog caught collective operation timeout")


def master_port(job_id: str) -> int:
    """A port derived from the job id: two jobs sharing a node use different ports, a requeued job the same."""
    return 20000 + zlib.crc32(job_id.encode()) % 20000


def distributed_environment(env) -> dict[str, str]:
    """torch.distributed's variables from submitit's view of the job (SLURM_* or the local executor's)."""
    if env.num_tasks == 1:
        return {}
    return {"MASTER_ADDR": "127.0.0.1" if env.cluster == "local" else env.hostnames[0],
            "MASTER_PORT": str(master_port(env.job_id)), "RANK": str(env.global_rank),
            "WORLD_SIZE": str(env.num_tasks), "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.num_tasks // env.num_nodes)}


class RequeueSignal:
    """SIGUSR2 -> checkpoint on every rank at the next log step, then stop so that rank 0 requeues the job.
    The handler only sets flags (it may interrupt a collective); rank 0's flags decide for all ranks."""

    def __init__(self, spec: JobSpec, timeouts_so_far: int):
        self.end_time = time.time() + 60 * spec.resources.timeout_min  # until SLURM tells the real one
        self.signal_delay_s = spec.resources.signal_delay_s
        self.timeouts_left = spec.resources.max_requeues - timeouts_so_far
        self.reason: str | None = None
        self.terminated = False
        self.trainer = None
        signal.signal(signal.SIGUSR2, self._handle)
        signal.signal(signal.SIGTERM, self._terminate)  # replaces submitit's, which ignores it

    def _handle(self, signum, frame) -> None:
        timed_out = time.time() >= self.end_time - self.signal_delay_s - SIGNAL_SLACK_S
        self._requeue("timeout" if timed_out else "preemption", "SIGUSR2")

    def _requeue(self, reason: str, why: str) -> None:
        self.reason = reason
        log.warning("%s (%s): checkpointing at the next log step", why, reason)
        if self.trainer is not None:
            self.trainer.request_checkpoint(stop=self.requeue_allowed)

    def _terminate(self, signum, frame) -> None:
        self.terminated = True
        log.warning("SIGTERM: checkpointing at the next step")
        if self.trainer is not None:
            self.trainer.request_termination()

    @property
    def requeue_allowed(self) -> bool:
        return self.reason == "preemption" or self.timeouts_left > 0

    def attach(self, trainer) -> None:
        self.trainer = trainer
        if self.reason is not None:  # the signal came while the trainer was being built
            trainer.request_checkpoint(stop=self.requeue_allowed)
        if self.terminated:
            trainer.request_termination()

    def watch_end_time(self, job_id: str) -> None:
        """Rank 0 of a SLURM job: follow the job's end time in a thread, and requeue as at a time limit
        signal_delay_s before it when SLURM's signal has not come by then."""
        threading.Thread(target=self._watch_end_time, args=(job_id,), name="segjobs-end-time", daemon=True).start()

    def _watch_end_time(self, job_id: str) -> None:
        while self.reason is None:
            self.end_time = job_end_time(job_id) or self.end_time
            due = self.end_time - self.signal_delay_s
            left = due - time.time()
            if left <= 0:
                self._requeue("timeout", f"the job ends at {time.ctime(self.end_time)}")
                return
            time.sleep(min(left, max(END_TIME_POLL_S[0], min(END_TIME_POLL_S[1], (self.end_time - time.time()) / 10))))


def job_end_time(job_id: str) -> float | None:
    """When SLURM will end the job (squeue's EndTime: its start plus its current time limit); None when squeue
    cannot tell (not reachable, no limit)."""
    try:
        done = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True,
                              timeout=queue.POLL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return queue.slurm_time(done.stdout.strip()) if done.returncode == 0 else None


def communication_failure(exc: BaseException) -> bool:
    """Whether an error says that another rank is gone or silent (a fault, not a bug of the run)."""
    import torch.distributed as dist

    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError)
                                               and any(m in str(exc) for m in COMMUNICATION_FAILURES))


def report_fault(spec: JobSpec, env, kind: str, step: int, detail: str) -> None:
    """Record a fault of this start in run.json (the first rank to report it) and requeue the job while
    resources.max_faults allows, else the run fails. Ends the process (os._exit: the main thread may be stuck)."""
    fault = {"job_id": env.job_id, "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)), "time": time.time(),
             "kind": kind, "step": step, "rank": env.global_rank, "host": socket.gethostname(), "detail": detail}
    if threading.current_thread() is threading.main_thread():  # (signal handlers can only be set there)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # nothing left to save: the requeue's SIGTERM ends this process
    first, requeue = runs.faulted(spec.run_dir, fault, spec.resources.max_faults if env.cluster == "slurm" else 0)
    log.error("fault at step %d: %s", step, detail)
    if first and requeue:
        log.warning("requeueing job %s after the fault (resources.max_faults=%d)", env.job_id, spec.resources.max_faults)
        subprocess.run(["scontrol", "requeue", env.job_id], timeout=60)
    sys.stdout.flush()
    sys.stderr.flush()
    if requeue:  # by this rank or another: SLURM ends this process
        time.sleep(FAULT_WAIT_S)
    os._exit(1)


def wait_for_slurm(step: int) -> None:
    """After SIGTERM's checkpoint: a job that exits by itself during a preemption's grace time ends FAILED and is
    not requeued, so wait for SLURM to finish what it started: it kills a preempted job after GraceTime and
    requeues it (the next start resumes from this checkpoint), and kills a cancelled one after KillWait (it ends
    CANCELLED; `segjobs resume` continues). Outside SLURM (submitit's local executor) there is nobody to wait for."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not os.environ.get("SLURM_JOB_ID"):
        sys.exit(128 + signal.SIGTERM)
    log.info("SIGTERM: checkpoint at step %d written; waiting for SLURM to requeue (preemption) or end (cancel) the "
             "job", step)
    deadline = time.monotonic() + SIGTERM_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(5)
    log.warning("SIGTERM: SLURM neither requeued nor ended the job in %d s (a signal sent by hand?); exiting",
                SIGTERM_WAIT_S)
    sys.exit(128 + signal.SIGTERM)


class TrainingJob(submitit.helpers.Checkpointable):
    """What every task of a submitted job runs: the distributed environment from SLURM, then the trainer.
    Submitit pickles it once; a requeued job runs the same pickle again and the trainer resumes.

    Note: SLURM may send SIGUSR2 up to a minute early, even while the job is still importing torch. The
    handler is installed first thing; before that (while submitit unpickles the job) submitit's own handler
    calls `checkpoint()`, inherited from Checkpointable: it requeues the job unchanged, and the next start
    resumes from the latest checkpoint."""

    def __init__(self, spec_yaml: str, source: str):
        self.spec_yaml, self.source = spec_yaml, source

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        spec = parse_spec(yaml.safe_load(self.spec_yaml), self.source)
        main = env.global_rank == 0
        # The budget is per submission: `segjobs resume` starts a new job with max_requeues again.
        try:
            requeues = runs.read_run(spec.run_dir).get("requeues", [])
        except runs.UnreadableRunError:  # the trainer's first transition sets it aside and starts a new record
            requeues = []
        timeouts = sum(1 for r in requeues if r.get("reason") == "timeout" and r.get("job_id") == env.job_id)
        requeue = RequeueSignal(spec, timeouts)
        os.environ.update(distributed_environment(env))
        handler = logging.StreamHandler(sys.stdout)  # submitit logs to its own handler: no root handler here
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger = logging.getLogger("segjobs")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        # torch would use every core of the node, whatever the job was given
        threads = str(min(int(os.environ.get("SLURM_CPUS_PER_TASK", spec.resources.cpus_per_task)), os.cpu_count() or 1))
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        import torch

        from launcher.training.trainer import run_spec

        torch.set_num_threads(int(threads))
        if main and env.cluster == "slurm":
            requeue.watch_end_time(env.job_id)
        try:
            result = run_spec(spec, self.source, job_id=env.job_id, cluster=env.cluster,
                              restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                              on_trainer=lambda trainer: self.prepare(trainer, requeue, spec, env),
                              job_running=queue.slurm_job_running, record_failure=False)
        except (runs.RunError, runs.RunLockedError):
            raise  # not this job's run to record in: a foreign folder, or another process holds the run
        except KeyboardInterrupt as exc:  # the local executor's cancel
            if main:
                runs.cancelled(spec.run_dir, f"KeyboardInterrupt: {exc}")
            raise
        except Exception as exc:  # also before the trainer exists (a refused resume, missing data)
            if requeue.trainer is not None and env.num_tasks > 1 and communication_failure(exc):
                report_fault(spec, env, "rank lost", requeue.trainer.progress.step,
                             f"a rank was lost at step {requeue.trainer.progress.step}: {str(exc).splitlines()[0][:300]}")
            if main:
                runs.failed(spec.run_dir, f"{type(exc).__name__}: {exc}")
            raise
        # The training is over: a SIGUSR2 from now on (SLURM may send it while the job finishes) must not kill
        # the exiting process, which SLURM would record as FAILED. SIG_IGN outlives the interpreter's shutdown.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        if result.get("terminated"):
            wait_for_slurm(result["step"])
        if result["stopped"]:
            if main:
                runs.requeued(spec.run_dir, env.job_id, requeue.reason, result["step"])
                log.info("requeueing job %s after a %s at step %d", env.job_id, requeue.reason, result["step"])
                env._requeue(requeue.timeouts_left)  # scontrol requeue (SLURM) or the local executor's exit code
            sys.exit(0)  # not a result: the requeued job runs again
        return {k: v for k, v in result.items() if k != "main"}

    def prepare(self, trainer, requeue: RequeueSignal, spec: JobSpec, env) -> None:
        """Before the loop starts: signals reach the trainer, and a stalled step is a fault of the job."""
        requeue.attach(trainer)
        minutes = spec.train.stall_timeout_min
        stacks = str(env.paths.stderr).replace(f"_{env.global_rank}_log.err", "_<rank>_log.err")
        trainer.on_stall = lambda step: report_fault(
            spec, env, "stall", step, f"stalled at step {step}: no step for {minutes:g} min (train.stall_timeout_min); "
                                      f"every rank's Python stacks are in {stacks}")
