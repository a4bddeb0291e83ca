"""Build typed config dataclasses from YAML files and ``key=value`` overrides.

The edge of the system: every value is checked here, so the rest of the code trusts its
config. Unknown keys are rejected with the closest valid key as a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from distq.errors import DistqError

T = TypeVar("T")


class ConfigError(DistqError):
    """A config file or override is wrong; the message names the key."""


def section_type(tp: Any) -> type | None:
    """The config dataclass behind a field type (``Section`` or ``Optional[Section]``), if any."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return inner[0] if inner else None
    return None


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts, sections included."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        section = section_type(hints[f.name])
        if section is not None:
            keys.extend(valid_keys(section, key + "."))
    return keys


def _unknown_key(root_cls: type, key: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(root_cls), n=1, cutoff=0.5)
    hint = f": did you mean '{close[0]}'?" if close else ": valid keys are listed by 'distq train --help-config'"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, root_cls: type) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, {} if value is None else value, root_cls, key + ".")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, root_cls)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed: use one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        item_type = args[0] if args else Any
        return [_coerce(v, item_type, f"{key}[{i}]", root_cls) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan and .inf, and "nan" or "inf" from an override
            raise ConfigError(f"{key}={value} is not a finite number: give a finite value (NaN and infinity are refused)")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls: type[T], data: dict, root_cls: type | None = None, prefix: str = "") -> T:
    """Build ``cls`` from a (possibly partial) nested dict; missing keys keep defaults."""
    root_cls = root_cls or cls
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            while isinstance(value, dict) and value:  # name the leaf the user wrote
                sub, value = next(iter(value.items()))
                key = f"{key}.{sub}"
            raise _unknown_key(root_cls, f"{prefix}{key}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}", root_cls)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.epochs=5", "quant.w_bits=2"]`` -> nested dict; values are parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=5)")
        try:
            value = load_yaml(raw, f"override {item!r}", root=key.strip()) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key written twice in one mapping, at any depth: PyYAML
    keeps the last silently, so a second ``train:`` section would drop the first unseen. Keys
    that a merge key (``<<: *anchor``) brings in may still be overridden."""

    def __init__(self, text: str, source: str, root: str):
        super().__init__(text)
        self.source = source
        self.root = root
        self.paths: dict[yaml.Node, str] = {}  # each value's dotted key, for the message

    def construct_document(self, node):
        self._name_children(node, self.root)
        return super().construct_document(node)

    def _name_children(self, node: yaml.Node, path: str) -> None:
        if node in self.paths:  # an alias of a node already named
            return
        self.paths[node] = path
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._name_children(item, f"{path}[{i}]")

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            prefix = self.paths.get(node, self.root)
            first_line: dict = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, typing.Hashable):
                    continue  # PyYAML refuses it below
                name = f"{prefix}.{key}" if prefix else str(key)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    lines = f" (lines {first_line[key]} and {line})" if first_line[key] != line else ""
                    raise ConfigError(f"{self.source} sets '{name}' twice{lines}: YAML would keep only the last; keep one")
                first_line[key] = line
                self._name_children(value_node, name)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str, root: str = "") -> Any:
    """Parse YAML as ``yaml.safe_load`` does, refusing duplicate keys (ConfigError naming ``source``,
    the key under ``root`` and both lines)."""
    loader = _StrictLoader(text, source, root)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict:
    """One config file's mapping: a missing, unreadable, empty or non-mapping file is an error."""
    path = Path(path)
    name = f"config file {str(path)!r}"
    if path.is_dir():
        inside = sorted(path.glob("*.yaml"))
        example = str(inside[0]) if inside else "configs/digits_w4a4.yaml"
        raise ConfigError(f"{name} is a directory: pass a YAML file, such as {example}")
    if not path.exists():
        raise ConfigError(f"{name} not found: pass a YAML file such as configs/digits_w4a4.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{name} is not a UTF-8 text file: pass a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{name} cannot be read ({exc.strerror or exc}): check the path and its permissions") from None
    try:
        data = load_yaml(text, name)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{name} is not valid YAML{where}: fix the syntax") from None
    if data is None or data == {}:
        raise ConfigError(
            f"{name} is empty: it would train with every default; write the keys to set "
            "(distq train --help-config lists them), or 'base: FILE' to start from another config"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must hold a mapping of keys to values")
    return data


def check_sections(cls: type, data: dict, source: str, prefix: str = "") -> None:
    """Refuse a section that a file gives as a single value (``train: 5``) before overrides are
    merged in: an override of one of its keys (``train.epochs=2``) would otherwise replace it
    unseen. ``train:`` with nothing under it (null) is an empty section."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = section_type(hints[f.name])
        value = data.get(f.name)
        if section is None or value is None:
            continue
        key = prefix + f.name
        if not isinstance(value, dict):
            raise ConfigError(
                f"'{key}' in {source} must be a section (a mapping of keys to values), got {value!r}: "
                f"write its keys indented under '{f.name}:', or remove it"
            )
        check_sections(section, value, source, key + ".")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
