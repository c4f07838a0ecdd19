"""What a Ray worker process pays to import what it runs: the light modules a Ray Data read task or a
config parser needs (`rayembed.data.flagembedding`, `rayembed.train.order`, `rayembed.config`) against the
model (`rayembed.model.embedder`: torch + transformers), which `import rayembed` pulled in for every one of
them until 2026-12-03; and the model's import with CPython's default collector thresholds against the
young generation `import rayembed` sets (2026-12-06); writes docs/results/worker-imports.json.

    .venv/bin/python tests/bench/bench_worker_imports.py [--repeats 5]

Each figure: a fresh `python -c "import ..."` (after `import ray`, which every Ray worker has), its CPU
seconds (user + sys, from the OS) and peak RSS, median of `--repeats`, the variants interleaved.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

from results import header

OUT = Path(__file__).resolve().parents[2] / "docs" / "results" / "worker-imports.json"
VARIANTS = {
    "ray only": "import ray",
    "light (read task / config)": "import ray, rayembed.data.flagembedding, rayembed.train.order, rayembed.config",
    "with the model (torch + transformers)": "import ray, rayembed.model.embedder",
    # the same with CPython's default collector, as before `import rayembed` raised its young generation
    "with the model, default gc thresholds": "import gc, ray, rayembed; gc.set_threshold(700, 10, 10); "
    "import rayembed.model.embedder",
}


def cost(code: str) -> tuple[float, float]:
    """CPU seconds and peak RSS (MB) of one fresh interpreter running `code`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, after.ru_maxrss / 1024  # ru_maxrss of children: the largest so far, KB on Linux


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    rss: dict[str, float] = {}
    for name, code in VARIANTS.items():  # RSS: each variant alone in a child of its own, once
        probe = f"{code}\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        done = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
        rss[name] = int(done.stdout.split()[-1]) / 1024
    for _ in range(args.repeats):
        for name, code in VARIANTS.items():
            runs[name].append(cost(code)[0])
    cpu = {name: statistics.median(v) for name, v in runs.items()}
    light, heavy = cpu["light (read task / config)"], cpu["with the model (torch + transformers)"]
    result = {
        **header(),
        "repeats": args.repeats,
        "cpu_s_median": {k: round(v, 3) for k, v in cpu.items()},
        "cpu_s_runs": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "peak_rss_mb": {k: round(v) for k, v in rss.items()},
        "model_import_cpu_s_saved_per_process": round(heavy - light, 3),
        "light_vs_model_cpu": round(light / heavy, 3),
        "gc_threshold_cpu_s_saved_per_process": round(
            cpu["with the model, default gc thresholds"] - heavy, 3
        ),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
