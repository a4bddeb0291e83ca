"""Config files: typed, validated, with ``key=value`` overrides."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from pathlib import Path

from distq.config.loader import (
    ConfigError,
    check_sections,
    deep_merge,
    from_dict,
    parse_overrides,
    read_yaml,
    section_type,
    to_dict,
)
from distq.config.schema import DistqConfig

__all__ = ["ConfigError", "DistqConfig", "config_from_dict", "describe_keys", "load_config", "to_dict"]


BASE_KEY = "base"


def read_config_tree(path: str | Path, seen: tuple = ()) -> dict:
    """A YAML config with its ``base:`` chain merged in (the base file's path is relative
    to the file naming it), so a recipe lists only what differs from its base."""
    path = Path(path)
    if path.resolve() in seen:
        raise ConfigError(f"config file {str(path.resolve())!r} includes itself through 'base:'")
    data = read_yaml(path)
    source = f"config file {str(path)!r}"
    has_base = BASE_KEY in data
    base = data.pop(BASE_KEY, None)
    check_sections(DistqConfig, data, source)
    if not has_base:
        return data
    if not isinstance(base, str) or not base:
        given = "empty" if base in (None, "") else repr(base)
        raise ConfigError(
            f"'base' in {source} is {given}: name the config file to start from (relative to this one), e.g. base: digits_w4a4.yaml"
        )
    base_path = path.parent / base
    if base_path.is_dir():
        raise ConfigError(
            f"'base: {base}' in {source} is a directory ({str(base_path)!r}): name a YAML file, relative to {source}"
        )
    if not base_path.exists():
        raise ConfigError(
            f"'base: {base}' in {source} not found ({str(base_path)!r}): the path is relative to the file naming it"
        )
    return deep_merge(read_config_tree(base_path, seen + (path.resolve(),)), data)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> DistqConfig:
    """Read a YAML config (or only defaults when ``path`` is None) and apply overrides."""
    data = read_config_tree(path) if path is not None else {}
    return config_from_dict(deep_merge(data, parse_overrides(list(overrides))))


def config_from_dict(data: dict) -> DistqConfig:
    return from_dict(DistqConfig, data)


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field."""
    docs = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def describe_keys(cls: type = DistqConfig, prefix: str = "") -> list[str]:
    """One line per config key: ``key = default  # meaning``; the keys of a list of sections
    (``guided.students``) follow it as ``key[].subkey``."""
    lines = []
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        section = section_type(hints[f.name])
        if section is not None:
            if section is not hints[f.name]:
                doc = " ".join((section.__doc__ or "").split())
                lines.append(f"{key}: (optional section, off unless given)  # {doc}")
            lines.extend(describe_keys(section, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        doc = docs.get(f.name, "")
        lines.append(f"{key} = {default}" + (f"  # {doc}" if doc else ""))
        items = typing.get_args(hints[f.name])
        if typing.get_origin(hints[f.name]) is list and items and dataclasses.is_dataclass(items[0]):
            lines.extend(describe_keys(items[0], key + "[]."))
    return lines
