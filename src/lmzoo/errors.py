"""User-facing errors.

Every problem a user can cause (a bad path, a bad config value, a corrupt checkpoint) raises a
subclass of :class:`LmzooError` with a one-line message that names the problem. The CLI prints
``lmzoo: error: <message>`` and exits with ``exit_code`` (2 for usage errors) instead of a traceback.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable


class LmzooError(Exception):
    """A problem with the user's input; shown as one line, never as a traceback."""

    exit_code = 2


class ConfigError(LmzooError):
    """An unknown key, an invalid value or inconsistent settings."""


class DataError(LmzooError):
    """Missing, empty or undecodable data."""


class CheckpointError(LmzooError):
    """A checkpoint or weights directory that is missing files, truncated or of another model."""


class ResourceError(LmzooError):
    """Out of memory (or another resource) for the sizes asked for; exit code 3, not a usage error."""

    exit_code = 3


class Interrupted(LmzooError):
    """Work stopped by a signal after saving what it had: exit code 128 + the signal, as shells expect
    (130 for Ctrl-C / SIGINT, 143 for SIGTERM), so ``lmzoo ... && next`` does not carry on."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


QUOTE_CHARS = 200  # the most of a user's value an error message repeats


class _ShortRepr(reprlib.Repr):
    """reprlib with integers too long to print (Python refuses over 4,300 digits) named by their size."""

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 3 * self.maxlong:  # more than ~maxlong digits: never convert it whole
            return f"<an integer of about {int(x.bit_length() * 0.30103) + 1:,} digits>"
        return super().repr_int(x, level)


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for error messages.

    A bad value may be megabytes long (a YAML alias expansion, a pasted file): the message names it,
    it does not repeat it. Built with :mod:`reprlib`, so a huge container or integer is never
    rendered whole before being cut."""
    r = _ShortRepr()
    r.maxstring = r.maxother = r.maxlong = limit
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 8, 8, 8, 8
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean: a, b?)' for the closest names, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=0.5)  # name may be any value
    return f" (did you mean: {', '.join(close)}?)" if close else ""
