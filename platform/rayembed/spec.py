"""Job specs: a YAML file with one section per job, overridden by `key=value` on the command line.

A spec maps job names (`prepare`, `train`, `mine`, `eval`, `embed`, `serve`, ...) to settings;
`rayembed run spec.yaml` runs its sections in the spec's order. Overrides name the section
(`train.max_steps=3`), or not when the command runs one job (`rayembed train spec.yaml max_steps=3`).
`${VAR}` in any string is expanded from the environment (`${RAYEMBED_DATA}`: the public data sets).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from rayembed.config import JOBS
from rayembed.settings import build


def _expand(value: Any) -> Any:
    """Expand ${VAR} in every string of a spec."""
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def load_spec(path: str | Path | None, overrides: list[str] = (), job: str | None = None) -> dict[str, Any]:  # type: ignore[assignment]
    """Read a YAML spec and apply `key=value` overrides (values parsed as YAML)."""
    spec: dict[str, Any] = {}
    if path is not None:
        spec = _expand(yaml.safe_load(Path(path).read_text()) or {})
        if not isinstance(spec, dict) or not set(spec) <= set(JOBS):
            raise ValueError(f"{path}: a spec maps job names {JOBS} to settings, got keys {list(spec)}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        section, _, name = key.rpartition(".")
        section = section or job or ""
        if section not in JOBS:
            raise ValueError(f"override {item!r}: prefix it with a job name, one of {JOBS}")
        spec.setdefault(section, {})[name] = _expand(yaml.safe_load(value))
    return spec


__all__ = ["build", "load_spec"]
