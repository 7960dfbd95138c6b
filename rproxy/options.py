"""
The options of one plugin (a balancer, a filter), read one by one and checked; sizes and durations as people write them.

Values may be strings (C{--balancer-option key=3}) or typed (C{3} from a TOML file); each reader accepts both
and raises C{ValueError} naming the plugin and the option, and L{PluginOptions.finish} rejects an option
nothing read (a typo is an error, not a silent default).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

_SIZE = re.compile(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", re.IGNORECASE)
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}


def parseSize(text: str) -> int:
    """Parse C{"1024"}, C{"64k"}, C{"10M"}, C{"1GiB"} (powers of 1024) into bytes."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 1048576, 512k, 10M, 1G)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def parseDuration(text: str) -> float:
    """Parse C{"30"} or C{"30s"}, C{"250ms"}, C{"5m"}, C{"1h"} into seconds."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (examples: 30, 30s, 250ms, 5m, 1h)")
    return float(match.group(1)) * _SECONDS[(match.group(2) or "").lower()]


class PluginOptions:
    """
    The options given to one plugin, read one by one; L{finish} then rejects any left unread.

    @ivar kind: what the plugin is (C{"balancer"}, C{"filter"}), for errors.
    @ivar name: its name, for errors.
    """

    def __init__(self, kind: str, name: str, options: Mapping[str, object]) -> None:
        self.kind = kind
        self.name = name
        self._options = dict(options)
        self._read: set[str] = set()

    def error(self, name: str, problem: str) -> ValueError:
        """An error about option C{name}, for the caller to raise."""
        return ValueError(f"{self.kind} {self.name}: option {name}: {problem}")

    def text(self, name: str, default: str | None = None) -> str | None:
        """The option as a string (C{default} when absent)."""
        self._read.add(name)
        value = self._options.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {value!r}")
        return value

    def number(self, name: str, default: float, minimum: float = 0.0, inclusive: bool = False) -> float:
        """The option as a float above C{minimum} (or at least C{minimum} when C{inclusive})."""
        self._read.add(name)
        value = self._options.get(name)
        if value is None:
            return default
        try:
            if isinstance(value, bool):
                raise TypeError(value)
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise self.error(name, f"expected a number, got {value!r}") from None
        if not math.isfinite(number) or number < minimum or (number == minimum and not inclusive):
            bound = "at least" if inclusive else "greater than"
            raise self.error(name, f"must be {bound} {minimum:g}, got {value!r}")
        return number

    def integer(self, name: str, default: int | None, minimum: int = 0) -> int | None:
        """The option as a whole number, at least C{minimum} (C{default} when absent)."""
        self._read.add(name)
        value = self._options.get(name)
        if value is None:
            return default
        try:
            if isinstance(value, bool | float):
                raise TypeError(value)
            number = int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise self.error(name, f"expected a whole number, got {value!r}") from None
        if number < minimum:
            raise self.error(name, f"must be at least {minimum}, got {value!r}")
        return number

    def flag(self, name: str, default: bool) -> bool:
        """The option as C{true}/C{false} (or the strings C{"true"}/C{"false"})."""
        self._read.add(name)
        value = self._options.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise self.error(name, f"expected true or false, got {value!r}")

    def strings(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        """The option as a list of strings (a single string is a list of one; a comma-separated string too)."""
        self._read.add(name)
        value = self._options.get(name)
        if value is None:
            return default
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise self.error(name, f"expected a list of strings, got {value!r}")

    def size(self, name: str, default: int) -> int:
        """The option as a size in bytes (C{4096}, C{"64k"}, C{"10M"})."""
        self._read.add(name)
        value = self._options.get(name)
        if value is None:
            return default
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        try:
            return parseSize(str(value)) if isinstance(value, str) else _raise(value)
        except ValueError as e:
            raise self.error(name, str(e)) from None

    def duration(self, name: str, default: float) -> float:
        """The option as seconds (C{30}, C{1.5}, C{"250ms"}, C{"5m"}), at least 0."""
        self._read.add(name)
        value = self._options.get(name)
        if value is None:
            return default
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
            return float(value)
        try:
            return parseDuration(value) if isinstance(value, str) else _raise(value)
        except ValueError as e:
            raise self.error(name, str(e)) from None

    def table(self, name: str) -> dict[str, object]:
        """The option as a table of keys to values (empty when absent)."""
        self._read.add(name)
        value = self._options.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table, got {value!r}")
        return dict(value)

    def prefixed(self, prefix: str) -> dict[str, object]:
        """Every option whose name starts with C{prefix}, by the rest of its name (they count as read)."""
        found = {}
        for name, value in self._options.items():
            if name.startswith(prefix):
                self._read.add(name)
                found[name[len(prefix) :]] = value
        return found

    def finish(self) -> None:
        """Raise C{ValueError} if an option was given that nothing read."""
        unknown = sorted(set(self._options) - self._read)
        if not unknown:
            return
        known = ", ".join(sorted(self._read)) or "none"
        raise ValueError(f"{self.kind} {self.name}: unknown option {unknown[0]!r} (its options: {known})")


def _raise(value: object) -> int:
    raise ValueError(f"got {value!r}")
