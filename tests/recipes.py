"""Running a shipped recipe (jobs/*.yaml) the way a user does: `rayembed run` in a fresh process with its
own local Ray cluster, on the real data, at the shipped settings. Overrides are limited to step counts
(max_steps; CI's distill run also pca_ranking_steps), checkpoint_every and data sizes (rows prepared;
queries, documents and STS pairs evaluated; documents embedded; passes over a data set smaller than 30
steps); the ZeRO stage, batching, pooling and precision stay as shipped. Used by tests/test_recipes.py
(CI) and tests/bench/bench_reliability.py (every recipe)."""

from __future__ import annotations

import contextlib
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


# CI's distill run (tests/test_recipes.py): 12 of the bench's 30 steps on 1,000 of its 2,000 rows (12 steps of
# 2 x 32 rows: 768), past the step it hung at, and 100 of the 1,000 axis-turning steps: about 3 min less. The
# export (a third of the CPU time at the bench's sizes) evaluates three encoders (the starting student, the
# student, the teacher in frame) on 20 queries and 100 abstracts without STS and calibrates each exported
# model on 64 texts; the eval section reads 100 abstracts and 200 STS pairs.
CI_DISTILL = [
    "train.max_steps=12",
    "train.checkpoint_every=4",
    "train.pca_ranking_steps=100",
    "prepare.limit=1000",
    "train.pca_rows=1000",
    "train.int8_calibration_texts=64",
    "train.eval.sts_file=null",
    "train.eval.max_queries=20",
    "train.eval.max_docs=100",
    "eval.max_queries=20",
    "eval.max_docs=100",
    "eval.max_pairs=200",
]


@dataclass
class Started:
    """A recipe's `rayembed run` process, started by `start_recipe`; `finish_recipe` waits for it."""

    name: str
    proc: subprocess.Popen[bytes]
    logs: tuple[Path, Path]
    started: float
    timeout_s: float
    run: Run | None = None


def start_recipe(
    name: str, work: Path, timeout_s: float = 1800, extra: list[str] | None = None, nice: bool = False
) -> Started:
    """`rayembed run jobs/<name>.yaml <overrides>` started with `work` as its folder (the spec's runs/...
    paths land there), in its own session (its Ray processes are killed with it); `nice`: at the lowest
    CPU priority, so that it takes only what other work leaves idle."""
    work.mkdir(parents=True, exist_ok=True)
    fill = {"work": str(work), "corpus300": str(corpus_head(work)) if name == "embed" else ""}
    args = [a.format(**fill) for a in RECIPES[name]] + (extra or [])
    cmd = [*(["nice", "-n", "19"] if nice else []), RAYEMBED, "run", str(JOBS / f"{name}.yaml"), *args]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster
    logs = (work / f"{name}.stdout", work / f"{name}.stderr")
    return Started(name, start_session(cmd, work, env, logs), logs, time.perf_counter(), timeout_s)


def start_session(
    cmd: list[str], cwd: Path, env: dict[str, str], logs: tuple[Path, Path]
) -> subprocess.Popen[bytes]:
    """`cmd` in a session of its own (`kill_session` ends all of it), behind tests/session_guard.py, which
    ends that session if this process is killed first; stdout and stderr into the two `logs` files."""
    guard = [sys.executable, str(ROOT / "tests" / "session_guard.py")]
    with logs[0].open("wb") as out, logs[1].open("wb") as err:  # files: nobody need read a pipe meanwhile
        return subprocess.Popen(
            [*guard, *cmd], cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
        )


def finish_recipe(started: Started) -> Run:
    """Wait for the recipe (killed, with its Ray processes, `timeout_s` after its start: a hang fails, it
    does not stall the caller); its Run (the same one when asked again)."""
    if started.run is None:
        left = started.timeout_s - (time.perf_counter() - started.started)
        try:
            rc, note = started.proc.wait(timeout=max(left, 0.1)), ""
        except subprocess.TimeoutExpired:
            kill_session(started.proc)
            rc, note = -9, f"\n[killed after {started.timeout_s} s]"
        out, err = (p.read_text(errors="replace") for p in started.logs)
        wall = round(time.perf_counter() - started.started, 1)
        started.run = Run(started.name, rc, wall, sections_of(out), (out + "\n" + err + note)[-6000:])
    return started.run


def kill_session(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process started in its own session, and every process of that session (its Ray cluster)."""
    import signal

    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_recipe(name: str, work: Path, timeout_s: float = 1800, extra: list[str] | None = None) -> Run:
    """`rayembed run jobs/<name>.yaml <overrides>` in `work`, to its end or `timeout_s`."""
    return finish_recipe(start_recipe(name, work, timeout_s, extra))


def checkpoints(train: dict[str, Any]) -> list[str]:
    """The checkpoint folders a train section left in its (local) storage, oldest first."""
    folder = Path(train["checkpoint"]).parent
    return sorted(p.name for p in folder.glob("checkpoint_*") if p.is_dir())
