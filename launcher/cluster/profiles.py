"""Cluster profiles: `$SEGJOBS_HOME/clusters.yaml` holds what is site-specific in a job's resources, so that the
job specs in jobs/ say only what the model needs (GPUs, CPUs, memory, time).

    default: lab                 # used when --profile is not given (optional)
    profiles:
      lab: {partition: gpu-a100, account: vision-lab, setup: ["module load cuda/12.4"]}
      cpu: {partition: cpu-long}
      pyxis: {partition: gpu, srun_args: ["--container-image=nvcr.io#nvidia/pytorch:24.05-py3"]}

    segjobs profiles [--json]
    segjobs submit jobs/segmenter_tiny16.yaml --profile lab --dry-run   # the script, and where each value came from

A profile holds keys of a spec's `resources` section. A job gets, key by key: the --set value when one is given,
else the value written in the spec's YAML, else the profile's, else the schema default (a default never replaces
a profile's value). `sbatch` options are merged option by option in the same order; every other key is replaced
whole (a spec's setup lines replace the profile's). The merged values are part of the resolved spec that run.json
keeps, with the profile's name: `segjobs resume` submits them again, whatever clusters.yaml says by then.

Note: the file is read like a spec (bounded, schema-checked): an unknown key or profile is exit 2 with the
nearest name, and anything that cannot go into an sbatch script is refused naming the file and the key.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from launcher import runs
from launcher.bounded_yaml import excerpt, parse_yaml
from launcher.cluster.sbatch import resources_problem
from launcher.errors import InputError
from launcher.files import read_bounded
from launcher.spec import ResourcesSpec, explain

MAX_FILE_BYTES = 256 << 10  # a clusters.yaml is a few hundred bytes per profile
TOP_KEYS = ("default", "profiles")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ProfileError(InputError):
    """A clusters.yaml or a profile name that cannot be used (exit status 2)."""


@dataclass
class Profile:
    name: str
    path: Path
    values: dict[str, Any] = field(default_factory=dict)  # the resources keys the profile writes, validated


@dataclass
class ClustersFile:
    path: Path
    default: str | None = None
    profiles: dict[str, Profile] = field(default_factory=dict)


def clusters_path() -> Path:
    return runs.home() / "clusters.yaml"


def read_clusters(path: Path | None = None) -> ClustersFile:
    """The profiles of `path` (default $SEGJOBS_HOME/clusters.yaml); none when the file does not exist."""
    path = path or clusters_path()
    try:
        data = read_bounded(path, MAX_FILE_BYTES)
    except FileNotFoundError:
        return ClustersFile(path)
    except (OSError, ValueError) as exc:
        raise ProfileError(f"{path}: cannot be read as cluster profiles ({exc}).") from None
    try:
        raw = parse_yaml(data.decode("utf-8"), str(path))
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path}: not UTF-8 text (byte {exc.start}); cluster profiles are a YAML file.") from None
    if raw is None:
        return ClustersFile(path)
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: cluster profiles are a YAML mapping (default, profiles); found {excerpt(raw)}.")
    for key in raw:
        if key not in TOP_KEYS:
            raise ProfileError(f"{path}: unknown key {excerpt(key)}{did_you_mean(str(key), TOP_KEYS)} (allowed: default, profiles).")
    entries = raw.get("profiles") or {}
    if not isinstance(entries, dict):
        raise ProfileError(f"{path}: profiles is a mapping of a name to resources keys; found {excerpt(entries)}.")
    clusters = ClustersFile(path, profiles={name: parse_profile(path, name, values) for name, values in entries.items()})
    default = raw.get("default")
    if default is not None:
        if not isinstance(default, str) or default not in clusters.profiles:
            raise ProfileError(f"{path}: default: {excerpt(default)} is not a profile of the file"
                               f"{did_you_mean(str(default), list(clusters.profiles))}.")
        clusters.default = default
    return clusters


def parse_profile(path: Path, name: Any, values: Any) -> Profile:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ProfileError(f"{path}: profiles: {excerpt(name)} is not a profile name (letters, digits, '_', '.', '-').")
    if not isinstance(values, dict):
        raise ProfileError(f"{path}: profiles.{name}: a mapping of resources keys (partition, account, ...) was "
                           f"expected; found {excerpt(values)}.")
    try:
        resources = ResourcesSpec.model_validate(values)
    except ValidationError as exc:
        raise ProfileError(" ".join(explain(str(path), e, ResourcesSpec, f"profiles.{name}.") for e in exc.errors())) from None
    problem = resources_problem(resources, site_file=True)
    if problem:
        raise ProfileError(f"{path}: profiles.{name}.{problem[0]}: {problem[1]}.")
    return Profile(name, path, resources.model_dump(mode="json", include=resources.model_fields_set))


def did_you_mean(word: str, known: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def select(name: str | None) -> Profile | None:
    """The profile named (--profile), else the file's default, else none."""
    clusters = read_clusters()
    name = name or clusters.default
    if name is None:
        return None
    if name not in clusters.profiles:
        known = ", ".join(clusters.profiles) or "none"
        where = "has" if clusters.path.exists() else "does not exist, so it has"
        raise ProfileError(f"--profile {excerpt(name)}: no such profile{did_you_mean(name, list(clusters.profiles))} "
                           f"({clusters.path} {where} these: {known}).")
    return clusters.profiles[name]


def merge(raw: dict, profile: Profile | None) -> None:
    """Fill a spec's raw YAML (before --set) with the profile's values for the resources keys it does not write."""
    if profile is None or not isinstance(raw, dict):
        return
    if raw.get("resources") is None:
        raw["resources"] = {}
    resources = raw["resources"]
    if not isinstance(resources, dict):
        return  # the schema says what is wrong
    for key, value in profile.values.items():
        if key == "sbatch" and isinstance(resources.get("sbatch"), dict):
            resources["sbatch"] = {**value, **resources["sbatch"]}
        elif key not in resources:
            resources[key] = copy.deepcopy(value)


def sources(raw: Any, profile: Profile | None, overrides: list[str], sbatch_options: list[str]) -> dict[str, str]:
    """Where each resources value came from: "--set", "spec", "profile NAME" or "default"; `raw` is the spec's
    YAML before the profile and --set, `sbatch_options` the merged options (each is listed as sbatch.OPTION)."""
    written = raw.get("resources") if isinstance(raw, dict) else None
    written = written if isinstance(written, dict) else {}
    written_options = written.get("sbatch") if isinstance(written.get("sbatch"), dict) else {}
    set_keys: set[str] = set()
    for assignment in overrides:
        keys = assignment.split("=", 1)[0].strip().split(".")
        if keys[0] == "resources":
            set_keys.add(".".join(keys[1:3]) if len(keys) > 2 and keys[1] == "sbatch" else (keys[1] if len(keys) > 1 else "*"))
    profile_values = profile.values if profile else {}
    profile_options = profile_values.get("sbatch", {})

    def origin(key: str, in_spec: bool, in_profile: bool, parents: tuple[str, ...]) -> str:
        if key in set_keys or "*" in set_keys or any(p in set_keys for p in parents):
            return "--set"
        return "spec" if in_spec else f"profile {profile.name}" if in_profile else "default"

    found = {key: origin(key, key in written, key in profile_values, ())
             for key in ResourcesSpec.model_fields if key != "sbatch"}
    for option in sbatch_options:
        found[f"sbatch.{option}"] = origin(f"sbatch.{option}", option in written_options, option in profile_options, ("sbatch",))
    return found


def provenance_comment(resources: ResourcesSpec, found: dict[str, str], profile: str | None) -> str:
    """Shell comment lines after a dry run's script: each resources value and where it came from."""
    title = f"profile {profile} of {clusters_path()}" if profile else "no profile"
    lines = [f"# resources, and where each value came from ({title}):"]
    values = resources.model_dump(mode="json")
    options = values.pop("sbatch")
    shown = {**values, **{f"sbatch.{option}": value for option, value in options.items()}}
    texts = {key: json.dumps(shown[key])[:60] if shown[key] is not None else "-" for key in found}
    width, value_width = max(map(len, found)), max(map(len, texts.values()))
    for key, origin in found.items():
        lines.append(f"#   {key:<{width}}  {texts[key]:<{value_width}}  {origin}")
    return "\n".join(lines) + "\n"


def show(as_json: bool) -> int:
    """`segjobs profiles`: every profile of clusters.yaml (a table, or --json)."""
    clusters = read_clusters()
    if as_json:
        print(json.dumps({"file": str(clusters.path), "default": clusters.default,
                          "profiles": {name: p.values for name, p in clusters.profiles.items()}}, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text  # cells as plain text: a value's [brackets] are not rich markup

    console = Console()
    if not clusters.profiles:
        console.print(f"no profiles: {clusters.path} does not exist or defines none. It reads:\n"
                      "  default: lab\n  profiles:\n    lab: {partition: gpu-a100, account: vision-lab}", markup=False)
        return 0
    grid = Table(title=f"cluster profiles ({clusters.path})", title_justify="left", header_style="bold")
    for column in ("profile", "partition", "account", "qos", "other keys"):
        grid.add_column(column, overflow="fold")
    for name, profile in clusters.profiles.items():
        values = dict(profile.values)
        main = [str(values.pop(key, "-")) for key in ("partition", "account", "qos")]
        other = "\n".join(f"{key}: {json.dumps(value)}" for key, value in values.items())
        label = f"{name} (default)" if name == clusters.default else name
        grid.add_row(*(Text(cell) for cell in (label, *main, other or "-")))
    console.print(grid)
    return 0
