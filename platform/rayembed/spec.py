"""Job specs: a YAML file with one section per job, overridden by `key=value` on the command line.

A spec maps job names (`prepare`, `train`, `mine`, `eval`, `embed`, `serve`, ...) to settings;
`rayembed run spec.yaml` runs its sections in the spec's order. Overrides name the section
(`train.max_steps=3`), or not when the command runs one job (`rayembed train spec.yaml max_steps=3`).
A setting that holds settings of its own is reached through it (`train.eval.max_queries=50`).
`${VAR}` in any string is expanded from the environment (`${RAYEMBED_DATA}`: the public data sets).
A spec whose prepare section names a `corpus` (the documents the student will embed) checks the trained
model's retention on that corpus: a train section with a `teacher` and an eval gets the same `corpus` for
its eval unless that names one.
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
        names = key.split(".")
        # `max_steps=3`, `eval.max_queries=50` for a one-job command (`rayembed train`: train's eval)
        if names[0] not in JOBS or job and names[0] in _NESTED.get(job, ()):
            if job is None:
                raise ValueError(f"override {item!r}: prefix it with a job name, one of {JOBS}")
            names = [job, *names]
        if len(names) < 2:
            raise ValueError(f"override {item!r}: name a setting of {names[0]}")
        _set(spec, names, _expand(yaml.safe_load(value)), item)
    return link_corpus(spec)


def link_corpus(spec: dict[str, Any]) -> dict[str, Any]:
    """The prepare section's `corpus` becomes the train eval's (the label-free retention check on the
    documents the student was distilled for, against the train section's `teacher`), unless that eval
    names its own `corpus` (null: none). And when the embed section reads what prepare wrote and train
    what embed wrote, a pca_rotation run fits its axes on the corpus's rows (`train.pca_source: corpus`,
    prepare's `source` column passed through by embed), unless train names its own `pca_source`."""
    prepare, train, embed = (spec.get(k) or {} for k in ("prepare", "train", "embed"))
    corpus, evaluation = prepare.get("corpus"), train.get("eval")
    if corpus and train.get("teacher") and isinstance(evaluation, dict) and "corpus" not in evaluation:
        evaluation["corpus"] = corpus
    chained = embed.get("input") == prepare.get("output") and train.get("data") == embed.get("output")
    if corpus and chained and train.get("pca_rotation") and "pca_source" not in train:
        train["pca_source"] = "corpus"
        embed["passthrough_columns"] = list(
            dict.fromkeys([*(embed.get("passthrough_columns") or []), "source"])
        )
    return spec


# settings that hold a mapping of their own: `train.eval.max_queries=50` sets one key of train's eval
_NESTED = {"train": ("eval", "tracking"), "merge": ("eval",), "eval": ("tracking",), "embed": ("tracking",)}


def _set(spec: dict[str, Any], path: list[str], value: Any, item: str) -> None:
    """spec[path[0]][path[1]]...[path[-1]] = value, through the nested settings of `_NESTED`."""
    section, *keys = path
    node = spec.setdefault(section, {})
    for key in keys[:-1]:
        if key not in _NESTED.get(section, ()):
            raise ValueError(f"override {item!r}: {section}.{key} holds no settings of its own")
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


__all__ = ["build", "load_spec"]
