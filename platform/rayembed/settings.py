"""What every job config shares: `check` states a rule in `__post_init__` (a ValueError with the
message, which the CLI prints before exiting with status 2); `build` makes a config from a dict,
refusing unknown keys with the list of known ones."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def build(cls: type[T], values: dict[str, Any] | None) -> T:
    """Instantiate a job dataclass, rejecting unknown keys with the list of known ones."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown setting(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as e:  # missing required field
        raise ValueError(f"{cls.__name__}: {e}") from None
