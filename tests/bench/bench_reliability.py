"""Every shipped recipe to its end, every injected fault, the endpoint fuzzed: docs/results/reliability.json.

    .venv/bin/python tests/bench/bench_reliability.py                  # everything (hours on 2 CPU cores)
    .venv/bin/python tests/bench/bench_reliability.py --recipes distill  # some recipes; faults as well
    .venv/bin/python tests/bench/bench_reliability.py --no-faults

Recipes run as tests/recipes.py runs them (`rayembed run jobs/<name>.yaml`, 30 steps, two checkpoints,
overrides for max_steps, checkpoint_every and data sizes only), jobs/train.yaml and jobs/mine.yaml too,
which CI leaves out; `serve` through tests/test_recipes.py's serve test. The faults and the fuzz are the
tests themselves (tests/test_serve_faults.py, test_serve_fuzz.py, test_train_hang.py, test_train_faults.py,
test_embed.py's store fault, test_embed_faults.py), run by pytest with RAYEMBED_FIGURES_DIR set, so the
figures are what those tests measured and asserted. Figures already in the file for recipes not run this
time are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from results import header  # noqa: E402

from recipes import RECIPES, STEPS, checkpoints, run_recipe  # noqa: E402

OUT = ROOT / "docs" / "results" / "reliability.json"
FAULT_TESTS = [
    "tests/test_train_hang.py", "tests/test_train_faults.py", "tests/test_embed_faults.py",
    "tests/test_embed.py::test_embed_to_a_throttling_store_finishes_exactly_once",
    "tests/test_serve_faults.py", "tests/test_serve_fuzz.py",
]  # fmt: skip
SERVE_TEST = "tests/test_recipes.py::test_serve_recipe_answers_then_stops_cleanly"
# `serve.start` and one request while every core runs a busy loop, in a fresh process and Ray cluster;
# `ray_defaults` sets Serve's proxy check timeouts back to Ray's own (5 s ready, 10 s health)
BUSY_START = """
import json, socket, sys, time, urllib.request
import rayembed, ray
from rayembed.config import ServeConfig
from rayembed.serve import run
ray.init(num_cpus=4)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
t = time.perf_counter()
try:
    url = run(ServeConfig(port=port), blocking=False)
    req = urllib.request.Request(url + "/v1/embeddings", data=b'{"input": "a busy node"}',
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        out = {"started": r.status == 200}
except Exception as e:
    out = {"started": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
print(json.dumps(out | {"wall_s": round(time.perf_counter() - t, 1)}))
"""


def recipe_figures(name: str, work: Path) -> dict:
    run = run_recipe(name, work if name in ("smoke", "merge") else work / name, timeout_s=4 * 3600)
    train = run.sections.get("train") or {}
    figures = {"exit": run.exit, "steps": train.get("step", 0), "wall_s": run.wall_s}
    if train:
        figures |= {"checkpoints_kept": len(checkpoints(train)), "stalls": len(train.get("stalls", [])),
                    "worker_failures": len(train.get("worker_failures", []))}  # fmt: skip
    if "embed" in run.sections and name.startswith("embed"):  # what the batch job wrote
        figures |= {k: run.sections["embed"].get(k) for k in ("rows", "chunks", "rejected", "truncated")}
    if run.exit != 0 or (name in STEPS and figures["steps"] != STEPS[name]):
        figures["log_tail"] = run.log[-1500:]
    print(json.dumps({name: figures}), flush=True)
    return figures


def busy_start(ray_defaults: bool) -> dict:
    """BUSY_START's outcome with os.cpu_count() busy loops running beside it."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    env = os.environ | ({"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "5", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "10"}
                        if ray_defaults else {})  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run([sys.executable, "-c", BUSY_START], env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith('{"started"')]
        out = json.loads(lines[-1]) if lines else {"started": False, "error": done.stderr[-300:]}
    except subprocess.TimeoutExpired:
        out = {"started": False, "error": "no answer in 600 s"}
    finally:
        for p in busy:
            p.kill()
    print(json.dumps({"busy_start": out, "ray_defaults": ray_defaults}), flush=True)
    return out


def pytest_figures(targets: list[str]) -> tuple[dict, int]:
    """Run `targets` with RAYEMBED_FIGURES_DIR set; the figures they recorded, merged; pytest's status."""
    with tempfile.TemporaryDirectory() as folder:
        env = os.environ | {"RAYEMBED_FIGURES_DIR": folder}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *targets],
                              cwd=ROOT, env=env)  # fmt: skip
        merged: dict = {}
        for path in sorted(Path(folder).glob("*.json")):
            for key, value in json.loads(path.read_text()).items():
                merged[key] = merged.get(key, {}) | value if isinstance(value, dict) else value
    return merged, done.returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default=",".join([*RECIPES, "serve"]), help="comma-separated (default: all)")
    p.add_argument("--no-faults", action="store_true", help="recipes only")
    args = p.parse_args()
    names = [n for n in args.recipes.split(",") if n]
    old = json.loads(OUT.read_text()) if OUT.is_file() else {}
    result = {"recipes": dict(old.get("recipes", {})), "faults": dict(old.get("faults", {}))}
    result |= {k: old[k] for k in ("fuzz_cases", "fuzz_500s", "fuzz_statuses") if k in old}
    started = time.time()

    def save() -> None:  # after every part: a run cut short keeps what it measured
        result.update(header(), wall_s=round(time.time() - started))
        OUT.write_text(json.dumps(result, indent=1) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("smoke", *[n for n in names if n not in ("smoke", "serve")]):
            if name in names or name == "smoke" and "merge" in names:  # merge soups smoke's model
                result["recipes"][name] = recipe_figures(name, Path(tmp))
                save()
    if not args.no_faults:  # Serve's proxy on a node whose cores are busy: Ray's check timeouts, then ours
        result["faults"]["serve_start_busy_node"] = {
            "ray_defaults": busy_start(True),
            "rayembed": busy_start(False),
        }
        save()
    targets = ([SERVE_TEST] if "serve" in names else []) + ([] if args.no_faults else FAULT_TESTS)
    if targets:
        figures, status = pytest_figures(targets)
        result["recipes"] |= figures.get("recipes", {})
        result["faults"] |= figures.get("faults", {})
        result |= {k: figures[k] for k in ("fuzz_cases", "fuzz_500s", "fuzz_statuses") if k in figures}
        result["pytest_exit"] = status
    save()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
