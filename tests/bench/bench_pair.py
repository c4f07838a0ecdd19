"""The index-compatible pair a distillation exports (train/pair.py), measured as a user has it after
`rayembed run jobs/distill.yaml`: what its queries keep of the teacher's retrieval quality, and what a query
costs at the endpoint through the student against through the teacher (docs/results/pair.json).

    .venv/bin/python tests/bench/bench_pair.py --run runs/distill [--requests 200]

1. Quality, on SciFact test (300 queries, all 5,183 abstracts; no text of it in jobs/distill.yaml's
   training mix: an unseen collection): nDCG@10 of the teacher, of the student alone (symmetric) and of the
   student's queries against the teacher-in-frame's documents (asymmetric, the pair), at full width and
   128-d, float32 and int8; `student_vs_teacher` and `asym_vs_teacher` are the ratios at full width.
2. Latency: one endpoint (local Ray Serve, 1 replica, 1 CPU) serving the pair behind one name; single-query
   requests alternate `input_type: query` (the student) and `input_type: document` (the teacher in frame:
   the teacher's own network, what a teacher-only endpoint would run for a query), so drift of the machine
   falls on both; p50/p95 client-side latency of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from results import header  # noqa: E402

from conftest import DATA, free_port  # noqa: E402

OUT = ROOT / "docs" / "results" / "pair.json"


def quality(student: Path, documents: Path) -> dict[str, object]:
    from rayembed.eval.config import EvalConfig
    from rayembed.eval.job import evaluate

    common = {
        "beir_dir": str(DATA / "scifact"),
        "sts_file": None,
        "dims": [128],
        "precisions": ["float32", "int8"],
    }
    teacher = evaluate(EvalConfig(model="default", **common))["beir"]
    pair = evaluate(EvalConfig(model=str(student), document_model=str(documents), **common))
    out: dict[str, object] = {"collection": "scifact test (300 queries, 5,183 documents): unseen in training"}
    for name, report in (("teacher", teacher), ("student", pair["beir"]), ("pair", pair["beir_pair"])):
        out[name] = {k: round(v["ndcg@10"], 4) for k, v in report.items() if isinstance(v, dict)}
    full = str(max(int(k) for k in out["teacher"] if k.isdigit()))  # type: ignore[union-attr]
    for key, name in (("student_vs_teacher", "student"), ("asym_vs_teacher", "pair")):
        out[key] = round(out[name][full] / out["teacher"][full], 4)  # type: ignore[index]
    return out


def latency(student: Path, documents: Path, requests: int) -> dict[str, object]:
    import ray
    from ray import serve

    from rayembed.config import ServeConfig
    from rayembed.serve import run

    queries = [json.loads(x)["text"] for x in (DATA / "scifact" / "queries.jsonl").read_text().splitlines()]
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    cfg = ServeConfig(model=str(student), document_model=str(documents), model_name="pair", port=free_port(),
                      min_replicas=1, max_replicas=1, num_cpus=1, torch_threads=1)  # fmt: skip
    url = run(cfg, blocking=False)
    took: dict[str, list[float]] = {"query": [], "document": []}
    try:
        for i in range(requests + 20):  # the first 10 of each warm up
            for kind in ("query", "document") if i % 2 else ("document", "query"):
                body = json.dumps({"input": queries[i % len(queries)], "input_type": kind, "model": "pair"})
                req = urllib.request.Request(
                    f"{url}/v1/embeddings", body.encode(), {"Content-Type": "application/json"}
                )
                t = time.perf_counter()
                with urllib.request.urlopen(req, timeout=60) as r:
                    r.read()
                if i >= 20:
                    took[kind].append((time.perf_counter() - t) * 1000)
    finally:
        serve.shutdown()
        ray.shutdown()
    out: dict[str, object] = {"requests_each": requests, "replica": "1 replica, 1 CPU, 1 torch thread"}
    for kind, name in (("query", "student_ms"), ("document", "teacher_ms")):
        out[name] = {"p50": round(float(np.percentile(took[kind], 50)), 2),
                     "p95": round(float(np.percentile(took[kind], 95)), 2)}  # fmt: skip
    out["teacher_vs_student_p50"] = round(out["teacher_ms"]["p50"] / out["student_ms"]["p50"], 2)  # type: ignore[index]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default="runs/distill", help="a jobs/distill.yaml output_dir")
    p.add_argument("--requests", type=int, default=200)
    a = p.parse_args()
    run_dir = Path(a.run).resolve()
    student, documents = run_dir / "model", run_dir / "teacher-in-frame"
    result = {
        **header("pair"), "gpu": "not measured", "student": json.loads((student / "rayembed.json").read_text()),
        "quality": quality(student, documents), "latency": latency(student, documents, a.requests),
    }  # fmt: skip
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
