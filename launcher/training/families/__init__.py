"""Every model family the trainer runs; importing this package registers them (one line per family).

    from launcher.training.families import task_for_model
    task_class = task_for_model("segmenter_t16_mask")      # SegmenterTask

A family is models/<x>.py (its networks) plus a module here with a registered Task (see base.Task).
"""

from launcher.training.families import dino, segmenter, wnet  # noqa: F401 - importing registers them
from launcher.training.families.registry import family_names, register_family, task_class, task_for_model

__all__ = ["family_names", "register_family", "task_class", "task_for_model"]
