"""Shared fixtures: a small synthetic ADE20K and its shards, made once per test session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from launcher.cli import main as segjobs

# The whole session writes its run index here, module-scoped fixtures and the SLURM test jobs (which inherit
# the environment) included, never into the user's ~/.segjobs; each test then gets its own (segjobs_home).
SESSION_HOME = Path(tempfile.mkdtemp(prefix="segjobs-test-home-"))
os.environ["SEGJOBS_HOME"] = str(SESSION_HOME)

TRAIN, VAL = 40, 9
SIZE = "64x80"
SAMPLES_PER_SHARD = 7  # uneven shards: 7, 7, 7, 7, 7, 5


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "ADEChallengeData2016"
    assert segjobs(["synth", "ade20k", str(root), "--train", str(TRAIN), "--val", str(VAL), "--size", SIZE, "--seed", "3"]) == 0
    return root


@pytest.fixture(scope="session")
def shard_root(synth_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    assert segjobs(["shard", "ade20k", str(synth_root), str(out), "--samples-per-shard", str(SAMPLES_PER_SHARD)]) == 0
    return out


@pytest.fixture
def shard_copy(shard_root, tmp_path) -> Path:
    """A private copy of the shards for tests that damage them."""
    out = tmp_path / "shards"
    shutil.copytree(shard_root, out)
    return out


@pytest.fixture
def synth_copy(synth_root, tmp_path) -> Path:
    """A private copy of the synthetic source for tests that damage it."""
    root = tmp_path / "ADEChallengeData2016"
    shutil.copytree(synth_root, root)
    return root


@pytest.fixture(autouse=True)
def segjobs_home(tmp_path, monkeypatch) -> Path:
    """The run index of each test in its own folder, not the user's ~/.segjobs."""
    home = tmp_path / "segjobs-home"
    monkeypatch.setenv("SEGJOBS_HOME", str(home))
    return home
