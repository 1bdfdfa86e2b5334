"""
The vocabulary settings classes are written in, below every module that
declares or checks settings (L{netsvc.config}, L{netsvc.policies},
L{netsvc.endpoints}, each service's settings): L{field} and L{frozen} make the
attrs classes, L{Duration} and L{Size} are values with their own YAML syntax,
and L{Problem}, L{ConfigError}, L{Invalid} and L{suggest} are how a bad value
is reported.  It imports nothing from netsvc; L{netsvc.config} re-exports it all.
"""

from __future__ import annotations

import difflib
import re
import typing
from typing import Any

import attrs


@attrs.frozen
class Problem:
    """One thing wrong in a configuration file."""

    file: str
    path: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        line = f"{where}{self.path}: {self.reason}" if self.path else f"{where}{self.reason}"
        # one line per problem, whatever a key or value in the file held (a quoted key with a newline)
        return line.replace("\r", "\\r").replace("\n", "\\n")


class ConfigError(Exception):
    """
    A configuration cannot be used.  C{str()} gives one line per problem.
    """

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(problems)
        self.problems = problems

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class Invalid(Exception):
    """
    Raised by converters: the value at the current key path is unusable.
    """


def suggest(word: str, choices: typing.Iterable[str]) -> str:
    """
    Return C{" (did you mean 'x'?)"} for the closest of C{choices}, or C{""}.
    """
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# -- value types with their own YAML syntax ---------------------------------


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


class Duration(float):
    """Seconds; YAML accepts C{30}, C{1.5}, C{"250ms"}, C{"30s"}, C{"5m"}, C{"2h"}, C{"1d"}."""

    @classmethod
    def fromConfig(cls, value: object, path: str, walker: object = None) -> Duration:
        if isinstance(value, bool):
            raise Invalid(f"expected a duration like 30s or 5m, got {value!r}")
        if isinstance(value, (int, float)):
            return cls(value)
        m = _DURATION.match(str(value))
        if not m:
            raise Invalid(f"expected a duration like 30s or 5m, got {value!r}")
        return cls(float(m.group(1)) * _DURATION_UNITS[m.group(2)])


_SIZE = re.compile(r"^\s*(\d+)\s*(B|K|KB|KiB|M|MB|MiB|G|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1 << 20, "mb": 10**6,
               "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30}


class Size(int):
    """Bytes; YAML accepts C{4096}, C{"64KiB"}, C{"1M"} (binary), C{"1MB"} (decimal)."""

    @classmethod
    def fromConfig(cls, value: object, path: str, walker: object = None) -> Size:
        if isinstance(value, bool):
            raise Invalid(f"expected a size like 4096 or 64KiB, got {value!r}")
        if isinstance(value, int):
            return cls(value)
        m = _SIZE.match(str(value))
        if not m:
            raise Invalid(f"expected a size like 4096 or 64KiB, got {value!r}")
        return cls(int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])


# -- settings classes ------------------------------------------------------------


def field(default: Any = attrs.NOTHING, *, min: float | None = None, max: float | None = None,
          factory: Any = None, doc: str = "") -> Any:
    """An attrs field with bounds used by L{structure}."""
    metadata = {"min": min, "max": max, "doc": doc}
    if factory is not None:
        return attrs.field(factory=factory, metadata=metadata, kw_only=True)
    return attrs.field(default=default, metadata=metadata, kw_only=True)


def frozen(cls: type) -> type:
    """Settings classes: frozen, keyword-only attrs classes."""
    return attrs.frozen(kw_only=True)(cls)
