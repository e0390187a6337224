"""Configuration: typed dataclasses that validate themselves and round-trip through JSON/YAML.

Every model family's config and the training config subclass :class:`Config`. Values coming
from YAML files or ``--key=value`` overrides are converted to the field's declared type, and
unknown keys or invalid values raise :class:`~lmzoo.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from lmzoo.errors import ConfigError, LmzooError, suggest

C = TypeVar("C", bound="Config")


def _convert(name: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise ConfigError naming ``name``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(name, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{name}: {value!r} is not one of {', '.join(map(repr, choices))}"
                + (suggest(str(value), [str(c) for c in choices]) if isinstance(value, str) else "")
            )
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (inner,) = get_args(tp)[:1] or (Any,)
        out = [_convert(name, v, inner) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return value


# Upper bounds on size fields, wherever a config has them: far beyond any real model (the largest
# published ones have ~10^2 layers, width ~3 * 10^4, vocabularies ~2.6 * 10^5), yet small enough that an
# untrusted or mistyped config (n_layer: 1e9) is refused at once instead of building for hours or
# allocating terabytes. Whether a config within these bounds fits the machine is lmzoo.memguard's call.
SIZE_LIMITS: dict[str, int] = {
    "n_layer": 4096, "n_embd": 1 << 20, "d_model": 1 << 20, "n_head": 1 << 16, "n_kv_head": 1 << 16,
    "head_dim": 1 << 16, "d_head": 1 << 16, "vocab_size": 1 << 24, "block_size": 1 << 28, "mlp_hidden": 1 << 22,
    "d_inner": 1 << 22, "n_experts": 1 << 16, "n_experts_per_tok": 1 << 16, "mem_len": 1 << 24,
    "d_state": 1 << 16, "d_conv": 1 << 12, "expand": 1 << 10, "dt_rank": 1 << 20,
}


def check_sizes(cfg: Any) -> None:
    """Raise ConfigError for a size field (see SIZE_LIMITS) that is negative or absurdly large."""
    for name, limit in SIZE_LIMITS.items():
        v = getattr(cfg, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= limit:
            raise ConfigError(f"{name} must be in 0..{limit:,}, got {v:,}")


@dataclasses.dataclass
class Config:
    """Base class: subclasses are dataclasses and may override :meth:`validate`."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _convert(f.name, getattr(self, f.name), hints[f.name]))
        check_sizes(self)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for inconsistent values (override in subclasses)."""

    # -- serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping of settings, got {type(d).__name__}")
        names = cls.field_names()
        for k in d:
            if k not in names:
                raise ConfigError(f"unknown key {k!r} for {cls.__name__}" + suggest(k, names))
        return cls(**d)

    def replace(self: C, **overrides: Any) -> C:
        return type(self).from_dict({**self.to_dict(), **overrides})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls: type[C], path: str | Path) -> C:
        return cls.from_dict(read_json(path))


def read_json(path: str | Path, error: type[LmzooError] = ConfigError) -> dict[str, Any]:
    """Read a JSON object, with a one-line ``error`` for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: no such file")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{p}: expected a JSON object")
    return d


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        msg = str(e).replace("\n", " ")
        raise ConfigError(f"{p}: not valid YAML ({msg})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: expected a YAML mapping of key: value")
    return d


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["--lr=3e-4", "model.n_layer=4"]`` into ``{"lr": 3e-4, "model.n_layer": 4}``.

    Values are parsed as YAML scalars (numbers, booleans, null, lists); dotted keys are kept
    flat and resolved by the caller.
    """
    out: dict[str, Any] = {}
    for item in items:
        s = item[2:] if item.startswith("--") else item
        if "=" not in s:
            raise ConfigError(f"override {item!r} is not of the form --key=value")
        key, raw = s.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key] = value
    return out
