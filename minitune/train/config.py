"""YAML configs loaded into typed dataclasses, with dotted CLI overrides (`lora.r=32 optim.lr=1e-4`).

Every value is type-checked against the dataclass field; an unknown key is an error naming the
closest valid keys. The resolved config is printed and saved by the recipes at start.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from minitune.errors import ConfigValueError, MinituneError

T = TypeVar("T")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if value == "none" and type(None) in args and any(dataclasses.is_dataclass(a) for a in args):
            return None  # `model.quant=none`: an optional section switched off
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except MinituneError as e:
                errors.append(str(e))
        raise MinituneError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise MinituneError(f"{key}: expected a list, got {value!r}")
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        shorthand = getattr(tp, "SHORTHAND", None)  # `model.quant=nf4` means {quant_type: nf4}, other fields default
        if shorthand and isinstance(value, str):
            value = {shorthand: value}
        if not isinstance(value, dict):
            raise MinituneError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise MinituneError(f"{key}: {value!r} is not one of {[m.value for m in tp]}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise MinituneError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise MinituneError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise MinituneError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, bool):  # YAML reads `resume=true` as a bool; such fields take "true"/"false"
            return str(value).lower()
        if isinstance(value, (str, int, float)):
            return str(value)
        raise MinituneError(f"{key}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise MinituneError(f"{key}: unsupported field type {tp}")


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# keys that moved to another section: an old config gets the new name, not a list of valid keys
MOVED = {"ppo.missing_eos_penalty": "reward.missing_eos_penalty", "ppo.empty_penalty": "reward.empty_penalty"}


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Builds dataclass `cls` from a nested dict, checking keys and types."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in names:
            if prefix + key in MOVED:
                raise MinituneError(f"config key {prefix + key!r} is now {MOVED[prefix + key]!r}; rename it")
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            close += [n for n in names if n not in close and (key.startswith(n) or n.startswith(key))]
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else f"; valid keys: {', '.join(names)}"
            raise MinituneError(f"unknown config key {prefix + key!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigValueError as e:
        raise MinituneError(f"{prefix}{e}") from None
    except MinituneError:
        raise
    except TypeError as e:
        raise MinituneError(f"{prefix or 'config'}: {e}") from None


def to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def parse_overrides(items: list[str]) -> dict:
    """["lora.r=32", "optim.lr=1e-4"] -> {"lora": {"r": 32}, "optim": {"lr": 1e-4}} (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise MinituneError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise MinituneError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); quote it") from None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> T:
    """Defaults of `cls`, then `base` (a mapping of its fields), then the YAML file, then the dotted overrides."""
    data = to_dict(cls())
    if base:
        _check_keys(cls, base)
        data = _merge(data, base)
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise MinituneError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
            raise MinituneError(f"{where}: invalid YAML ({_yaml_problem(e)}); fix the syntax at that line and column") from None
        except UnicodeDecodeError as e:
            raise MinituneError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); save the config as UTF-8") from None
        if not isinstance(loaded, dict):
            raise MinituneError(f"{p}: expected a mapping at the top level")
        _check_keys(cls, loaded)
        data = _merge(data, loaded)
    ov = parse_overrides(list(overrides))
    _check_keys(cls, ov)
    return from_dict(cls, _merge(data, ov))


def _yaml_problem(e: Exception) -> str:
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return f"{context}: {problem}" if context else problem


def _check_keys(cls, data: dict, prefix: str = "") -> None:
    """Unknown keys are reported before merging (defaults would otherwise hide nothing, but the
    error should name what the user wrote)."""
    hints = _hints(cls)
    for key, value in data.items():
        if key not in hints:
            from_dict(cls, {key: value}, prefix)  # raises with the closest keys
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            _check_keys(tp, value, prefix + key + ".")


def dump_config(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def parse_cli(cls: type[T], argv: list[str], base: dict | None = None) -> T:
    """`[--config FILE] [section.key=value ...]`; `base` (fields of `cls`) comes before the file (`load_config`)."""
    path, rest = None, list(argv)
    if rest and rest[0] in ("--config", "-c"):
        if len(rest) < 2:
            raise MinituneError("--config needs a file path")
        path, rest = rest[1], rest[2:]
    elif rest and rest[0].startswith("--config="):
        path, rest = rest[0].split("=", 1)[1], rest[1:]
    for r in rest:
        if r.startswith("-"):
            raise MinituneError(f"unknown argument {r!r}; usage: [--config FILE] [section.key=value ...]")
    return load_config(cls, path, rest, base=base)
