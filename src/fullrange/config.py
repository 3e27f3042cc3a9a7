"""Configs: nested frozen dataclasses, one per TOML table, each validated when built; read from dicts (TOML) with
their types checked. Errors name the field in config terms (``adapter.rank``); the CLI alone turns that into a
flag name. A field declared with :func:`setting` carries its help, from which the CLI makes its option."""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, field, fields, is_dataclass

MAX_SEED = 2**63 - 1
"""The largest seed taken (torch's generators take 64 bits; fullrange adds an image's index and a stream offset)."""


def setting(default=MISSING, help: str = "", *, shown: str | None = None, factory=MISSING):
    """A config field with its ``help`` (other fields named in backticks, as `field` or `table.field`), for the
    command line; ``shown`` is what the help says the default is where the value would not say it (a default of
    ``None`` that means "picked later")."""
    return field(default=default, default_factory=factory, metadata={"help": help, "shown": shown})


class ConfigError(ValueError):
    """A bad config value: ``field`` is its dotted name, ``message`` what is wrong with it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message

    def within(self, table: str) -> ConfigError:
        """The same error, its field named from the enclosing ``table``."""
        return ConfigError(f"{table}.{self.field}", self.message)


def check_finite(table) -> None:
    """Every float field of a config table is a finite number."""
    for f in fields(table):
        value = getattr(table, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f.name, f"must be a finite number, got {value}")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None, *, open_low=False):
    """``low <= value <= high`` (``low < value`` with ``open_low``); either bound may be ``None``."""
    below = low is not None and (value <= low if open_low else value < low)
    if below or (high is not None and value > high):
        if high is None:
            rule = f"must be {'positive' if low == 0 and open_low else f'at least {low}'}"
        elif low is None:
            rule = f"must be at most {high}"
        else:
            rule = f"must lie in {'(' if open_low else '['}{low}, {high}]"
        raise ConfigError(name, f"{rule}, got {value}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(name, f"{value!r} is not one of {', '.join(choices)}")


def from_dict(cls, data: dict, where: str = ""):
    """Build the config dataclass ``cls`` (nested tables included) from ``data``, checking every value's type
    against the field's annotation; missing fields take their defaults."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}", f"is not an option; the options here are {', '.join(known)}")
    values = {}
    for name, f in known.items():
        if name in data:
            values[name] = _typed(hints[name], data[name], f"{where}{name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            if not is_dataclass(hints[name]):
                raise ConfigError(f"{where}{name}", "is required")
            values[name] = _typed(hints[name], {}, f"{where}{name}")  # names the table's own required field
    try:
        return cls(**values)
    except ConfigError as err:
        raise (err.within(where.rstrip(".")) if where else err) from None


def _typed(kind, value, name: str):
    """``value`` as a ``kind`` (a dataclass, bool, int, float, str, tuple[str, ...] or one of them | None)."""
    if is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(name, f"must be a table, got {value!r}")
        return from_dict(kind, value, f"{name}.")
    if isinstance(kind, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None:
            return None
        return _typed(options[0], value, name)
    if typing.get_origin(kind) is tuple:
        (item, _) = typing.get_args(kind)
        if not isinstance(value, list | tuple):
            raise ConfigError(name, f"must be a list, got {value!r}")
        return tuple(_typed(item, v, name) for v in value)
    accepted = (int, float) if kind is float else (kind,)
    if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(name, f"must be {'a number' if kind is float else kind.__name__}, got {value!r}")
    return float(value) if kind is float else value
