"""How a network is spread over processes: the Accelerator, one wrapping function in a fixed order, unwrap.

`make_wrap` applies, in this order:
1. Move to the device (channels_last for convolutional networks: faster convolutions on GPUs).
2. Shard or replicate:
   - fsdp: torch's `fully_shard` (FSDP2) on every unit the family names (transformer blocks, U-Net modules),
     then on the root. Used directly rather than through Accelerate's FSDP plugin, which is not applied on
     CPU (MULTI_CPU under torchrun): this way FSDP runs, and is tested, on CPU with gloo exactly as on GPUs
     with NCCL.
   - ddp: Accelerate's DDP wrapper (`accelerator.prepare`), for trainable networks only.
   - none, or a single process: the plain module.
3. torch.compile, last, when asked (a compiled DDP/FSDP module keeps their communication hooks).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import torch
from torch import nn


def build_accelerator(precision: str, grad_accum: int = 1, find_unused_parameters: bool = False,
                      collective_timeout: timedelta = timedelta(minutes=30), cpu: bool = False):
    """The Accelerator of this process: GPU when there is one (and `cpu` is not asked), else CPU (gloo under torchrun).
    `collective_timeout` bounds every collective of the default process group (set when it is created: the
    first Accelerator of a process decides)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # Accelerate keeps process-wide state: reset it so that a second run in one process (tests, a notebook,
    # eval after training) gets its own precision and accumulation settings. The distributed setup
    # (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(cpu=cpu or not torch.cuda.is_available(), mixed_precision=precision, gradient_accumulation_steps=grad_accum,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters),
                                        InitProcessGroupKwargs(timeout=collective_timeout)])


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (FSDP2 and compile keep the module's own class and attributes)."""
    return getattr(module, "module", module)


def raw_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def make_wrap(accelerator, strategy: str, compile_model: bool, channels_last: bool,
              shard_units: Callable[[nn.Module], list[nn.Module]]):
    """A `wrap(module, trainable=True) -> module` applying the steps above; `shard_units(module)` are the
    submodules FSDP shards one by one (the family decides)."""
    distributed = accelerator.num_processes > 1 and strategy != "none"

    def wrap(module: nn.Module, trainable: bool = True) -> nn.Module:
        module = module.to(accelerator.device)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        if distributed and strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
            for unit in shard_units(module):
                fully_shard(unit, mesh=mesh)
            fully_shard(module, mesh=mesh)
        elif distributed and trainable:
            module = accelerator.prepare_model(module)
        if compile_model:
            module = torch.compile(module)
        return module

    return wrap
