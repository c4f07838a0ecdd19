"""Every shipped recipe CI can afford runs to its end as a user runs it (tests/recipes.py): `rayembed run
jobs/<name>.yaml` in its own process and local Ray cluster, real data, shipped settings, 30 training steps
across at least two checkpoints, exit status 0, under a timeout. jobs/train.yaml (sized for GPUs: minutes a
step on 2 CPU cores) and jobs/mine.yaml (SciFact abstracts at 256 tokens) run in
tests/bench/bench_reliability.py, which records every recipe in docs/results/reliability.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port, record, wait_for
from recipes import JOBS, RAYEMBED, STEPS, Run, checkpoints, run_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the module's recipes (merge soups what smoke trained)."""
    import ray

    ray.shutdown()  # the shared local cluster of other tests: each recipe starts its own
    return tmp_path_factory.mktemp("recipes")


def check_run(run: Run) -> None:
    assert run.exit == 0, f"{run.name}: exit {run.exit}\n{run.log}"
    train = run.sections.get("train")
    steps = STEPS.get(run.name)
    if steps:
        assert train and train["step"] == steps and train["resumed_from"] == 0, run.sections
        assert not train["stalls"] and not train["worker_failures"] and not train["checkpoint_failures"]
        kept = checkpoints(train)
        assert len(kept) >= 2, kept  # two checkpoints passed (keep_checkpoints keeps the last ones)
        report = json.loads(Path(train["report"], "report.json").read_text())
        assert [h["step"] for h in report["history"]] == list(range(1, steps + 1))
    record({"recipes": {run.name: {"exit": run.exit, "steps": train["step"] if train else 0,
                                   "wall_s": run.wall_s}}})  # fmt: skip


@pytest.mark.parametrize("name", ["smoke", "merge", "distill", "llm-lora", "eval", "embed"])
def test_recipe_runs_to_its_end(name: str, recipe_dir: Path) -> None:
    work = recipe_dir / name if name not in ("smoke", "merge") else recipe_dir  # merge soups smoke's model
    run = run_recipe(name, work, timeout_s=1500)
    check_run(run)
    if name == "embed":
        assert run.sections["embed"]["rows"] == 300 and run.sections["embed"]["rejected"] == 0
    if name in ("eval", "distill"):
        scores = run.sections["eval"]["beir"]
        assert all(0 < v["ndcg@10"] <= 1 for k, v in scores.items() if isinstance(v, dict)), scores


def test_serve_recipe_answers_then_stops_cleanly(recipe_dir: Path) -> None:
    """`rayembed serve jobs/serve.yaml` (the bundled model, shipped settings, a free port) answers the
    openai client as Embedder.encode does; SIGTERM stops it with exit status 0 and takes the HAProxy that
    Serve started with it (an orphan kept the port before)."""
    import openai
    import psutil

    from rayembed.model import Embedder, default_model_path

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    proc = subprocess.Popen([RAYEMBED, "serve", str(JOBS / "serve.yaml"), "host=127.0.0.1", f"port={port}"],
                            cwd=recipe_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _healthy(url) or proc.poll() is not None, 300) and proc.poll() is None
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        got = client.embeddings.create(
            model="all-MiniLM-L6-v2", input=["served as shipped"], encoding_format="float"
        )
        local = Embedder.load(default_model_path(), device="cpu").encode(["served as shipped"])
        np.testing.assert_allclose([got.data[0].embedding], local, atol=1e-5)
        [haproxy] = [c.pid for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid]  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        out = proc.stdout.read() if proc.stdout else ""
        assert rc == 0, out[-4000:]
        assert wait_for(lambda: not _alive(haproxy), 30), "HAProxy outlived `rayembed serve`"
    finally:
        if proc.poll() is None:
            proc.kill()
    record(
        {"recipes": {"serve": {"exit": rc, "steps": 0, "wall_s": round(time.perf_counter() - started, 1)}}}
    )


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
