"""The job spec: one typed schema, loaded from YAML, overridden with --set, validated with clear errors.

    spec = load_spec("jobs/segmenter_tiny16.yaml", overrides=["train.max_steps=100", "data.batch_size=4"])

Pure: no torch at import (`check_environment` imports the model registry when called). Every knob lives here
(a command-line flag only overrides a field). Each field's description is its
documentation; README's spec reference is generated from this schema (`spec_reference()`).
A bad spec raises SpecError: one paragraph naming the file, the key path, what was expected and what was found.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from launcher.bounded_yaml import excerpt
from launcher.bounded_yaml import parse_yaml
from launcher.errors import InputError


class SpecError(InputError):
    """A job spec a user wrote that cannot run (exit status 2)."""


MAX_SPEC_BYTES = 1 << 20  # a job spec is a few kB
MAX_STEPS = 10**8  # the longest schedule horizon accepted (DINO ViT-S/16's 300 epochs on ImageNet: 375k steps)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class ModelSpec(Section):
    name: str = Field(description="A registered variant (see `segjobs models`), e.g. segmenter_t16_mask.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of the variant (e.g. img_size, drop_path_rate, out_dim, num_segments).")
    pretrained: str | None = Field(None, description="A local weights file (DINO, timm or Segmenter format) loaded before training.")


class DataSpec(Section):
    train: Path = Field(description="Shard folder of the training split (the one holding manifest.json).")
    val: Path | None = Field(None, description="Shard folder of the validation split; no evaluation without it.")
    batch_size: int = Field(8, ge=1, description="Samples per device per step (Segmenter paper: 8).")
    eval_batch_size: int = Field(1, ge=1, description="Samples per device in evaluation (sizes vary: 1 unless images share a size).")
    num_workers: int = Field(4, ge=0, description="Loader worker processes per rank.")
    shuffle_buffer: int = Field(2000, ge=1, description="Samples in the shuffle buffer after the shard shuffle.")
    skip_corrupt: bool = Field(False, description="Leave undecodable samples out (counted in metrics) instead of stopping.")
    verify: bool = Field(False, description="Check every shard's sha256 against its manifest before the first step (sizes are always checked).")
    crop_size: int = Field(512, ge=16, description="Segmenter: training crop (mmseg ADE20K: 512).")
    scale: tuple[int, int] = Field((2048, 512), description="Segmenter: resize scale before the random ratio (mmseg: 2048 x 512).")
    ratio_range: tuple[float, float] = Field((0.5, 2.0), description="Segmenter: random resize ratio range (mmseg: 0.5..2.0).")
    global_crop_size: int = Field(224, ge=16, description="DINO: global crop size (paper: 224).")
    local_crop_size: int = Field(96, ge=8, description="DINO: local crop size (paper: 96).")
    local_crops: int = Field(8, ge=0, description="DINO: local crops per image (main_dino.py default: 8).")
    global_scale: tuple[float, float] = Field((0.4, 1.0), description="DINO: area range of global crops (paper: 0.4..1.0).")
    local_scale: tuple[float, float] = Field((0.05, 0.4), description="DINO: area range of local crops (paper: 0.05..0.4).")
    image_size: int = Field(224, ge=16, description="W-Net: training crop size (paper: 224).")
    photometric: Literal["auto", "loader", "device"] = Field("auto", description="DINO and Segmenter: where the photometric augmentation runs (DINO: colour jitter, greyscale, blur, solarize; Segmenter: PhotoMetricDistortion). loader: Pillow in the loader workers. device: the loader draws the same parameters and the accelerator applies them to the batch (shards.photometric), so the CPU only decodes, crops, flips and resizes. auto: device when training on a GPU, loader otherwise. Resolved when training starts and recorded; both compute the same augmentation within a tenth of a grey level, but a resume that would switch is refused.")
    normalization: Literal["vit", "imagenet"] | None = Field(None, description="Segmenter: input statistics of the backbone's weights: vit (mean = std = 0.5, the ViT weights the paper starts from) or imagenet (DeiT, DINO). None: from model.pretrained's kind (imagenet without one). Recorded in checkpoints; evaluation and pictures use the same.")


class OptimSpec(Section):
    kind: Literal["adamw", "sgd"] = Field("adamw", description="adamw (DINO) or sgd (Segmenter paper, momentum 0.9).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (before lr_scaling).")
    lr_scaling: Literal["none", "linear256"] = Field("none", description="linear256: the peak is lr x global batch / 256, as main_dino.py computes it (DINO: lr 0.0005).")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (DINO: 0.04 rising to `weight_decay_end`).")
    weight_decay_end: float | None = Field(None, ge=0, description="Final weight decay of a cosine schedule (DINO: 0.4); None keeps it constant.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(False, description="SGD with Nesterov momentum (Segmenter: timm's `sgd`, which is Nesterov).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "OptimSpec":
        if self.nesterov and (self.kind != "sgd" or self.momentum == 0):
            raise ValueError("optim.nesterov needs optim.kind: sgd and a momentum above 0")
        return self


class ScheduleSpec(Section):
    kind: Literal["poly", "cosine", "constant", "step"] = Field("cosine", description="poly (Segmenter: power 0.9), cosine (DINO's cosine_scheduler) or constant, from the peak to min_lr over the horizon after the warmup; step: the peak x gamma every step_size steps (W-Net: / 10 every 1000).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0, reaching the peak on its last step, over this many optimizer steps.")
    warmup_epochs: float | None = Field(None, ge=0, le=10**6, description="The warmup in epochs instead (DINO: 10); replaces warmup_steps.")
    power: float = Field(0.9, gt=0, description="Exponent of the poly schedule.")
    min_lr: float = Field(0.0, ge=0, description="Final learning rate.")
    step_size: int = Field(1000, ge=1, le=MAX_STEPS, description="step: optimizer steps between two decays (W-Net paper: 1000).")
    gamma: float = Field(0.1, gt=0, le=1, description="step: the factor of each decay (W-Net paper: 0.1).")

    @model_validator(mode="after")
    def _one_warmup(self) -> "ScheduleSpec":
        if self.warmup_epochs is not None and self.warmup_steps:
            raise ValueError("set schedule.warmup_epochs or schedule.warmup_steps, not both")
        return self


class TrainSpec(Section):
    epochs: int | None = Field(None, ge=1, description="Passes over the training split: the horizon of every schedule is epochs x steps per epoch.")
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Optimizer steps to train: the schedules' horizon without epochs; with epochs it only stops training early, on the full run's curve.")
    precision: Literal["bf16", "fp16", "no"] = Field("bf16", description="Autocast dtype; bf16 needs no loss scaling. `no` for fp32 (and for bit-exact CPU tests).")
    strategy: Literal["ddp", "fsdp", "none"] = Field("ddp", description="How the model is replicated across processes (FSDP: torch's fully_shard, per block).")
    grad_accum: int = Field(1, ge=1, le=4096, description="Micro-batches per optimizer step.")
    clip_grad: float | None = Field(None, gt=0, description="Gradient clipping norm (DINO: 3.0, per parameter).")
    compile: bool = Field(False, description="torch.compile the model (GPU; the first steps are slow while it compiles).")
    log_every: int = Field(10, ge=1, description="Optimizer steps between metrics lines (the loss is read from the device only then).")
    eval_every: int | None = Field(None, ge=1, description="Optimizer steps between evaluations; the run always evaluates at its end when data.val is set.")
    collective_timeout_min: float = Field(30, gt=0, description="How long a rank waits in a collective (all-reduce, broadcast) for the others before it gives up and the job counts a fault: long enough for a checkpoint or an evaluation on the slowest rank. A rank whose node died is otherwise waited for forever.")
    stall_timeout_min: float | None = Field(30, gt=0, description="When no optimizer step completes for this long (checkpoints and evaluations not counted), every rank writes its Python stacks to its log and the job ends as a fault; null: never.")

    @model_validator(mode="after")
    def _length(self) -> "TrainSpec":
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set train.epochs or train.max_steps")
        return self


class CheckpointSpec(Section):
    every_steps: int | None = Field(1000, ge=1, description="Optimizer steps between checkpoints.")
    every_minutes: float | None = Field(None, gt=0, description="Also checkpoint when this much time has passed since the last one.")
    keep: int = Field(3, ge=1, description="Checkpoints kept (the newest ones).")


class DinoSpec(Section):
    teacher_temp: float = Field(0.04, gt=0, description="Final teacher temperature (paper: 0.04; above 0.07 is unstable).")
    warmup_teacher_temp: float = Field(0.04, gt=0, description="Initial teacher temperature.")
    warmup_teacher_temp_epochs: int = Field(0, ge=0, description="Epochs of linear teacher-temperature warmup (paper: 30 with 0.04 -> 0.07).")
    momentum_teacher: float = Field(0.996, gt=0, lt=1, description="Initial EMA momentum, cosine to 1 (paper: 0.996; 0.9995 for small batches).")
    freeze_last_layer: int = Field(1, ge=0, description="Epochs the head's last layer stays fixed (paper: 1).")


class WNetSpec(Section):
    radius: float = Field(5.0, gt=1, description="N-cut window radius in pixels (paper: 5).")
    sigma_i: float = Field(10.0, gt=0, description="N-cut intensity scale, for 0..255 pixel values (paper: 10).")
    sigma_x: float = Field(4.0, gt=0, description="N-cut spatial scale in pixels (paper: 4).")
    reconstruction: Literal["sum", "mean"] = Field("sum", description="The reconstruction loss: squared error summed over pixels and channels, per image, as the paper writes it (sum), or its mean over all values (mean: about H x W x 3 times weaker against the N-cut).")
    postprocess: Literal["none", "crf", "crf+merge"] = Field("none", description="Evaluation and pictures: the paper's post-processing, a dense CRF (5 mean-field iterations) and then merging adjacent segments by mean colour.")
    merge_segments: int = Field(8, ge=1, description="crf+merge: segments left per image after merging.")


class ResourcesSpec(Section):
    nodes: int = Field(1, ge=1, description="SLURM nodes.")
    gpus_per_node: int = Field(1, ge=0, description="GPUs per node; one task (process) per GPU.")
    tasks_per_node: int | None = Field(None, ge=1, description="Processes per node; default one per GPU, 1 on CPU-only nodes.")
    cpus_per_task: int = Field(8, ge=1, description="CPU cores per process (loader workers + 1).")
    mem_gb: float | None = Field(None, gt=0, description="Memory per node in GB.")
    timeout_min: int = Field(24 * 60, ge=1, description="SLURM time limit per submission; the job is requeued when it expires.")
    partition: str | None = Field(None, description="SLURM partition.")
    account: str | None = Field(None, description="SLURM account.")
    qos: str | None = Field(None, description="SLURM QOS.")
    constraint: str | None = Field(None, description="SLURM node constraint (e.g. a100).")
    exclude: str | None = Field(None, description="Nodes to avoid.")
    signal_delay_s: int = Field(120, ge=10, description="Seconds before the time limit when SLURM sends SIGUSR2: enough for train.log_every steps (the signal is acted on at a log step) plus writing a checkpoint.")
    max_requeues: int = Field(10, ge=0, description="Requeues after a time limit (preemptions are not counted).")
    max_faults: int = Field(3, ge=0, description="Requeues after a fault (a rank lost or a collective timed out, a stalled step), per submission; separate from max_requeues. The next fault fails the run.")
    setup: list[str] = Field(default_factory=list, description="Shell lines run before the job (module load, conda activate).")
    sbatch: dict[str, str] = Field(default_factory=dict, description="Extra sbatch options, without the leading --.")
    srun_args: list[str] = Field(default_factory=list, description="Extra arguments of the srun that starts the tasks (containers: pyxis' --container-image=IMAGE, --container-mounts=...).")


class JobSpec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name: letters, digits, '_', '.', '-'.")
    seed: int = Field(0, ge=0, description="Seeds model init, data order and augmentation: a run is a function of (spec, seed, world size).")
    output_dir: Path | None = Field(None, description="Run directory; default runs/<name>.")
    model: ModelSpec
    data: DataSpec
    optim: OptimSpec = Field(default_factory=OptimSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    train: TrainSpec
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    dino: DinoSpec = Field(default_factory=DinoSpec)
    wnet: WNetSpec = Field(default_factory=WNetSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @property
    def run_dir(self) -> Path:
        return self.output_dir or Path("runs") / self.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Changing these makes a checkpoint meaningless: resuming with a different value is refused.
RESUME_KEYS = ("model.name", "model.options", "optim.kind", "optim.lr_scaling", "schedule.kind", "data.normalization",
               "data.photometric", "wnet.reconstruction", "seed")
# What checkpoints written before a key was recorded trained with, for the models it applies to (by name prefix);
# other keys missing from an older checkpoint are not compared.
EARLIER_DEFAULTS = {"data.normalization": ("segmenter", "imagenet"), "wnet.reconstruction": ("wnet", "mean"),
                    "data.photometric": (("dino", "segmenter"), "loader")}


# None or "auto" in a spec: resolved when training starts (the family's pipelines), then recorded; a resume is
# checked again there, against the resolved value.
RESOLVED_AT_START = ("data.normalization", "data.photometric")


def resume_fingerprint(spec: JobSpec) -> dict:
    """The values of RESUME_KEYS, stored in every checkpoint's meta.json."""
    dumped = spec.model_dump(mode="json")
    out = {}
    for key in RESUME_KEYS:
        node = dumped
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def earlier_default(key: str, saved: dict, current):
    """The value a checkpoint that does not record `key` trained with: EARLIER_DEFAULTS for its model, else `current`."""
    prefix, value = EARLIER_DEFAULTS.get(key, (None, current))
    return value if prefix and str(saved.get("model.name", "")).startswith(prefix) else current


def resume_conflict(saved: dict, spec: JobSpec) -> str | None:
    """Why a checkpoint written with the fingerprint `saved` cannot be resumed under `spec` (None if it can)."""
    now = resume_fingerprint(spec)
    before = {k: saved.get(k, earlier_default(k, saved, now[k])) for k in RESUME_KEYS}  # older checkpoints record fewer
    # data.normalization left unset is resolved when training starts, as it was the first time.
    changed = [k for k in RESUME_KEYS if before[k] != now[k] and not (k in RESOLVED_AT_START and now[k] in (None, "auto"))]
    if not changed:
        return None
    differences = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed)
    return f"{', '.join(changed)} changed since the checkpoint ({differences})"


def _fields_at(path: tuple[str | int, ...], model: type[BaseModel] = JobSpec) -> list[str]:
    """The field names of the section at `path` in the schema `model` (for "did you mean")."""
    for key in path:
        field = model.model_fields.get(str(key))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def explain(source: str, error: dict, model: type[BaseModel] = JobSpec, prefix: str = "") -> str:
    """One pydantic error of `model` as a sentence naming `source` and the key path (`prefix` + the error's)."""
    path = prefix + ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        *parent, key = error["loc"]
        close = difflib.get_close_matches(str(key), _fields_at(tuple(parent), model), n=1)
        hint = f"; did you mean {prefix}{'.'.join(map(str, [*parent, close[0]]))}?" if close else ""
        allowed = ", ".join(_fields_at(tuple(parent), model))
        return f"{source}: unknown key {path}{hint} (allowed here: {allowed})."
    if error["type"] == "missing":
        return f"{source}: {path} is required but missing."
    found = excerpt(error.get("input"))
    message = error["msg"][0].lower() + error["msg"][1:]
    where = f"{path}: " if path else ""
    return f"{source}: {where}{message}; found {found}."


def apply_override(raw: dict, assignment: str, source: str) -> None:
    """`a.b.c=value`, the value parsed as YAML; the key path must exist in the schema."""
    if "=" not in assignment:
        raise SpecError(f"--set {assignment!r}: expected KEY.PATH=VALUE, e.g. train.max_steps=100.")
    key_path, text = assignment.split("=", 1)
    keys = key_path.strip().split(".")
    value = parse_yaml(text, f"--set {excerpt(assignment)}")
    node: Any = raw
    for depth, key in enumerate(keys):
        known = _fields_at(tuple(keys[:depth]))
        is_free_dict = depth > 0 and keys[depth - 1] in ("options", "sbatch")
        if known and key not in known and not is_free_dict:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {'.'.join(keys[:depth] + [close[0]])}?" if close else ""
            raise SpecError(f"{source}: --set {key_path}: no such key {'.'.join(keys[:depth + 1])}{hint}")
        if depth == len(keys) - 1:
            node[key] = value
        else:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise SpecError(f"{source}: --set {key_path}: {'.'.join(keys[:depth + 1])} is not a section.")


def parse_spec(raw: Any, source: str, overrides: list[str] = ()) -> JobSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a job spec is a YAML mapping (name, model, data, train, ...); found {excerpt(raw)}.")
    for assignment in overrides:
        apply_override(raw, assignment, source)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(" ".join(explain(source, e) for e in exc.errors())) from None


def read_spec_file(path: str | Path) -> Any:
    """The YAML of a spec file (UTF-8, at most MAX_SPEC_BYTES), not yet validated."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the job spec ({exc.strerror}).") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: over {MAX_SPEC_BYTES // 1024} KiB; a job spec is a few kB of YAML.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start}); a job spec is a YAML file.") from None
    return parse_yaml(text, str(path))


def load_spec(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Read, override and validate a spec file (schema only; `check_environment` checks data and model)."""
    return parse_spec(read_spec_file(path), str(path), overrides)


def check_environment(spec: JobSpec, source: str) -> None:
    """What the schema cannot know: the model name and options, and the data folders."""
    import models

    known = models.list_models()
    if spec.model.name not in known:
        close = difflib.get_close_matches(spec.model.name, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else f" (registered: {', '.join(known)})"
        raise SpecError(f"{source}: model.name: {spec.model.name!r} is not a registered model{hint}")
    try:
        import torch

        with torch.device("meta"):
            models.create(spec.model.name, **spec.model.options)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{source}: model.options: {spec.model.name} does not accept {spec.model.options} ({exc}).") from None
    for key in ("train", "val"):
        folder = getattr(spec.data, key)
        if folder is not None and not (folder / "manifest.json").is_file():
            what = "does not exist" if not folder.exists() else "has no manifest.json"
            raise SpecError(
                f"{source}: data.{key}: {folder} {what}; expected a shard folder made by `segjobs shard` "
                f"(e.g. data/shards/ade20k/{'training' if key == 'train' else 'validation'})."
            )
    if spec.data.val is not None:
        check_labelled(spec.data.val, f"{source}: data.val")
    if spec.model.pretrained:
        try:
            models.pretrained.resolve(spec.model.pretrained)
        except models.PretrainedError as exc:
            raise SpecError(f"{source}: model.pretrained: {exc}") from None


def check_labelled(split: Path, culprit: str) -> None:
    """Evaluation scores predictions against labels: refuse image-only shards before any work is done."""
    from shards import manifest

    if not manifest.load(split).labelled:
        raise SpecError(f"{culprit}: {split} holds image-only shards (num_classes 0 in its manifest.json); evaluation "
                        "needs labelled shards (set data.val: null to train without evaluating).")


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("pathlib.", "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def spec_reference() -> str:
    """The spec reference as Markdown, generated from this schema (README embeds it; a test keeps them equal)."""
    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        sections = []
        rows = []
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                sections.append((name, field.annotation))
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            cells = [f"`{prefix}{name}`", _type_name(field.annotation), default, field.description or ""]
            rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        if rows:
            lines.extend(["", f"**{prefix.rstrip('.') or 'top level'}**", "", "| key | type | default | meaning |",
                          "|---|---|---|---|", *rows])
        for name, section in sections:
            walk(section, f"{prefix}{name}.")

    walk(JobSpec, "")
    return "\n".join(lines).strip() + "\n"
