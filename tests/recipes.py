"""Running a shipped recipe (jobs/*.yaml) the way a user does: `rayembed run` in a fresh process with its
own local Ray cluster, on the real data, at the shipped settings. Overrides are limited to step counts
(max_steps; CI's distill run also pca_ranking_steps), checkpoint_every and data sizes (rows prepared;
queries, documents and STS pairs evaluated; documents embedded; passes over a data set smaller than 30
steps); the ZeRO stage, batching, pooling and precision stay as shipped. Used by tests/test_recipes.py
(CI) and tests/bench/bench_reliability.py (every recipe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
RAYEMBED = str(Path(sys.executable).parent / "rayembed")

# name -> overrides of `rayembed run jobs/<name>.yaml`: 30 training steps, at least two checkpoints
RECIPES: dict[str, list[str]] = {
    "smoke": ["train.max_steps=30"],  # checkpoints every 6 steps as shipped
    "distill": [
        "prepare.limit=2000",
        "train.pca_rows=2000",
        "train.max_steps=30",
        "train.checkpoint_every=10",
        "train.eval.max_queries=50",
        "train.eval.max_docs=300",
        "eval.max_queries=100",
        "eval.max_docs=1000",
    ],
    # the 80 example rows make 2 steps an epoch: 15 passes over them for 30 steps
    "llm-lora": [
        "train.max_steps=30",
        "train.epochs=15",
        "train.checkpoint_every=10",
        "train.eval.max_queries=30",
        "eval.max_queries=50",
        "eval.max_docs=300",
    ],
    "eval": ["eval.max_queries=100", "eval.max_docs=1000"],
    "embed": ["embed.input={corpus300}"],  # the first 300 SciFact documents
    "embed-long": [],  # 121 whole Wikipedia articles as 5,661 chunks: ~5 min on 2 cores (bench only)
    # the fine-tune of the smoke recipe souped with its base model (the shipped ingredients are the
    # train and mine recipes' models, which the bench trains); the soup calibrated on smoke's triples
    "merge": [
        "merge.models=[{work}/runs/smoke/model,default]",
        "merge.output={work}/runs/soup/model",
        "merge.calibration_texts={work}/runs/smoke/snli.jsonl",
        "merge.eval.max_queries=50",
        "merge.eval.max_docs=300",
    ],
    # sized for GPUs: on 2 CPU cores one step took over 15 min (bench_reliability.py runs it, not CI)
    # (SNLI dev's 2,943 triples are 3 steps of 2 x 512 rows: 10 passes for 30 steps)
    "train": [
        "train.use_gpu=false",
        "train.max_steps=30",
        "train.epochs=10",
        "train.checkpoint_every=10",
        "train.eval.max_queries=100",
        "train.eval.max_docs=1000",
    ],
    # ~800 mined pairs are 12 steps of 2 x 32 rows: 3 passes for 30 steps (checkpoints every 10 as shipped)
    "mine": [
        "train.max_steps=30",
        "train.epochs=3",
        "train.eval.max_queries=100",
        "train.eval.max_docs=1000",
    ],
}
STEPS = {"smoke": 30, "distill": 30, "llm-lora": 30, "train": 30, "mine": 30}


@dataclass
class Run:
    name: str
    exit: int
    wall_s: float
    sections: dict[str, Any] = field(default_factory=dict)
    log: str = ""


def sections_of(stdout: str) -> dict[str, Any]:
    """The JSON summaries `rayembed run` prints, one per section ({"train": {...}}), by section."""
    out: dict[str, Any] = {}
    decoder, i = json.JSONDecoder(), 0
    while (j := stdout.find("{\n", i)) >= 0:
        try:
            obj, end = decoder.raw_decode(stdout[j:])
        except json.JSONDecodeError:
            i = j + 2
            continue
        if isinstance(obj, dict) and len(obj) == 1:
            out.update(obj)
        i = j + end
    return out


def corpus_head(work: Path, rows: int = 300) -> Path:
    """The first `rows` SciFact documents (a data-size override of the embed recipe)."""
    from rayembed.config import SHARED_DATA

    path = work / f"scifact-{rows}.jsonl"
    lines = (Path(SHARED_DATA) / "scifact" / "corpus.jsonl").read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:rows]))
    return path


def run_recipe(name: str, work: Path, timeout_s: float = 1800, extra: list[str] | None = None) -> Run:
    """`rayembed run jobs/<name>.yaml <overrides>` with `work` as its folder (the spec's runs/... paths land
    there); killed after `timeout_s` (a hang fails, it does not stall the caller)."""
    work.mkdir(parents=True, exist_ok=True)
    fill = {"work": str(work), "corpus300": str(corpus_head(work)) if name == "embed" else ""}
    args = [a.format(**fill) for a in RECIPES[name]] + (extra or [])
    cmd = [RAYEMBED, "run", str(JOBS / f"{name}.yaml"), *args]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout_s)
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = -9, _text(e.stdout), _text(e.stderr) + f"\n[killed after {timeout_s} s]"
    wall = round(time.perf_counter() - started, 1)
    return Run(name, rc, wall, sections_of(out), (out + "\n" + err)[-6000:])


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def checkpoints(train: dict[str, Any]) -> list[str]:
    """The checkpoint folders a train section left in its (local) storage, oldest first."""
    folder = Path(train["checkpoint"]).parent
    return sorted(p.name for p in folder.glob("checkpoint_*") if p.is_dir())
