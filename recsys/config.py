"""One loader for every config: YAML file + dotted command-line overrides -> dataclasses.

Each component keeps its own dataclass config next to its code and validates it in
``__post_init__``. This module only knows how to build nested dataclasses from plain dicts,
apply ``a.b.c=value`` overrides, and turn them back into dicts for saving.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

T = TypeVar("T")


class ConfigLoader(yaml.SafeLoader):
    """YAML 1.2's booleans: only ``true``/``false`` are booleans. PyYAML follows YAML 1.1, where
    ``off``, ``on``, ``yes`` and ``no`` are too, so ``model.log_q=off`` would arrive as ``False``
    and fail a choice that names ``"off"``."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def parse_yaml(text: str) -> Any:
    """A YAML document or scalar with YAML 1.2's booleans (``ConfigLoader``)."""
    return yaml.load(text, Loader=ConfigLoader)


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``; used by config ``__post_init__``s."""
    if not condition:
        raise ValueError(message)


def require_choice(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    require(value in choices, f"{name}={value!r} is not allowed; choose one of {choices}")


def require_range(name: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """Raise unless ``low <= value <= high`` (either bound may be None)."""
    ok = (low is None or value >= low) and (high is None or value <= high)
    bounds = f"{'-inf' if low is None else low} <= {name} <= {'inf' if high is None else high}"
    require(ok, f"{name}={value!r} is out of range; allowed: {bounds}")


def parse_overrides(overrides: typing.Sequence[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key.subkey=value")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = parse_yaml(raw) if raw else ""
    return tree


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def flatten_dict(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (nested dicts become dotted keys)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with path.open() as fh:
        try:
            data = parse_yaml(fh) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_yaml_chain(path: str | Path, prepare: Callable[[dict, str], dict] | None = None,
                    key: str = "base_config") -> dict:
    """A YAML file whose ``base_config: other.yaml`` (relative to the file's own directory) names
    the file it refines: the chain of bases merged, nearest last. ``prepare(tree, source)`` is
    applied to each file's own keys before merging (e.g. to rename old keys file by file)."""
    chain: list[Path] = []
    files: list[dict] = []
    path = Path(path)
    while True:
        resolved = path.resolve()
        if resolved in chain:
            cycle = " -> ".join(str(p) for p in [*chain[chain.index(resolved):], resolved])
            raise ValueError(f"{key} forms a cycle: {cycle}")
        if chain and not path.is_file():
            raise FileNotFoundError(f"{chain[-1]}: {key} {path} does not exist")
        chain.append(resolved)
        data = load_yaml(path)
        files.append(data)
        base = data.get(key)
        if not base:
            break
        if not isinstance(base, str):
            raise ValueError(f"{path}: {key} must be a file name, got {base!r}")
        path = path.parent / base if not Path(base).is_absolute() else Path(base)
    merged: dict = {}
    for file, data in reversed(list(zip(chain, files))):
        own = {k: v for k, v in data.items() if k != key}
        merged = deep_merge(merged, prepare(own, str(file)) if prepare else own)
    return merged


_WARNED_RENAMES: set[str] = set()  # old keys already warned about in this process


def warn_renamed(pairs: typing.Iterable[tuple[str, str]], source: str = "") -> None:
    """One FutureWarning naming the new key of each old key not warned about before."""
    fresh = [(old, new) for old, new in pairs if old not in _WARNED_RENAMES]
    if not fresh:
        return
    _WARNED_RENAMES.update(old for old, _ in fresh)
    shown = ", ".join(f"{old} -> {new}" for old, new in fresh)
    warnings.warn(f"renamed config key(s){f' in {source}' if source else ''}: {shown}; the old names "
                  "still work, but write the new ones", FutureWarning, stacklevel=3)


def rename_key(key: str, renamed: dict[str, str], source: str = "") -> str:
    """The current name of dotted ``key`` (``renamed`` maps old -> new)."""
    if key in renamed:
        warn_renamed([(key, renamed[key])], source)
    return renamed.get(key, key)


def rename_keys(tree: dict, renamed: dict[str, str], source: str = "") -> dict:
    """``tree`` with every old dotted key of ``renamed`` moved to its new place (a copy; ``tree``
    is left alone). Giving both the old and the new key is an error naming both."""
    present = [old for old in renamed if _lookup(tree, old)[0]]
    if not present:
        return tree
    tree = copy.deepcopy(tree)
    for old in present:
        new = renamed[old]
        if _lookup(tree, new)[0]:
            raise ValueError(f"{old} and {new} are the same setting ({old} is its old name); give only {new}"
                             + (f" (in {source})" if source else ""))
        *parents, leaf = old.split(".")
        value = _lookup(tree, ".".join(parents))[1].pop(leaf)
        *parents, leaf = new.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            require(isinstance(node, dict), f"{part} must be a mapping (it holds {new}), got {node!r}")
        node[leaf] = value
    warn_renamed([(old, renamed[old]) for old in present], source)
    return tree


def _lookup(tree: Any, dotted: str) -> tuple[bool, Any]:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def from_dict(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys by their dotted path."""
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {[_join(where, k) for k in unknown]}; allowed: {sorted(fields)}")
    # A field whose type is chosen by its value (e.g. the model section, tagged by model.name)
    # names its own loader in the field's metadata: {"from_dict": loader(value, where)}.
    kwargs = {}
    for name, value in data.items():
        load = fields[name].metadata.get("from_dict")
        kwargs[name] = load(value, _join(where, name)) if load else _coerce(hints[name], value, _join(where, name))
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{where or cls.__name__}: {err}") from err


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise a ValueError naming ``where``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where) if len(args) == 1 else value
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        (inner, *_) = typing.get_args(hint) or (Any,)
        seq = [_coerce(inner, v, where) for v in value]
        return tuple(seq) if origin is tuple else seq
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, str):
            value = _number(value, where)  # PyYAML reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        if hint is int and float(value) != int(value):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return hint(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where} must be a number, got {text!r}") from None
