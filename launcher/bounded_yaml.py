"""YAML from files anyone could have written, parsed with bounds: YAML's safe loader (no objects), no duplicate
keys, at most MAX_VALUES values once aliases are expanded (a few hundred bytes of nested aliases can otherwise
expand to gigabytes), and messages that quote at most a short excerpt of any value.

    raw = parse_yaml(text, "jobs/x.yaml")     # YAMLInputError (exit 2) naming the source and the problem
"""

from __future__ import annotations

import reprlib
from typing import Any

import yaml

from launcher.errors import InputError

MAX_VALUES = 100_000  # values after expanding YAML aliases (a job spec has a few hundred)


class YAMLInputError(InputError):
    """YAML that is not valid, repeats a key, or expands beyond MAX_VALUES (exit status 2)."""


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel = 40, 40, 2


def excerpt(value: Any) -> str:
    """A short excerpt of a value for a message: bounded work and length whatever the value's size."""
    text = _SHORT.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing duplicate keys (YAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the safe loader's own error explains it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {excerpt(key)}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, memo: dict, limit: int) -> int:
    """How many values `node` holds once every alias is expanded (stops counting past `limit`)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = limit + 1  # an alias cycle counts as too large
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    size = 1
    for child in children:
        size += _expanded_size(child, memo, limit)
        if size > limit:
            break
    memo[id(node)] = size
    return size


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python values, bounded: no duplicate keys, at most MAX_VALUES values once aliases
    are expanded (a few hundred bytes of nested aliases can otherwise expand to gigabytes)."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, MAX_VALUES) > MAX_VALUES:
            raise YAMLInputError(f"{source}: the YAML expands to over {MAX_VALUES:,} values through its aliases (& and *); "
                            "a job spec has a few hundred. Write the values out.")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise YAMLInputError(f"{source}: not valid YAML ({_yaml_problem(exc)}).") from None
    except RecursionError:
        raise YAMLInputError(f"{source}: the YAML is nested too deeply to be a job spec.") from None
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The problem and its line, without the quoted source text (which may be huge or binary)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem[:200]}{where}"
