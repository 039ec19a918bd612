"""The layout DESIGN.md promises: imports go one way with no circle, the scheduler side starts without torch,
families plug in through their registry alone, and dataset knowledge comes from the shard manifest."""

from __future__ import annotations

import ast
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launcher.cli import main as segjobs
from tests.jobspecs import losses, same_losses, write_spec

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("launcher", "models", "shards")
# launcher's rooms, lowest first: a module may import its own room and the rooms below it.
ROOMS = [("launcher.errors", "launcher.files", "launcher.bounded_yaml", "launcher.spec", "launcher.history", "launcher.runs", "launcher.runlock", "launcher.checkpoint"), ("launcher.training",), ("launcher.cluster",),
         ("launcher.commands",), ("launcher.cli", "launcher.train")]


def module_names() -> dict[str, Path]:
    names = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names[".".join(parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (function-level imports included).
    `from a.b import c` is an import of a.b.c when that is a module, else of a.b."""
    modules = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: relative import"
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def room(module: str) -> int | None:
    for level, prefixes in enumerate(ROOMS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def test_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_packages():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_imports_go_one_way():
    wrong = []
    for module, targets in import_graph().items():
        top = module.split(".")[0]
        for target in targets:
            target_top = target.split(".")[0]
            if top in ("models", "shards") and target_top != top:
                wrong.append(f"{module} imports {target} ({top} imports neither launcher nor {'shards' if top == 'models' else 'models'})")
            if module == "models.registry" and target_top == "models":
                wrong.append(f"models.registry imports {target} (the registry imports no family)")
            if top == "launcher" and target_top == "launcher" and room(module) is not None and room(target) is not None \
                    and room(target) > room(module):
                wrong.append(f"{module} imports {target}, a room above it")
    assert not wrong, "\n".join(wrong)


def test_every_launcher_module_has_a_room():
    homeless = [m for m in module_names() if m.startswith("launcher.") and room(m) is None]
    assert not homeless


def test_the_scheduler_side_starts_without_torch(tmp_path):
    cluster = sorted(m for m in module_names() if m.startswith("launcher.cluster"))
    code = ("import sys\n"
            f"for name in {['launcher.cli', 'launcher.commands.status', *cluster]!r}:\n"
            "    __import__(name)\n"
            "from launcher.cli import main\n"
            "assert main(['status', '--all']) == 0\n"
            "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "SEGJOBS_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


# ---- a fourth family ----------------------------------------------------------------------------------------
@pytest.fixture
def toy_family():
    """tests/toy_family.py imported (it registers itself), and unregistered afterwards so that the tests
    generated from the model registry elsewhere see the real families only."""
    from launcher.training.families import registry as families
    from models import registry as model_registry

    module = importlib.import_module("tests.toy_family")
    yield module
    model_registry._MODELS.pop("toy_pixels")
    families._FAMILIES.pop("toy")
    sys.modules.pop("tests.toy_family")


def toy_spec(tmp_path, shard_root, name):
    return write_spec(tmp_path, shard_root, "segmenter", name=name,
                      model={"name": "toy_pixels", "options": {"width": 4}}, schedule={"kind": "poly", "warmup_steps": 2})


def test_a_family_from_the_tests_trains_resumes_evaluates_and_draws(toy_family, shard_root, tmp_path, capsys):
    torch.set_num_threads(1)
    assert segjobs(["train", str(toy_spec(tmp_path, shard_root, "whole"))]) == 0
    expected = losses(tmp_path / "whole")
    assert sorted(expected) == list(range(1, 9))

    # Resume: keep only the step-3 checkpoint of an identical run, as if it had been killed after step 3.
    spec = toy_spec(tmp_path, shard_root, "resumed")
    assert segjobs(["train", str(spec)]) == 0
    checkpoints = tmp_path / "resumed" / "checkpoints"
    for later in ("step_00000006", "step_00000008"):
        shutil.rmtree(checkpoints / later)
    assert segjobs(["train", str(spec)]) == 0
    assert same_losses(tmp_path / "resumed", tmp_path / "whole")

    capsys.readouterr()
    assert segjobs(["eval", str(tmp_path / "resumed"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "toy" and report["step"] == 8 and 0.0 <= report["miou"] <= 1.0
    assert report["class_names"][:3] == ["wall", "building", "sky"]  # ADE20K's, from the manifest

    assert segjobs(["visualize", str(tmp_path / "resumed")]) == 0
    picture = tmp_path / "resumed" / "pictures" / "toy.png"
    assert Image.open(picture).size[0] > 3 * 64
    assert segjobs(["visualize", str(tmp_path / "resumed"), "--frames", str(tmp_path)]) == 2
    assert "the toy family draws no frame animation" in capsys.readouterr().err


# ---- dataset knowledge in the manifest ----------------------------------------------------------------------
def edit_manifest(split_dir: Path, **fields) -> None:
    path = split_dir / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_new_manifests_carry_the_dataset_and_old_ones_mean_ade20k(shard_copy):
    from shards import manifest

    written = json.loads((shard_copy / "validation" / "manifest.json").read_text())
    assert written["reduce_zero_label"] is True and len(written["class_names"]) == 150
    old = {k: v for k, v in written.items() if k not in ("reduce_zero_label", "class_names")}
    (shard_copy / "validation" / "manifest.json").write_text(json.dumps(old))
    loaded = manifest.load(shard_copy / "validation")
    assert loaded.reduce_zero_label and loaded.names()[149] == "flag"
    assert segjobs(["shard", "verify", str(shard_copy / "validation")]) == 0


def test_the_loader_takes_the_label_offset_from_the_manifest(shard_copy, synth_root):
    from shards.loader import build_loader

    def first_label(split_dir):
        loader = build_loader(split_dir, lambda image, label, rng: {"label": label}, batch_size=1, train=False)
        try:
            batch = next(iter(loader))
        finally:
            loader.close()
        return batch["key"][0], batch["label"][0].numpy()

    key, reduced = first_label(shard_copy / "validation")
    raw = np.asarray(Image.open(synth_root / "annotations" / "validation" / f"{key}.png"))
    assert np.array_equal(reduced, np.where(raw == 0, 255, raw - 1))
    edit_manifest(shard_copy / "validation", reduce_zero_label=False, num_classes=151, class_names=[f"c{k}" for k in range(151)])
    assert np.array_equal(first_label(shard_copy / "validation")[1], raw)


def test_class_names_of_the_wrong_length_are_refused(shard_copy, capsys):
    edit_manifest(shard_copy / "validation", class_names=["wall"])
    assert segjobs(["shard", "verify", str(shard_copy / "validation")]) == 1
    assert "class_names must list 150 names" in capsys.readouterr().err


def test_a_model_with_other_classes_than_the_shards_is_refused(shard_copy, tmp_path, capsys):
    edit_manifest(shard_copy / "training", num_classes=20, class_names=[f"c{k}" for k in range(20)])
    spec = write_spec(tmp_path, shard_copy, "segmenter", name="classes")
    assert segjobs(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "model.options.num_classes" in err and "set model.options.num_classes=20" in err
    assert not (tmp_path / "classes" / "checkpoints").exists()
