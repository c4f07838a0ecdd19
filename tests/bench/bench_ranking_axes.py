"""Seconds per step of `ranking_axes` (`train.pca_ranking_steps`) as the embedding widens
(writes docs/results/ranking-axes.json).

    .venv/bin/python tests/bench/bench_ranking_axes.py [--steps 2]

Each step runs matrix_exp of a [k, k] matrix, forward and backward, where k = min(width, 2 x the widest
prefix): the prefixes' widths decide what a step costs. Random unit vectors (the cost does not depend on
the values), batch 1,024 as the train job uses; the fit's one-off eigendecomposition is timed apart.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from results import header

from rayembed.model.pca import principal_axes, ranking_axes

OUT = Path(__file__).resolve().parents[2] / "docs" / "results" / "ranking-axes.json"
CASES = [  # (width, prefix widths): MiniLM's recipe, then LLM-embedder widths with narrow and wide prefixes
    (384, [256, 128, 64]),
    (1024, [512, 256, 128]),
    (1024, [256, 128]),
    (2560, [1280]),
    (2560, [256, 128]),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    g = np.random.default_rng(0)
    warm = g.normal(size=(64, 32)).astype(np.float32)
    ranking_axes(warm / np.linalg.norm(warm, axis=1, keepdims=True), [8], steps=2)  # torch import, threads
    rows = []
    for width, dims in CASES:
        x = g.normal(size=(2048, width)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        t0 = time.perf_counter()
        principal_axes(x)
        eig = time.perf_counter() - t0
        t0 = time.perf_counter()
        ranking_axes(x, dims, steps=args.steps)
        per_step = (time.perf_counter() - t0 - eig) / args.steps
        k = min(width, 2 * max(dims))
        rows.append({"width": width, "dims": dims, "k": k, "s_per_step": round(per_step, 3),
                     "eigh_s": round(eig, 2), "hours_for_1000_steps": round(per_step * 1000 / 3600, 2)})  # fmt: skip
        print(rows[-1], flush=True)
    result = {
        **header(),
        "cases": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
