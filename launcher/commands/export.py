"""`segjobs export`: a run's trained network as one .safetensors file that `models.create` loads back.

    segjobs export demo_segmenter --out segmenter.safetensors
    segjobs export runs/demo_dino/checkpoints/step_00000300 --out dino_teacher.safetensors

    import models
    network = models.create("segmenter_t16_mask", pretrained="segmenter.safetensors").eval()

The file holds the state dict of the network the family evaluates and draws (Segmenter and W-Net: the model;
DINO: the teacher, the network the paper evaluates) and, in the safetensors metadata entry "segjobs", the JSON
config {"format": "segjobs-export/1", "model", "options", "run", "step", "normalization"}: one file that
cannot lose its config, whose header any safetensors reader shows. `models.create(name, pretrained=FILE)`
builds the variant with those options and loads every tensor exactly (models.pretrained.build_exported).
"normalization" names the input statistics the network expects (data.normalization: vit or imagenet).

An existing --out is replaced only when it is a segjobs export itself, or with --force.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from launcher.errors import InputError


def export(target: str, out: Path, force: bool = False) -> Path:
    from safetensors.torch import save_file

    from launcher import checkpoint as layout
    from launcher.training.restore import restore
    from models.pretrained import EXPORT_FORMAT, EXPORT_KEY, PretrainedError, read_export

    if out.suffix != ".safetensors":
        raise InputError(f"--out {out}: expected a file name ending in .safetensors.")
    if out.exists() and not force:
        try:
            ours = out.is_file() and read_export(out) is not None
        except PretrainedError:
            ours = False
        if not ours:
            raise InputError(f"--out {out}: exists and is not a segjobs export; nothing was written. Choose another "
                             "name, or pass --force to replace it.")
    spec, task, _, checkpoint = restore(target, device="cpu")
    network = task.picture_network()
    # clone: safetensors refuses tensors that share memory (tied weights, views)
    state = {key: value.detach().cpu().contiguous().clone() for key, value in network.state_dict().items()}
    config = {"format": EXPORT_FORMAT, "model": spec.model.name, "options": spec.model.options, "run": spec.name,
              "step": layout.read_meta(checkpoint)["step"], "normalization": spec.data.normalization}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp), metadata={EXPORT_KEY: json.dumps(config)})
    os.replace(tmp, out)
    return out


def main(target: str, out: Path, force: bool) -> int:
    print(export(target, out, force))
    return 0
