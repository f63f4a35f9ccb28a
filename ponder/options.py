"""``key=value`` options from the command line -> a technique's frozen dataclass of hyperparameters."""

from __future__ import annotations

import dataclasses
from typing import Any

from ponder.errors import PonderError

_KINDS = {"int": int, "float": float, "bool": bool, "str": str}


def fields(cls: type) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(cls)}


def build(cls: type, raw: dict[str, str], where: str, also_valid: tuple[str, ...] = ()) -> Any:
    """``cls(**converted raw)``; unknown keys, unconvertible values and the dataclass's ValueErrors become one-line
    PonderErrors naming ``where``."""
    known = fields(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            valid = ", ".join(list(known) + list(also_valid))
            raise PonderError(f"unknown option {key!r} for {where!r}; valid options: {valid}")
        kind = _KINDS.get(str(known[key].type).split("|")[0].strip(), str)
        try:
            values[key] = convert(kind, value)
        except ValueError:
            raise PonderError(f"option {key} of {where!r} needs a value of type {kind.__name__}, got {value!r}")
    try:
        return cls(**values)
    except ValueError as e:
        raise PonderError(f"{where}: {e}")


def convert(kind: Any, value: str) -> Any:
    if kind is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    return kind(value)
