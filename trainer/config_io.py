"""Generic machinery behind `layout2image.trainer.config`: typed dataclasses from plain data, files, overrides.

Nothing here knows the trainer's sections: every function takes the root dataclass. Values are checked against the
field annotations (``int``, ``float``, ``bool``, ``str``, ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``,
nested dataclasses); unknown keys and wrong types raise `ConfigError` naming the dotted key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "apply_overrides",
    "build_dataclass",
    "coerce",
    "field_type",
    "merge",
    "parse_override",
    "plain",
    "read_config_file",
]


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key (``section.field``)."""


def plain(value: Any) -> Any:
    """Tuples -> lists, Paths -> str, recursively (for YAML/JSON)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------------- type checking


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against (and lightly converted to) the annotation ``tp``; raises `ConfigError`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
        else:
            for arg in args:
                if arg is type(None):
                    continue
                try:
                    return coerce(value, arg, key)
                except ConfigError:
                    continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} settings, got {value!r}")
        return build_dataclass(tp, value, key)
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            items = [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        elif args:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {_type_name(tp)}, got {len(value)} values {list(value)!r}")
            items = [coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = list(value)
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected text, got {value!r} ({type(value).__name__}); quote it")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, name: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    where = key.rsplit(".", 1)[0] if "." in key else "the config"
    return ConfigError(f"unknown setting {key!r}{hint} (settings of {where}: {', '.join(known)})")


def build_dataclass(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            raise _unknown_key(key, str(name), names)
        kwargs[name] = coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        where = prefix or "config"
        raise ConfigError(f"invalid {where} setting: {e}") from None


# ---------------------------------------------------------------------------------------------------- files


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``/``.json``) or TOML (``.toml``) config file as nested plain data."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / tomllib.TOMLDecodeError: one line with the file, line and column
        raise ConfigError(f"cannot parse {str(path)!r}: {_parse_error_line(e)}") from None
    if data is None:
        # An empty file is most likely a mistake (a wrong or unsaved file): training on the defaults would hide it.
        raise ConfigError(f"config file {str(path)!r} is empty; give a file with settings (model:, train:, ...)")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{str(path)!r} must hold a mapping of sections (model:, train:, ...), got {type(data).__name__}"
        )
    return dict(data)


def _parse_error_line(e: Exception) -> str:
    """A YAML/TOML parser's error as one line: ``line L, column C: problem`` (YAML's message spans several)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if mark is not None and problem:
        context = getattr(e, "context", None)
        what = f"{problem} ({context})" if context else problem
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
    return " ".join(str(e).split())


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def field_type(root: type, path: Sequence[str], key: str) -> Any:
    """The annotation at a dotted key, walking nested dataclasses; raises `ConfigError` for unknown keys."""
    cls: Any = root
    tp: Any = None
    for i, name in enumerate(path):
        if cls is None:
            raise ConfigError(f"unknown setting {key!r}: {'.'.join(path[:i])} has no sub-settings")
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        if name not in names:
            raise _unknown_key(".".join(path[: i + 1]), name, names)
        tp = _hints(cls)[name]
        candidates = [tp, *typing.get_args(tp)]
        cls = next((c for c in candidates if dataclasses.is_dataclass(c)), None)
    return tp


def parse_override(root: type, text: str) -> tuple[list[str], Any]:
    """``"train.steps=100"`` -> (``["train", "steps"]``, ``100``); the value typed by the field (see module doc)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    path = key.split(".")
    if not key or any(not p for p in path):
        raise ConfigError(f"override {text!r} has an empty key; write section.field=value")
    tp = field_type(root, path, key)
    raw_s = raw.strip()
    try:
        value = yaml.safe_load(raw_s) if raw_s else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse the value {raw!r}: {e}") from None
    try:
        coerce(value, tp, key)
    except ConfigError:
        # A text field keeps the raw text (a folder named "123", a prompt with a colon).
        if raw_s and _accepts_str(tp):
            return path, raw_s
        raise
    return path, value


def _accepts_str(tp: Any) -> bool:
    return tp is str or str in typing.get_args(tp)


def apply_overrides(root: type, data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to nested plain data (a copy)."""
    out = copy.deepcopy(dict(data))
    for text in overrides:
        path, value = parse_override(root, text)
        node = out
        for name in path[:-1]:
            if not isinstance(node.get(name), Mapping):
                node[name] = {}
            node = node[name]
        node[path[-1]] = value
    return out
