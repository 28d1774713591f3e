"""Typed dataclass configs from YAML and command-line overrides, with errors that name the key.

A config is a tree of dataclasses. :func:`from_dict` builds one from a nested dict (a YAML file),
rejecting unknown keys and wrong types; :func:`apply_overrides` sets dotted keys
(``optim.lr=3e-5``). Values given as strings (from a command line) are parsed as YAML scalars
when the field is not a string, so ``--ttt.layers=[0,6]`` and ``--model.gradient_checkpointing=true``
work. A field whose metadata holds :data:`FIXED_ON_RESUME` may not change when a run resumes
(:func:`fixed_on_resume_keys` lists them for the resume check).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Collection
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration problem, named by its dotted key."""


# Field metadata of a setting a checkpoint is tied to: ``field(default=..., metadata=FIXED_ON_RESUME)``.
FIXED_ON_RESUME = {"fixed_on_resume": True}


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _yaml_scalar(value: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to type ``tp``, or a ConfigError naming ``key``."""
    origin = get_origin(tp)
    if isinstance(value, str) and tp is not str and origin is not Literal:
        if not (origin in (Union, types.UnionType) and str in get_args(tp)):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~"))
        ):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        # Untyped entries set one by one on a command line (--model.tiny.dim=32) arrive as strings.
        return {k: _yaml_scalar(v) if isinstance(v, str) else v for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
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
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _fields(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    data = dict(data or {})
    fields = _fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(prefix + k for k in unknown)}; "
            f"allowed in {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(value, fields[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


def to_dict(obj: Any) -> Any:
    """A plain nested dict (YAML-serialisable) of a dataclass config."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def fixed_on_resume_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of the fields of dataclass config ``cls`` marked :data:`FIXED_ON_RESUME` (a marked
    section stands for all its keys)."""
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("fixed_on_resume"):
            out.append(prefix + f.name)
        elif f.init and dataclasses.is_dataclass(hints[f.name]):
            out += fixed_on_resume_keys(hints[f.name], f"{prefix}{f.name}.")
    return out


def flatten(d: dict[str, Any], prefix: str = "", *, whole: Collection[str] = ()) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``. A section named in ``whole`` (dotted) stays one value, and
    with ``whole`` given an empty section too (free-form mappings such as ``model.tiny``, compared or
    reported as one key)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (whole and (not v or prefix + k in whole)):
            out.update(flatten(v, f"{prefix}{k}.", whole=whole))
        else:
            out[prefix + k] = v
    return out


def get_dotted(d: dict[str, Any], dotted: str) -> Any:
    """The value at ``dotted`` in a nested dict (``{}`` where a part is missing)."""
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``{"optim.lr": 3e-5}``) in a nested dict, creating sections as needed."""
    data = typing.cast(dict[str, Any], yaml.safe_load(yaml.safe_dump(data)) or {})
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: {p} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def parse_key_values(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=3e-5", ...]`` -> ``{"optim.lr": "3e-5"}`` (values parsed later by type)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        k, v = item.split("=", 1)
        out[k.strip().lstrip("-")] = v
    return out
