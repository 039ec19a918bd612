"""A table of hostile and damaged inputs: specs, manifests, shards, sources, run folders, the run index,
checkpoints. Each runs `segjobs` as a process and must end with the expected exit status, one paragraph that
names the culprit and no traceback, within bounded time and memory, leaving everything outside the run's own
folder (and segjobs' own index) as it was."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from PIL import Image

from launcher.cli import main as segjobs
from tests.jobspecs import write_spec

REPO = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 120
MEMORY_LIMIT_MB = 3000


@dataclass
class Context:
    root: Path  # everything the case may read; compared before and after
    shards: Path  # a private copy of the session's shards
    synth: Path  # a private copy of the synthetic source
    trained: Path  # a private copy of a trained tiny Segmenter run
    home: Path  # SEGJOBS_HOME of the case

    def spec(self, name: str = "victim", **sections) -> Path:
        sections.setdefault("train", {"max_steps": 2, "precision": "no"})
        return write_spec(self.root, self.shards, "segmenter", name=name, **sections)

    def raw_spec(self, text: bytes | str, name: str = "hostile.yaml") -> Path:
        path = self.root / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def manifest(self, split: str = "training") -> Path:
        return self.shards / split / "manifest.json"

    def edit_manifest(self, change: Callable[[dict], object], split: str = "training") -> None:
        """Change the parsed manifest in place (what `change` returns is ignored) and write it back."""
        body = json.loads(self.manifest(split).read_text())
        change(body)
        self.manifest(split).write_text(json.dumps(body))


@dataclass
class Case:
    name: str
    build: Callable[[Context], list[str]]  # the arguments of `segjobs`, after preparing the files
    status: int
    message: str  # a part of stderr (or stdout, for a status row) that names the culprit


def bomb_yaml(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels):
        refs = ", ".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{refs}]")
    return "\n".join(lines) + "\n"


def spec_text(ctx: Context, **changes) -> str:
    raw = yaml.safe_load(ctx.spec().read_text())
    raw.update(changes)
    return yaml.safe_dump(raw)


def rewrite_shard(ctx: Context, replace: Callable[[str, bytes], bytes], split: str = "training", index: int = 0) -> None:
    """Rewrite one shard member by member through `replace(member name, data)`, and record it in the manifest
    (as a writer would that packed such data)."""
    from shards.writer import tar_member

    path = ctx.shards / split / f"ade20k-{split}-{index:06d}.tar"
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    blocks = b"".join(tar_member(name, replace(name, data)) for name, data in members)
    data = blocks + b"\0" * (-(len(blocks) + 1024) % 10240 + 1024)
    path.write_bytes(data)

    def record(body):
        entry = body["shards"][index]
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()

    ctx.edit_manifest(record, split)


def bomb_png(side: int = 30000) -> bytes:
    """A PNG whose header says side x side pixels (30000: 900 MB decoded); the file is a few hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\0" * (side + 1) * 8)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def first_member_replaced(suffix: str, payload: bytes):
    state = {"done": False}

    def replace(name: str, data: bytes) -> bytes:
        if name.endswith(suffix) and not state["done"]:
            state["done"] = True
            return payload
        return data

    return replace


def corrupt_run_json(ctx: Context, text: str) -> Path:
    (ctx.trained / "run.json").write_text(text)
    return ctx.trained


def edit_meta_spec(ctx: Context, **model) -> list[str]:
    checkpoint = sorted((ctx.trained / "checkpoints").glob("step_*"))[-1]
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["spec"]["model"] = {**meta["spec"]["model"], **model}
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    return ["eval", str(checkpoint)]


def mkdirs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


WHOLE_EPOCH = {"max_steps": 10, "precision": "no"}  # 40 samples, batch 4: every sample is read

CASES = [
    # ---- specs ----
    Case("alias bomb", lambda c: ["train", str(c.raw_spec(bomb_yaml()))], 2, "expands to over 100,000 values"),
    Case("recursive alias", lambda c: ["train", str(c.raw_spec("&a [*a, *a]\n"))], 2, "expands to over"),
    Case("duplicate key", lambda c: ["train", str(c.raw_spec(spec_text(c) + "seed: 3\nseed: 4\n"))], 2, "duplicate key 'seed'"),
    Case("not UTF-8", lambda c: ["train", str(c.raw_spec(b"name: \xff\xfe run\n"))], 2, "not UTF-8 text"),
    Case("spec of 2 MB", lambda c: ["train", str(c.raw_spec("# " + "x" * (2 << 20) + "\n"))], 2, "over 1024 KiB"),
    Case("nested 100000 deep", lambda c: ["train", str(c.raw_spec("[" * 100000 + "]" * 100000))], 2, "hostile.yaml"),
    Case("a list, not a mapping", lambda c: ["train", str(c.raw_spec("- a\n- b\n"))], 2, "a job spec is a YAML mapping"),
    Case("a huge value in an error", lambda c: ["train", str(c.raw_spec(spec_text(c, seed="9" * 100000)))], 2, "seed"),
    Case("max_steps 10^13", lambda c: ["train", str(c.spec()), "--set", "train.max_steps=10000000000000"], 2,
         "train.max_steps: input should be less than or equal to 100000000"),
    Case("epochs 10^9", lambda c: ["train", str(c.spec(train={"epochs": 10**9, "max_steps": None, "precision": "no"}))], 2,
         "over the 100,000,000 a schedule may span"),
    Case("unknown key", lambda c: ["train", str(c.spec()), "--set", "train.max_stesp=3"], 2, "did you mean train.max_steps"),
    Case("wrong type", lambda c: ["train", str(c.spec()), "--set", "data.batch_size=eight"], 2, "data.batch_size"),
    Case("missing spec file", lambda c: ["train", str(c.root / "nope.yaml")], 2, "nope.yaml: cannot read the job spec"),
    Case("--set without =", lambda c: ["train", str(c.spec()), "--set", "train.max_steps"], 2, "expected KEY.PATH=VALUE"),
    Case("no such data", lambda c: ["train", str(c.spec(data={"train": str(c.root / "gone")}))], 2, "data.train:"),
    Case("unknown model", lambda c: ["train", str(c.spec()), "--set", "model.name=segmentr_t16_mask"], 2,
         "is not a registered model"),
    Case("output_dir is a file", lambda c: ["train", str(c.spec(output_dir=str(c.raw_spec("x", "afile"))))], 2,
         "is a file, not a folder"),
    Case("dry run of an alias bomb", lambda c: ["submit", str(c.raw_spec(bomb_yaml())), "--dry-run"], 2, "expands to over"),
    # ---- manifests ----
    Case("manifest is a list", lambda c: (c.manifest().write_text("[" + c.manifest().read_text() + "]"),
                                          ["train", str(c.spec())])[1], 1,
         "not a valid segjobs manifest (expected a JSON object"),
    Case("shard name with ..", lambda c: (c.edit_manifest(lambda b: b["shards"][0].update(name="../../etc/x.tar")),
                                          ["train", str(c.spec())])[1], 1, "plain .tar file name"),
    Case("shard name a number", lambda c: (c.edit_manifest(lambda b: b["shards"][0].update(name=7)),
                                           ["train", str(c.spec())])[1], 1, "shards[0].name"),
    Case("negative count", lambda c: (c.edit_manifest(lambda b: b["shards"][0].update(num_samples=-7)),
                                      ["train", str(c.spec())])[1], 1, "shards[0].num_samples must be a non-negative integer"),
    Case("count of 10^12", lambda c: (c.edit_manifest(lambda b: (b["shards"][0].update(num_samples=10**12),
                                                                 b.update(num_samples=b["num_samples"] + 10**12 - 7))),
                                      ["train", str(c.spec())])[1], 1, "claims 1000000000000 samples"),
    Case("counts do not add up", lambda c: (c.edit_manifest(lambda b: b.update(num_samples=3)), ["train", str(c.spec())])[1],
         1, "num_samples is 3 but the shards hold 40"),
    Case("num_classes a string", lambda c: (c.edit_manifest(lambda b: b.update(num_classes="150")),
                                            ["train", str(c.spec())])[1], 1, "num_classes must be a non-negative integer"),
    Case("manifest not JSON", lambda c: (c.manifest().write_text("{nope"), ["train", str(c.spec())])[1], 1,
         "not a valid segjobs manifest"),
    Case("manifest nested deep", lambda c: (c.manifest().write_text("[" * 100000 + "]" * 100000), ["train", str(c.spec())])[1],
         1, "not a valid segjobs manifest"),
    Case("manifest not UTF-8", lambda c: (c.manifest().write_bytes(b'{"format": "\xff"}'), ["train", str(c.spec())])[1], 1,
         "not a valid segjobs manifest"),
    Case("verify: bad manifest", lambda c: (c.edit_manifest(lambda b: b.update(shards="x")),
                                            ["shard", "verify", str(c.shards / "training")])[1], 1, "shards must be a list"),
    # ---- shards ----
    Case("shard truncated", lambda c: ((c.shards / "training" / "ade20k-training-000001.tar").write_bytes(b"\0" * 1024),
                                       ["train", str(c.spec())])[1], 1, "ade20k-training-000001.tar: 1024 bytes, but"),
    Case("shard missing", lambda c: ((c.shards / "training" / "ade20k-training-000002.tar").unlink(),
                                     ["train", str(c.spec())])[1], 1, "ade20k-training-000002.tar: the manifest lists this shard"),
    Case("decompression bomb", lambda c: (rewrite_shard(c, first_member_replaced(".jpg", bomb_png())),
                                          ["train", str(c.spec(train=WHOLE_EPOCH))])[1], 1,
         "sample ADE_train_00000001: the image does not decode (DecompressionBombError"),
    Case("image of 64 Mpx", lambda c: (rewrite_shard(c, first_member_replaced(".jpg", bomb_png(8000))),
                                       ["train", str(c.spec(train=WHOLE_EPOCH))])[1], 1,
         "sample ADE_train_00000001: the image is 8000 x 8000 pixels, over the 40,000,000"),
    Case("bomb, skip_corrupt", lambda c: (rewrite_shard(c, first_member_replaced(".jpg", bomb_png())),
                                          ["train", str(c.spec(train=WHOLE_EPOCH, data={"skip_corrupt": True}))])[1], 0, ""),
    Case("label of 3 channels", lambda c: (rewrite_shard(c, first_member_replaced(".seg.png", _rgb_png())),
                                           ["train", str(c.spec(train=WHOLE_EPOCH))])[1], 1,
         "the label is not a single-channel image"),
    Case("data.verify, a byte flipped", lambda c: (_flip_byte(c.shards / "training" / "ade20k-training-000003.tar"),
                                                   ["train", str(c.spec(data={"verify": True}))])[1], 1,
         "data.verify: 1 shard(s) differ from their manifest"),
    # ---- sources ----
    Case("dotted stem", lambda c: (_copy_image(c, "ADE_train_00000001.v2.jpg"),
                                   ["shard", "ade20k", str(c.synth), str(c.root / "out"), "--strict"])[1], 1,
         "images/training/ADE_train_00000001.v2.jpg: the file name's stem"),
    Case("file name not UTF-8", lambda c: (_copy_image(c, b"ADE_train_\xff.jpg"),
                                           ["shard", "ade20k", str(c.synth), str(c.root / "out"), "--strict"])[1], 1,
         "the file name is not valid UTF-8"),
    Case("output under a file", lambda c: ["shard", "ade20k", str(c.synth), str(c.raw_spec("x", "plainfile") / "out")], 1,
         "cannot write the shards"),
    # ---- run folders and the index ----
    Case("run.json not JSON: status", lambda c: ["status", str(corrupt_run_json(c, "{broken")), "--json"], 0, "UNREADABLE"),
    Case("run.json not JSON: logs", lambda c: ["logs", str(corrupt_run_json(c, "{broken"))], 2, "run.json: unreadable"),
    Case("run.json edited: cancel", lambda c: ["cancel", str(corrupt_run_json(c, '{"submissions": "x"}'))], 2,
         "submissions must be a list of objects"),
    Case("run.json a list: resume", lambda c: ["resume", str(corrupt_run_json(c, "[1, 2]"))], 2, "not a segjobs record"),
    Case("run.json damaged: train", lambda c: (corrupt_run_json(c, "\0\0"), ["train", str(c.trained / "spec.yaml"),
                                                                              "--set", f"output_dir={c.trained}"])[1], 0, ""),
    Case("index not JSON: status", lambda c: ((mkdirs(c.home) / "index.json").write_text("[oops"),
                                              ["status", "--all", "--runs", str(c.trained)])[1], 0, "index.json: unreadable"),
    Case("index of numbers: train", lambda c: ((mkdirs(c.home) / "index.json").write_text("[1, 2]"),
                                               ["train", str(c.spec())])[1], 0, "renamed to index.json.damaged"),
    # ---- checkpoints and weights files ----
    Case("eval of a random file", lambda c: ["eval", str(c.raw_spec(os.urandom(4096), "random.bin"))], 2, "no run named"),
    Case("visualize a random file", lambda c: ["visualize", str(c.raw_spec(os.urandom(4096), "random.pth")),
                                               "--frames", str(c.root)], 2, "not a readable checkpoint"),
    Case("weights of another family", lambda c: edit_meta_spec(c, name="wnet_tiny", options={}), 2,
         "its weights are not those of wnet_tiny"),
    Case("model that does not exist", lambda c: edit_meta_spec(c, name="no_such_model"), 2,
         "model.name 'no_such_model' in its spec is not a registered model"),
    Case("visualize --model unknown", lambda c: ["visualize", str(c.raw_spec(b"x", "w.pth")), "--frames", str(c.root),
                                                 "--model", "nope"], 2, "--model nope: not a registered model"),
    Case("meta.json of 3 GB", lambda c: (os.truncate(_meta(c, b""), 3 << 30), ["eval", str(c.trained)])[1], 1,
         "every checkpoint is damaged"),
    Case("meta.json a FIFO", lambda c: (_meta(c, None), ["eval", str(c.trained)])[1], 1, "every checkpoint is damaged"),
    Case("meta.json a list", lambda c: (_meta(c, b"[]"), ["eval", str(c.trained)])[1], 1, "every checkpoint is damaged"),
    Case("shared.pt of another shape", lambda c: (_reseal(c, "shared.pt", {"model": 1}),
                                                  ["train", str(c.trained / "spec.yaml"), "--set", f"output_dir={c.trained}",
                                                   "--set", "train.max_steps=4"])[1], 1, "its files are not the state segjobs writes"),
    Case("metrics.jsonl is /dev/zero", lambda c: ((c.trained / "metrics.jsonl").unlink(),
                                                  (c.trained / "metrics.jsonl").symlink_to("/dev/zero"),
                                                  ["status", str(c.trained), "--json"])[2], 0, '"step": 0'),
    Case("run.json without log_folder", lambda c: ["logs", str(corrupt_run_json(c, json.dumps(
        {"submissions": [{"job_id": "1", "cluster": "slurm", "time": 0, "overrides": []}]})))], 2, "a log_folder"),
    Case("run.json total_steps a string", lambda c: ["status", str(corrupt_run_json(c, '{"total_steps": "x"}')), "--json"], 0,
         "total_steps must be a non-negative integer"),
    Case("grad_accum of 10^6", lambda c: ["train", str(c.spec()), "--set", "train.grad_accum=1000000"], 2,
         "train.grad_accum: input should be less than or equal to 4096"),
    Case("grad_accum over an epoch", lambda c: ["plan", str(c.spec()), "--set", "train.grad_accum=20"], 2,
         "train.grad_accum: an optimizer step takes 20 batches"),
    Case("infinite warmup", lambda c: ["plan", str(c.spec()), "--set", "schedule.warmup_epochs=.inf"], 2, "schedule.warmup_epochs"),
    Case("infinite learning rate", lambda c: ["train", str(c.spec()), "--set", "optim.lr=.inf"], 2, "optim.lr"),
    Case("plan on 0 processes", lambda c: ["plan", str(c.spec()), "--world-size", "0"], 2, "--world-size and --samples must be positive"),
    Case("plan over a file", lambda c: ["plan", str(c.spec()), "--plot", str(c.raw_spec("mine", "mine.png"))], 2,
         "the file exists; plan does not overwrite files"),
    Case("plan to a .txt", lambda c: ["plan", str(c.spec()), "--plot", str(c.root / "plan.txt")], 2, "name it FILE.png"),
    # ---- training that diverges ----
    Case("loss becomes nan", lambda c: ["train", str(c.spec(optim={"kind": "sgd", "lr": 1e30}, train={"max_steps": 6, "precision": "no", "log_every": 1}))],
         1, "; training stopped ("),
]


def _meta(ctx: Context, content: bytes | None) -> Path:
    """Replace the trained run's meta.json by `content`, or by a FIFO when None."""
    path = sorted((ctx.trained / "checkpoints").glob("step_*"))[-1] / "meta.json"
    path.unlink()
    if content is None:
        os.mkfifo(path)
    else:
        path.write_bytes(content)
    return path


def _reseal(ctx: Context, name: str, value) -> None:
    """Replace a checkpoint file by a well-formed one of another shape, with meta.json recording it."""
    import torch

    from launcher import checkpoint as layout

    checkpoint = sorted((ctx.trained / "checkpoints").glob("step_*"))[-1]
    torch.save(value, checkpoint / name)
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["files"][name] = layout.file_record(checkpoint / name)
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def _rgb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 80)).save(buffer, format="PNG")
    return buffer.getvalue()


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _copy_image(ctx: Context, name: str | bytes) -> None:
    folder = ctx.synth / "images" / "training"
    target = os.path.join(os.fsencode(folder), name if isinstance(name, bytes) else name.encode())
    shutil.copy(folder / "ADE_train_00000001.jpg", target)


@pytest.fixture(scope="module")
def trained_run(shard_root, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile-trained")
    spec = write_spec(root, shard_root, "segmenter", name="trained", train={"max_steps": 2, "precision": "no"})
    assert segjobs(["train", str(spec)]) == 0
    return root / "trained"


def snapshot(root: Path, skip: list[Path]) -> dict[str, str]:
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not any(path.is_relative_to(s) for s in skip):
            files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def run_bounded(args: list[str], env: dict) -> tuple[int, str, str, float, float]:
    """(exit status, stdout, stderr, seconds, peak memory in MB) of `segjobs args` as a child process."""
    start = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    timer = threading.Timer(TIME_LIMIT_S, process.kill)
    timer.start()
    out, err = (b"", b"")
    try:
        out, err = process.stdout.read(), process.stderr.read()
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        timer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace"), time.monotonic() - start, usage.ru_maxrss / 1024


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case, shard_root, synth_root, trained_run, tmp_path):
    ctx = Context(root=tmp_path, shards=tmp_path / "shards", synth=tmp_path / "source" / "ADEChallengeData2016",
                  trained=tmp_path / "trained", home=tmp_path / "home")
    shutil.copytree(shard_root, ctx.shards)
    shutil.copytree(synth_root, ctx.synth)
    shutil.copytree(trained_run, ctx.trained)
    args = case.build(ctx)
    own = [tmp_path / "victim", ctx.trained, ctx.home, tmp_path / "out"]  # the run's folder, the index, the shard output
    before = snapshot(tmp_path, own)
    env = {**os.environ, "SEGJOBS_HOME": str(ctx.home), "OMP_NUM_THREADS": "1"}
    status, out, err, seconds, megabytes = run_bounded(args, env)
    assert status == case.status, f"exit {status}, stderr: {err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert case.message in (err + out), err[-2000:] + out[-2000:]
    if status:
        assert len(err.strip().splitlines()[-1]) < 2000, "the message quotes too much"
    assert seconds < TIME_LIMIT_S and megabytes < MEMORY_LIMIT_MB, (seconds, megabytes)
    assert snapshot(tmp_path, own) == before, "files outside the run's own folder changed"


def test_the_table_is_long_enough():
    assert len(CASES) >= 40


def test_metrics_stay_strict_json_when_the_loss_diverges(shard_root, tmp_path):
    spec = write_spec(tmp_path, shard_root, "segmenter", name="nan", optim={"kind": "sgd", "lr": 1e30},
                      train={"max_steps": 6, "precision": "no", "log_every": 1})
    assert segjobs(["train", str(spec)]) == 1
    lines = (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) for line in lines]
    assert records[-1]["loss"] is None and json.loads((tmp_path / "nan" / "run.json").read_text())["state"] == "FAILED"
