"""How much of this CPU's fp32 matrix-multiply rate the model's forward already uses (prints JSON).

    .venv/bin/python tests/bench/bench_cpu_ceiling.py [--threads 2]

For batches of 32 rows at several lengths: the rate (GFLOP/s) of one layer's bare GEMMs of the model's
own shapes (q, k, v, o: 384x384; FFN: 384x1536 and back), and the rate of the whole all-MiniLM-L6-v2
forward counting its GEMM and attention FLOPs. Their ratio bounds what any engine could gain over another
that runs the same fp32 forward: removing every non-GEMM cost would give at most 1 / ratio. This is the
ceiling behind issue 3's CPU numbers (docs/benchmarks.md): `rayembed embed` and sentence-transformers run
the same forward, so at equal precision the pipeline can only win what padding and overhead it saves.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from rayembed.model import Embedder

HIDDEN, FFN, LAYERS = 384, 1536, 6


def gflops(fn: Callable[[], object], flops: float, reps: int) -> tuple[float, float]:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    seconds = (time.perf_counter() - start) / reps
    return flops / seconds / 1e9, seconds


def layer_gemms(x: torch.Tensor, w_attn: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> None:
    """One transformer layer's matrix multiplies: q, k, v, o projections, then the FFN."""
    for _ in range(4):
        F.linear(x, w_attn)
    F.linear(F.linear(x, w_up), w_down)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 256])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = Embedder.load("default", device="cpu").eval()
    out: dict[str, object] = {"threads": args.threads, "batch_rows": 32}
    for length in args.lengths:
        tokens = 32 * length
        weights = (torch.randn(HIDDEN, HIDDEN), torch.randn(FFN, HIDDEN), torch.randn(HIDDEN, FFN))
        linear_flops = 2 * tokens * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN)
        gemm_rate, _ = gflops(partial(layer_gemms, torch.randn(tokens, HIDDEN), *weights), linear_flops, 5)
        ids = torch.randint(1000, 20000, (32, length))
        mask = torch.ones(32, length, dtype=torch.long)
        attention_flops = 2 * 2 * 32 * length * length * HIDDEN  # QK^T and AV over all heads
        with torch.inference_mode():
            model_rate, seconds = gflops(
                partial(model, ids, mask), LAYERS * (linear_flops + attention_flops), 3
            )
        out[f"32x{length}"] = {
            "gemm_gflops": round(gemm_rate, 1),
            "forward_gflops": round(model_rate, 1),
            "forward_vs_gemm": round(model_rate / gemm_rate, 3),
            "most_any_engine_could_gain": round(gemm_rate / model_rate, 2),
            "forward_s": round(seconds, 3),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
