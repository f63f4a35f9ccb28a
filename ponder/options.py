"""``key=value`` options from the command line -> a technique's frozen dataclass of hyperparameters."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

from ponder.errors import PonderError


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered technique (a KV policy, a depth policy): its options dataclass, its constructor, one line."""

    options: type
    build: Callable[[Any], Any]
    help: str


def parse_spec(text: str, kind: str, names: Iterable[str]) -> tuple[str, dict[str, str]]:
    """``name[:key=value...]`` -> (name, raw options); a one-line ``PonderError`` naming ``kind`` ("KV-cache
    policy", "depth policy") for an unknown name or an option not written key=value."""
    names = list(names)
    name, *parts = text.strip().split(":")
    if name not in names:
        raise PonderError(f"unknown {kind} {name!r} in {text!r}: choose from {', '.join(names)}")
    raw: dict[str, str] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise PonderError(f"bad option {part!r} for {kind} {name!r}: write key=value")
        raw[key] = value
    return name, raw

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
