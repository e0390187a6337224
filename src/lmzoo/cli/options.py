"""The command line's one convention, for every verb.

- An option is written ``--name value`` or ``--name=value``; its canonical name is spelled with underscores,
  the same name as the config field, the YAML recipe key and the Python keyword (``--max_steps``,
  ``--max_new_tokens``); the hyphenated spelling (``--max-steps``) is the same option.
- Settings of a config dataclass (``TrainConfig``) are options generated from its fields, so ``--help`` lists
  each with its type, default and meaning (the comment beside the field, :func:`lmzoo.config.field_docs`).
- Fields of a nested mapping are dotted: ``--model.n_layer 6`` (the preset's config), ``--parallel.mode ddp``,
  ``--optimizer_args.scaling modded``.
- A mistake is one line (``lmzoo: error: ...``, exit code 2) naming the option, with the closest names.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from lmzoo.errors import ConfigError, quote, suggest

MAX_ERROR_CHARS = 1000  # an error line longer than this is cut: it can only be repeating a value

# mappings whose fields are given one by one as --<name>.<field> value (model is TrainConfig.model_args)
DOTTED = {"model": "model_args", "parallel": "parallel", "optimizer_args": "optimizer_args"}


def canonical(option: str) -> str:
    """``--max-new-tokens`` -> ``--max_new_tokens``; short options and ``--`` as they are."""
    if not option.startswith("--") or len(option) == 2:
        return option
    return "--" + option[2:].replace("-", "_")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of a usage dump, no abbreviated options (with ~70
    settings a prefix would silently pick one), and help in the canonical spelling."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        sub = self.prog.split()[-1]
        raise ConfigError(message if sub == "lmzoo" else f"{sub}: {message}")


class HelpFormatter(argparse.HelpFormatter):
    """Wide enough for the settings' names."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=110)


def canonicalize(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Spell every option of ``parser`` and its subparsers canonically (``--max-new-tokens`` defined by a verb
    becomes ``--max_new_tokens``), so help, usage and errors show one convention; :func:`canonical_argv`
    reads either spelling. Call once the parser is built."""
    for action in parser._actions:
        # --x/--no-x pairs keep their spelling: argparse tells them apart by the "--no-" prefix
        if action.option_strings and not isinstance(action, argparse.BooleanOptionalAction):
            action.option_strings = list(dict.fromkeys(canonical(s) for s in action.option_strings))
    table = parser._option_string_actions  # shared with the parser's argument groups: updated in place
    table.clear()
    table.update({s: a for a in parser._actions for s in a.option_strings})
    for sub in _subparsers(parser).values():
        canonicalize(sub)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def parser_for(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The (sub)parser that reads the options of ``argv`` (``lmzoo bench train ...``: bench's train)."""
    for tok in argv:
        if tok == "--":
            break
        sub = _subparsers(parser).get(tok) if not tok.startswith("-") else None
        parser = sub or parser
    return parser


def canonical_argv(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with every option in the spelling its (sub)parser defines (``--max-steps`` and ``--max_steps``
    are one option) and dotted settings joined to their value (``--model.n_layer 6`` -> ``--model.n_layer=6``)."""
    out: list[str] = []
    p = parser
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok == "--":
            out += [tok, *argv[i:]]
            break
        if not tok.startswith("--") or len(tok) == 2:
            sub = _subparsers(p).get(tok)
            p = sub or p
            out.append(tok)
            continue
        key, eq, value = tok.partition("=")
        known = {canonical(s): s for s in p._option_string_actions}
        key = known.get(canonical(key), canonical(key))
        if key.split(".", 1)[0][2:] in DOTTED and "." in key and not eq and i < len(argv):
            eq, value = "=", argv[i]  # a dotted setting always takes a value
            i += 1
        out.append(key + eq + value)
    return out


def _field_type(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(get_args(tp))
    return tp, False


def _metavar(tp: Any) -> str:
    tp, _ = _field_type(tp)
    if get_origin(tp) is Literal:
        return "{" + ",".join(map(str, get_args(tp))) + "}"
    if get_origin(tp) is dict or tp is dict:
        return "MAP"
    if get_origin(tp) in (list, tuple):
        return "LIST"
    return {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR"}.get(tp, "VALUE")


def add_config_options(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One option per field of the config dataclass ``cls`` (grouped by the sections of its source), each
    absent from the parsed namespace unless given; :func:`given_settings` reads them back."""
    from lmzoo.config import field_docs

    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meaning, section = docs.get(f.name, ("", ""))
        name = re.split(r"[:(]", section, maxsplit=1)[0].strip()  # "data: what it is" -> "data"
        about = section[len(name):].strip().removeprefix(":").strip()
        title = f"settings: {name}" if name else "settings"
        if title not in groups:
            groups[title] = parser.add_argument_group(title, about or None)
        group = groups[title]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = "none" if default is None else repr(default) if isinstance(default, str) else str(default).lower() \
            if isinstance(default, bool) else default
        help_text = (meaning if "default" in meaning else f"{meaning} (default {shown})").replace("%", "%%")
        tp, _ = _field_type(hints[f.name])
        if tp is bool:  # --compile alone means true; --compile false
            group.add_argument(f"--{f.name}", nargs="?", const="true", default=argparse.SUPPRESS, metavar="BOOL",
                               help=help_text)
        else:
            group.add_argument(f"--{f.name}", default=argparse.SUPPRESS, metavar=_metavar(hints[f.name]),
                               help=help_text)


def _value(raw: str, tp: Any) -> Any:
    """A command-line string as the field's type expects it: strings as written, the rest read as YAML
    (numbers, booleans, null, [lists], {mappings}); the config's own conversion checks the result."""
    base, _ = _field_type(tp)
    if base is str or (get_origin(base) is Literal and all(isinstance(a, str) for a in get_args(base))):
        return raw
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def given_settings(args: argparse.Namespace, cls: type, extra: Sequence[str] = ()) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (see :func:`add_config_options`), plus the dotted
    ``extra`` ones folded into their mapping (``--model.n_layer=6`` -> ``model_args: {n_layer: 6}``)."""
    from lmzoo.config import parse_overrides

    hints = typing.get_type_hints(cls)
    given = [f.name for f in dataclasses.fields(cls) if hasattr(args, f.name)]
    for name in given:  # argparse hands `--key=--` over as a list of what followed the `--`
        if not isinstance(getattr(args, name), str):
            raise ConfigError(f"--{name} needs a value (--{name}=VALUE)")
    out = {name: _value(getattr(args, name), hints[name]) for name in given}
    for key, value in parse_overrides(list(extra)).items():
        head, _, name = key.partition(".")
        field = DOTTED.get(head)
        if field is None or not name:
            raise ConfigError(f"unknown setting --{key}" + suggest(key, [f.name for f in dataclasses.fields(cls)]))
        out.setdefault(field, {})
        if not isinstance(out[field], dict):
            raise ConfigError(f"--{field} must be a mapping to take --{key}")
        out[field] = {**out[field], name: value}
    return out


def model_overrides(extra: Sequence[str]) -> dict[str, Any]:
    """A preset's config overrides: ``--model.n_layer=6`` (the convention), or ``--n_layer=6``."""
    from lmzoo.config import parse_overrides

    out = {}
    for key, value in parse_overrides(list(extra)).items():
        head, dot, name = key.partition(".")
        if dot and head != "model":
            raise ConfigError(f"unknown setting --{key}: a preset's fields are given as --model.FIELD=VALUE")
        out[name if dot else key] = value
    return out


def unknown_option_error(parser: argparse.ArgumentParser, extra: Sequence[str]) -> ConfigError:
    """A one-line error for arguments ``parser`` does not take, naming the closest options."""
    bad = extra[0]
    names = sorted({canonical(s) for s in parser._option_string_actions if s.startswith("--")})
    key = canonical(bad.partition("=")[0])
    hint = suggest(key, names) if bad.startswith("--") else ""
    return ConfigError(f"{parser.prog.split()[-1]}: unrecognized argument {quote(bad)}{hint}")


def one_line(msg: str) -> str:
    """One line whatever a message holds (a user's value may carry \\r, \\x85, ...): control characters escaped."""
    msg = msg.strip().replace("\n", " ")
    if len(msg) > MAX_ERROR_CHARS:  # a message that echoes a huge value whole (each site should quote() it)
        msg = f"{msg[:MAX_ERROR_CHARS]}... ({len(msg) - MAX_ERROR_CHARS:,} more characters)"
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in msg)
