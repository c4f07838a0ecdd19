"""Load test of the endpoint vs a plain FastAPI + sentence-transformers server (not a timed test; prints JSON).

    .venv/bin/python tests/bench/bench_serve.py [--requests 200] [--concurrency 1 8 32 64]

Both servers run the bundled all-MiniLM-L6-v2 on this machine's CPUs, on loopback. rayembed's ingress is
HAProxy (set by `import rayembed`); `RAY_SERVE_ENABLE_HA_PROXY=0 python tests/bench/bench_serve.py`
measures it behind Serve's Python proxy instead.
A bounded asyncio client (aiohttp) sends a fixed number of requests at each concurrency; each request
carries 1-4 real SNLI sentences. Both servers stay up and every level alternates between them for
`--rounds` rounds (this VM's speed drifts between minutes); reported per level: median req/s, inputs/s,
p50/p99 latency (ms), errors by status summed over rounds.
A last run at 2x the highest concurrency against rayembed with small queue bounds checks that overload
only ever answers 429/503. Then the cold start of a model scaled to zero: the first request after its
last replica went, timed (`--cold-starts` times). Figures go to docs/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from results import header

from rayembed.config import SHARED_DATA


def payloads(n: int) -> list[bytes]:
    lines = [s for s in (Path(SHARED_DATA) / "snli-esnli" / "s2.dev").read_text().splitlines() if s.strip()]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 5))
        out.append(
            json.dumps(
                {
                    "input": [lines[int(i)] for i in rng.integers(0, len(lines), k)],
                    "model": "all-MiniLM-L6-v2",
                }
            ).encode()
        )
    return out


async def load(url: str, bodies: list[bytes], concurrency: int) -> dict[str, object]:
    import aiohttp

    latencies: list[float] = []
    codes: dict[int, int] = {}
    inputs = 0
    queue = list(bodies)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal inputs
        while queue:
            body = queue.pop()
            t = time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                codes[r.status] = codes.get(r.status, 0) + 1
                if r.status == 200:
                    latencies.append(time.perf_counter() - t)
                    inputs += len(json.loads(body)["input"])

    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "concurrency": concurrency,
        "req_per_s": round(len(latencies) / wall, 1),
        "inputs_per_s": round(inputs / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "errors": {str(k): v for k, v in codes.items() if k != 200},
    }


def wait_up(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(url)


BASELINE = """
import sys
import uvicorn
from fastapi import FastAPI, Request
from sentence_transformers import SentenceTransformer
from rayembed.model import resolve_model_path
model = SentenceTransformer(str(resolve_model_path("default")), device="cpu")
app = FastAPI()
@app.get("/healthz")
def health(): return {"status": "ok"}
@app.post("/v1/embeddings")
async def embeddings(request: Request):
    body = await request.json()
    texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
    vecs = model.encode(texts, batch_size=32)
    return {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)]}
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error")
"""


def median_run(runs: list[dict[str, object]]) -> dict[str, object]:
    """One level's result over rounds: median req/s, inputs/s, p50 and p99 (each its own median), errors summed."""
    out: dict[str, object] = {"concurrency": runs[0]["concurrency"], "rounds": len(runs)}
    for key in ("req_per_s", "inputs_per_s", "p50_ms", "p99_ms"):
        out[key] = round(float(np.median([r[key] for r in runs])), 1)  # type: ignore[misc]
    errors: dict[str, int] = {}
    for r in runs:
        for code, n in r["errors"].items():  # type: ignore[attr-defined]
            errors[code] = errors.get(code, 0) + n
    out["errors"] = errors
    out["req_per_s_each_round"] = [r["req_per_s"] for r in runs]
    return out


def cold_starts(times: int, threads: int) -> list[float]:
    """Seconds the first request takes after a model scaled to zero (min_replicas 0) lost its last replica."""
    from ray import serve

    from rayembed.serve.config import ServeConfig
    from rayembed.serve.deployment import run

    cfg = ServeConfig(port=8414, min_replicas=0, max_replicas=1, torch_threads=threads, upscale_delay_s=0,
                      downscale_delay_s=1, downscale_to_zero_delay_s=1, look_back_period_s=11)  # fmt: skip
    url = run(cfg, blocking=False) + "/v1/embeddings"
    body = json.dumps({"input": ["cold start"]}).encode()

    def post() -> None:
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=300).read()

    def running() -> int:
        deployments = serve.status().applications["rayembed"].deployments
        return int(
            next(d for n, d in deployments.items() if n.startswith("Model0")).replica_states.get("RUNNING", 0)
        )

    out = []
    for _ in range(times):
        post()  # the model is up; now wait for it to go
        deadline = time.time() + 300
        while running() and time.time() < deadline:
            time.sleep(0.5)
        start = time.perf_counter()
        post()
        out.append(round(time.perf_counter() - start, 2))
    serve.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--rounds", type=int, default=3, help="each level alternates the two servers this often")
    ap.add_argument(
        "--torch-threads", type=int, default=None, help="replica torch threads (default: all CPUs)"
    )
    ap.add_argument("--batch-wait-s", type=float, default=0.005)
    ap.add_argument("--cold-starts", type=int, default=3, help="scale-to-zero cold starts to time (0: none)")
    ap.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[2] / "docs" / "results" / "serve.json")
    )
    args = ap.parse_args()
    bodies = payloads(args.requests)
    ingress = "haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "serve-proxy"
    report: dict[str, object] = {
        "cpus": os.cpu_count(),
        "requests_per_level": args.requests,
        "ingress": ingress,
    }

    import ray
    from ray import serve

    from rayembed.serve.config import ServeConfig
    from rayembed.serve.deployment import run

    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    threads = args.torch_threads or os.cpu_count() or 1
    cfg = ServeConfig(
        port=8411, min_replicas=1, max_replicas=1, torch_threads=threads, max_ongoing_requests=256,
        max_queued_requests=-1, batch_wait_timeout_s=args.batch_wait_s,
    )  # fmt: skip
    ours = run(cfg, blocking=False) + "/v1/embeddings"
    wait_up(ours.replace("/v1/embeddings", "/healthz"))
    proc = subprocess.Popen([sys.executable, "-c", BASELINE, "8413"])
    theirs = "http://127.0.0.1:8413/v1/embeddings"
    runs: dict[str, dict[int, list[dict[str, object]]]] = {"rayembed": {}, "baseline": {}}
    try:
        wait_up("http://127.0.0.1:8413/healthz")
        for url in (ours, theirs):
            asyncio.run(load(url, bodies[:16], 4))  # warm-up
        # Both servers stay up; each level runs one after the other, round after round, so drifts in
        # this shared VM's speed hit both alike.
        for _ in range(args.rounds):
            for c in args.concurrency:
                for name, url in (("rayembed", ours), ("baseline", theirs)):
                    runs[name].setdefault(c, []).append(asyncio.run(load(url, bodies, c)))
    finally:
        proc.terminate()
        proc.wait()
    serve.shutdown()
    report["rayembed"] = [median_run(runs["rayembed"][c]) for c in args.concurrency]
    report["fastapi_sentence_transformers"] = [median_run(runs["baseline"][c]) for c in args.concurrency]
    # Overload: small bounds, 2x the highest concurrency; only 429/503 may appear as errors.
    tight = ServeConfig(
        port=8412, min_replicas=1, max_replicas=1, torch_threads=threads, max_ongoing_requests=8,
        max_queued_requests=8, max_queued_inputs=2048,
    )  # fmt: skip
    base = run(tight, blocking=False)
    wait_up(f"{base}/healthz")
    report["rayembed_overload"] = asyncio.run(
        load(f"{base}/v1/embeddings", bodies, 2 * max(args.concurrency))
    )
    serve.shutdown()
    report["cold_start_s"] = cold_starts(args.cold_starts, threads) if args.cold_starts else []
    ray.shutdown()
    report["throughput_ratio"] = {
        str(c): round(float(np.median([r["req_per_s"] for r in runs["rayembed"][c]]))
                      / float(np.median([r["req_per_s"] for r in runs["baseline"][c]])), 2)  # type: ignore[misc]
        for c in args.concurrency
    }  # fmt: skip
    if 1 in args.concurrency:  # rayembed's median p50 over the baseline's, at concurrency 1
        p50 = [float(np.median([r["p50_ms"] for r in runs[n][1]])) for n in ("rayembed", "baseline")]  # type: ignore[misc]
        report["p50_ratio_c1"] = round(p50[0] / p50[1], 3)
    report |= header("serve")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
