"""Shipped recipes run to their end as a user runs them (tests/recipes.py): `rayembed run jobs/<name>.yaml`
in its own process and local Ray cluster, real data, shipped settings, 30 training steps across at least two
checkpoints (12 for distill in CI), exit status 0, under a timeout. CI affords two on 2 cores: distill (the
one that hung) and serve. All of them, jobs/train.yaml (sized for GPUs: over 15 min a step on 2 CPU cores) and jobs/mine.yaml
included, run in tests/bench/bench_reliability.py, which records them in docs/results/reliability.json
(the 2-core VM took 7 min for distill, 4 for llm-lora, 3.6 for smoke; 18 min for the seven CI-sized runs)."""

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

from conftest import background_recipes, free_port, record, wait_for
from recipes import CI_DISTILL, JOBS, RAYEMBED, STEPS, Run, checkpoints, finish_recipe, start_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the module's recipes (merge soups what smoke trained)."""
    import ray

    ray.shutdown()  # the shared local cluster of other tests: each recipe starts its own
    return tmp_path_factory.mktemp("recipes")


def check_run(run: Run, steps: int | None = None) -> None:
    assert run.exit == 0, f"{run.name}: exit {run.exit}\n{run.log}"
    train = run.sections.get("train")
    steps = steps or STEPS.get(run.name)
    if steps:
        assert train and train["step"] == steps and train["resumed_from"] == 0, run.sections
        assert not train["stalls"] and not train["worker_failures"] and not train["checkpoint_failures"]
        kept = checkpoints(train)
        assert len(kept) >= 2, kept  # two checkpoints passed (keep_checkpoints keeps the last ones)
        report = json.loads(Path(train["report"], "report.json").read_text())
        assert [h["step"] for h in report["history"]] == list(range(1, steps + 1))
    record({"recipes": {run.name: {"exit": run.exit, "steps": train["step"] if train else 0,
                                   "wall_s": run.wall_s}}})  # fmt: skip


def test_distill_recipe_runs_to_its_end(recipe_dir: Path, request: pytest.FixtureRequest) -> None:
    """jobs/distill.yaml (ZeRO-3, length-sorted forward passes: the recipe that hung at step ~11 when each
    worker planned its passes alone), 12 steps across 3 checkpoints, then its eval section, at CI's sizes
    (recipes.CI_DISTILL). Started with the session when other tests share it (conftest.py,
    start_background_recipes); here otherwise. tests/test_train_hang.py makes the ranks' plans differ step
    by step."""
    started = background_recipes(request.config).get("distill")
    if started is None:
        started = start_recipe("distill", recipe_dir / "distill", timeout_s=1800, extra=CI_DISTILL)
    run = finish_recipe(started)
    check_run(run, steps=12)
    pair = run.sections["train"]["pair"]  # the teacher exported in the student's frame, roles marked
    own = [
        json.loads(Path(p, "rayembed.json").read_text())
        for p in (run.sections["train"]["output_dir"], pair["document_model"])
    ]
    assert [o["frame"] for o in own] == [pair["frame"]] * 2 and [o["role"] for o in own] == [
        "query",
        "document",
    ]
    report = Path(run.sections["train"]["report"])
    doc = json.loads((report / "report.json").read_text())
    assert doc["run"]["pca_fit"] == {"rows": 1000}  # no prepare.corpus: the axes of all the rows read
    after = doc["eval"]["after"]
    assert (
        0 < after["beir_pair"]["384"]["ndcg@10"] <= 1
    )  # the student's queries against the teacher's documents
    kept = after["beir_retention"]  # the student alone and the pair as shares of the teacher's nDCG@10
    assert kept["teacher_ndcg@10"] == after["beir_documents"]["384"]["ndcg@10"] > 0
    assert kept["asym_vs_teacher"] == after["beir_pair"]["384"]["ndcg@10"] / kept["teacher_ndcg@10"]
    assert f"the pair {kept['asym_vs_teacher']:.1%}" in (report / "report.md").read_text()
    scores = run.sections["eval"]["beir"]
    assert all(0 < v["ndcg@10"] <= 1 for v in scores.values() if isinstance(v, dict)), scores
    sts = run.sections["eval"]["sts"]
    assert sts["pairs"] == 200 and sts["384"]["spearman"] > 0.5


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
