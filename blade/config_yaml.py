"""Reading config YAML: a safe loader (YAML is data, never code), `inherit:` chains, deep merges and
`section.key=value` overrides. blade/config.py turns the result into typed dataclasses."""
from __future__ import annotations

import copy
import os
import re

import yaml

from blade.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """yaml.safe_load, except that `1e-3` is a float (YAML 1.1 wants `1.0e-3` and yields a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str, chain: tuple[str, ...] = ()) -> dict:
    """Load one file, resolving `inherit:` (relative to the file) first; `chain` detects cycles."""
    real = os.path.realpath(path)
    if real in [os.path.realpath(p) for p in chain]:
        raise ConfigError(f"config error: inherit cycle: {' -> '.join(chain + (path,))}")
    if not os.path.isfile(path):
        by = f" (inherited by '{chain[-1]}')" if chain else ""
        raise ConfigError(f"config error: config file '{path}' not found{by}")
    try:
        with open(path, "rb") as f:  # bytes: YAML detects the encoding and reports bad characters
            data = yaml.load(f, Loader=_Loader)
    except OSError as e:
        raise ConfigError(f"config error: cannot read config file '{path}' ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config error: invalid YAML in '{path}'{where}: {what}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config error: '{path}' must hold a mapping of sections, "
                          f"got {type(data).__name__}")
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"config error: inherit in '{path}' must be a file name, got {parent!r}")
    base = read_yaml(os.path.join(os.path.dirname(path), parent), chain + (path,))
    return deep_merge(base, data)


def deep_merge(base: dict, over: dict) -> dict:
    """A new mapping: `over` merged into `base` (mappings merge key by key, anything else in `over`
    replaces); neither input is changed. YAML `inherit:` and `deepspeed.extra` both use it."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        both = isinstance(out.get(k), dict) and isinstance(v, dict)
        out[k] = deep_merge(out[k], v) if both else copy.deepcopy(v)
    return out


def apply_override(raw: dict, override: str) -> None:
    """`section.key=value` (value read as YAML); deeper keys reach into free-form dicts."""
    key, eq, text = override.partition("=")
    parts = key.strip().split(".")
    if not eq or len(parts) < 2 or not all(parts):
        raise ConfigError(f"config error: override '{override}' must look like key.sub=value")
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config error: override '{override}': value is not valid YAML ({what})") \
            from None
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):  # absent, empty, or a scalar (the type check rejects)
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
