"""How a network is spread over processes: one function, the steps in a fixed order.

1. Move to the device (channels_last for convolutional networks: faster convolutions on GPUs).
2. Shard or replicate:
   - fsdp: torch's `fully_shard` (FSDP2) on every transformer block / U-Net module, then on the root. Used
     directly rather than through Accelerate's FSDP plugin, which is not applied on CPU (MULTI_CPU under
     torchrun): this way FSDP runs, and is tested, on CPU with gloo exactly as on GPUs with NCCL.
   - ddp: Accelerate's DDP wrapper (`accelerator.prepare`), for trainable networks only.
   - none, or a single process: the plain module.
3. torch.compile, last, when asked (a compiled DDP/FSDP module keeps their communication hooks).
"""

from __future__ import annotations

import torch
from torch import nn


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The submodules FSDP shards one by one: transformer blocks and W-Net modules."""
    from timm.models.vision_transformer import Block

    from models.wnet import Module as WNetModule

    return [m for m in module.modules() if isinstance(m, (Block, WNetModule))]


def make_wrap(accelerator, strategy: str, compile_model: bool, channels_last: bool):
    """A `wrap(module, trainable=True) -> module` applying the steps above."""
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
