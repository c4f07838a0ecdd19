"""What every job config shares: `check` (and `one_of`) states a rule in `__post_init__` (a ValueError with the
message, which the CLI prints before exiting with status 2); `build` makes a config from a dict,
refusing unknown keys with the list of known ones."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import Any, TypeVar

T = TypeVar("T")


def check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def one_of(name: str, value: Any, choices: Any, optional: bool = False) -> None:
    """`name` must be one of `choices` (or None when `optional`): a ValueError naming them otherwise."""
    if not (value in choices or (optional and value is None)):
        listed = ", ".join(map(str, choices)) + (" or null" if optional else "")
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")


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


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), by field name."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(body, ast.ClassDef)
    docs = {}
    for node, after in zip(body.body, body.body[1:], strict=False):
        named = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        text = (
            isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        )
        if named and text:
            docs[node.target.id] = inspect.cleandoc(after.value.value)  # type: ignore[attr-defined]
    return docs


def describe(cls: type) -> str:
    """Every setting of a job config: name, default (or 'required') and docstring, for `--help`."""
    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        doc = textwrap.fill(
            " ".join(docs.get(f.name, "").split()), 100, initial_indent="    ", subsequent_indent="    "
        )
        lines.append(f"  {f.name} (default: {default})\n{doc}")
    return "settings (key=value, or in the spec's section):\n" + "\n".join(lines)
