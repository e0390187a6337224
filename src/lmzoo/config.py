"""Configuration: typed dataclasses that validate themselves and round-trip through JSON/YAML.

Every model family's config and the training config subclass :class:`Config`. Values coming
from YAML files or ``--key=value`` overrides are converted to the field's declared type, and
unknown keys or invalid values raise :class:`~lmzoo.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import math
import os
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from lmzoo.common import fmt_bytes
from lmzoo.errors import ConfigError, LmzooError, quote, suggest

C = TypeVar("C", bound="Config")


INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # what torch and NumPy integers hold


def _to_int(name: str, value: Any) -> int:
    """An integer setting from an int, an integral float or a string ("1e6", "10_000"), within 64 bits."""
    out = None
    if isinstance(value, int) and not isinstance(value, bool):
        out = value
    elif isinstance(value, float) and value.is_integer():
        out = int(value)
    elif isinstance(value, str):
        try:
            f = float(value.replace("_", ""))
        except ValueError:
            f = None
        if f is not None and f.is_integer():
            out = int(f)
    if out is None:
        raise ConfigError(f"{name}: expected an integer, got {quote(value)}")
    if not INT_MIN <= out <= INT_MAX:
        raise ConfigError(f"{name}: {quote(out)} does not fit in a 64-bit integer")
    return out


def convert(name: str, value: Any, tp: Any) -> Any:
    """``value`` as the annotated type ``tp`` (the conversion every Config field gets: strings parsed, NaN and
    infinities refused, integers within 64 bits), or a ConfigError naming ``name``."""
    return _convert(name, value, tp)


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
        raise ConfigError(errors[0] if errors else f"{name}: invalid value {quote(value)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{name}: {quote(value)} is not one of {', '.join(map(repr, choices))}"
                + (suggest(str(value), [str(c) for c in choices]) if isinstance(value, str) else "")
            )
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            if value.strip().startswith("["):
                try:
                    value = load_yaml_text(value, name)
                except (yaml.YAMLError, ValueError):
                    raise ConfigError(f"{name}: expected a list, got {quote(value)}") from None
            else:
                value = value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {quote(value)}")
        (inner,) = get_args(tp)[:1] or (Any,)
        out = [_convert(name, v, inner) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {quote(value)}")
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
        raise ConfigError(f"{name}: expected true or false, got {quote(value)}")
    if tp is int:
        return _to_int(name, value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {quote(value)}")
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond any float
            raise ConfigError(f"{name}: expected a number, got {quote(value)}") from None
        if not math.isfinite(f):  # NaN passes every "< 0" check: refuse it where it enters
            raise ConfigError(f"{name} must be a finite number, got {quote(value)}")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}: expected a string, got {quote(value)}")
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


PARALLEL_PER_CORE = 4  # threads or worker processes per CPU core beyond which only contention grows


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, e.g. in a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_parallelism(name: str, n: int | None) -> None:
    """Refuse a thread or process count above PARALLEL_PER_CORE x the cores (``--threads=2000`` on two
    cores only thrashes the machine: a load average of hundreds, no speed-up)."""
    limit = PARALLEL_PER_CORE * cpu_cores()
    if n is not None and n > limit:
        raise ConfigError(f"{name} must be at most {limit} ({PARALLEL_PER_CORE} x the {cpu_cores()} CPU cores), "
                          f"got {n:,}")


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
                raise ConfigError(f"unknown key {quote(k)} for {cls.__name__}" + suggest(k, names))
        return cls(**d)

    def replace(self: C, **overrides: Any) -> C:
        return type(self).from_dict({**self.to_dict(), **overrides})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls: type[C], path: str | Path) -> C:
        return cls.from_dict(read_json(path))


@functools.cache  # parsed once per class: every `lmzoo` command builds the parsers that read it
def field_docs(cls: type) -> dict[str, tuple[str, str]]:
    """``{field: (meaning, section)}`` of a config dataclass, read from the comments in its source.

    A field's meaning is the comment on its line, else the comment lines just above it; a comment block
    above a field that has its own comment names the section the following fields belong to. This keeps
    the one-line docs where a reader of the class sees them, and ``lmzoo train --help`` lists the same text.
    Fields of base classes come first; a class whose source is unavailable gives no docs.
    """
    out: dict[str, tuple[str, str]] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or "__dataclass_fields__" not in vars(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        comments: dict[int, str] = {}  # line number -> comment text
        code_lines: set[int] = set()
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
                code_lines.add(tok.start[0])
        section = ""
        body = ast.parse(src).body[0]
        for node in getattr(body, "body", []):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above, line = [], node.lineno - 1
            while line in comments and line not in code_lines:  # the comment-only lines just above
                above.insert(0, comments[line])
                line -= 1
            trailing = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in comments]
            if trailing:
                section = " ".join(above) or section
                doc = " ".join(trailing)
            else:
                doc = " ".join(above)
            out[node.target.id] = (doc, section)
    return out


# Bounds on settings files read from disk. A file may come from someone else: a 3 GB config.json, or
# brackets nested 100,000 deep, must be one error line, not a read of the whole file or a RecursionError
# (Python's JSON and YAML parsers recurse once per level). Real settings are kilobytes and a few levels
# deep; a GPT-2-style vocab.json (the largest JSON lmzoo parses itself) is about 1 MB.
JSON_MAX_BYTES = 64 << 20
YAML_MAX_BYTES = 1 << 20  # a training recipe
MAX_NESTING = 64  # containers inside containers
YAML_MAX_NODES = 100_000  # values of a YAML document with every alias expanded


def read_bounded(path: str | Path, max_bytes: int, error: type[LmzooError] = ConfigError) -> bytes:
    """The bytes of a file of at most ``max_bytes``, refused (one ``error`` line) before reading a larger one.

    The size is taken from the opened file (a symlink's target), and at most ``max_bytes + 1`` bytes are
    read, so a device or a file that grows while read cannot make it read more."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: no such file")
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise error(f"{p}: {fmt_bytes(size)}, larger than the {fmt_bytes(max_bytes)} such a file may be")
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{p}: cannot read it ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise error(f"{p}: larger than the {fmt_bytes(max_bytes)} such a file may be")
    return data


def _too_deep(obj: Any, limit: int) -> bool:
    """Whether JSON-like ``obj`` nests containers more than ``limit`` deep (iterative: any depth is safe)."""
    stack = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        children = o.values() if isinstance(o, dict) else o if isinstance(o, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def loads_json(text: str | bytes, where: str | Path, error: type[LmzooError] = ConfigError) -> Any:
    """Parse JSON from an untrusted source: malformed, too deeply nested (more than MAX_NESTING) or holding an
    integer too long for Python (over 4,300 digits) is one ``error`` line naming ``where``."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply (more than {MAX_NESTING} levels)") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError, as is a 5,000-digit integer
        raise error(f"{where}: not valid JSON ({' '.join(str(e).split())[:200]})") from None
    # fewer opening brackets than the limit (counting those inside strings too): it cannot nest deeper
    opening = text.count("[") + text.count("{") if isinstance(text, str) else text.count(b"[") + text.count(b"{")
    if opening > MAX_NESTING and _too_deep(obj, MAX_NESTING):
        raise error(f"{where}: JSON nested too deeply (more than {MAX_NESTING} levels)")
    return obj


def read_json(path: str | Path, error: type[LmzooError] = ConfigError, max_bytes: int = JSON_MAX_BYTES,
              mapping: bool = True) -> Any:
    """Read a JSON file (an object unless ``mapping=False``) with bounds: at most ``max_bytes``, nested at
    most MAX_NESTING deep. A missing, oversized or malformed file is a one-line ``error``."""
    p = Path(path)
    d = loads_json(read_bounded(p, max_bytes, error), p, error)
    if mapping and not isinstance(d, dict):
        raise error(f"{p}: expected a JSON object")
    return d


class _BoundedYamlLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses alias bombs: the document is measured as if every alias were
    expanded (nodes and depth) before anything is built from it.

    Aliases make the node graph a DAG: ``a: &a [x, x]; b: &b [*a, *a]; ...`` is 255 bytes that expand to
    billions of values, cheap to load (shared objects) but not to print, copy or serialize. A DAG's
    expanded size is counted in linear time by memoizing each node's size; an alias to a node still being
    composed (a cycle) is refused too."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _expanded_size(node, {}, 1)
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, tuple[int, int]], depth: int) -> int:
    """Values under ``node`` with aliases expanded (memoized in ``sizes``: id -> (size, height))."""
    key = id(node)
    if key in sizes:
        size, height = sizes[key]
        if size < 0:
            raise ConfigError("a YAML alias refers to the value that contains it")
        if depth + height - 1 > MAX_NESTING:
            raise ConfigError(f"YAML nested more than {MAX_NESTING} levels (aliases expanded)")
        return size
    if depth > MAX_NESTING:
        raise ConfigError(f"YAML nested more than {MAX_NESTING} levels (aliases expanded)")
    sizes[key] = (-1, 0)
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    size, height = 1, 1
    for child in children:
        size += _expanded_size(child, sizes, depth + 1)
        height = max(height, 1 + sizes[id(child)][1])
        if size > YAML_MAX_NODES:
            raise ConfigError(f"YAML expands to more than {YAML_MAX_NODES:,} values (nested aliases?)")
    sizes[key] = (size, height)
    return size


def load_yaml_text(text: str, where: str | Path = "YAML") -> Any:
    """``yaml.safe_load`` within the bounds of a recipe: alias bombs, cycles and deep nesting are a
    ConfigError naming ``where``; malformed YAML raises ``yaml.YAMLError`` (or ValueError for an integer
    too long for Python) for the caller to word."""
    try:
        return yaml.load(text, Loader=_BoundedYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:  # the composer recurses once per level, before any bound is checked
        raise ConfigError(f"{where}: YAML nested too deeply (more than {MAX_NESTING} levels)") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (at most YAML_MAX_BYTES, aliases expanded to at most YAML_MAX_NODES values),
    with a one-line error for a missing, oversized or malformed file."""
    p = Path(path)
    raw = read_bounded(p, YAML_MAX_BYTES)
    try:
        d = load_yaml_text(raw.decode("utf-8"), p)
    except (UnicodeDecodeError, yaml.YAMLError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise ConfigError(f"{p}: not valid YAML ({msg[:200]})") from None
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
            raise ConfigError(f"override {quote(item)} is not of the form --key=value")
        key, raw = s.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise ConfigError(f"override {quote(item)} has an empty key")
        try:
            value = load_yaml_text(raw, f"--{key}") if raw.strip() else ""
        except (yaml.YAMLError, ValueError):
            value = raw
        out[key] = value
    return out
