"""int8 codes on dev collections: the scale the train job calibrates against the plain round(127 x)
(writes docs/results/int8-calibration.json).

    .venv/bin/python tests/bench/bench_int8.py --model /tmp/bench-quality/student3/model \
        --texts /tmp/bench-quality/texts.jsonl [--workdir /tmp/bench-int8]

The model is one the train job exported (so it carries the int8 scales it calibrated on the first 512
texts of its training text; bench_quality.py trains such students). Scored on the **dev** collections of
tests/bench/distill_sweep.py (SNLI-dev retrieval, SciFact *train* queries), never on the test
collections bench_quality.py reports, at full width and 128-d, each variant as nDCG@10 over float32:

- `scale_127`: round(127 x) of the unit vector (an uncalibrated model's codes);
- `calibrated`: round(s x), s = the model's calibrated scale for the width (what embed/serve/eval write);
- `per_axis`: one scale per axis (127 / the axis' largest |x| over `--rows` texts of `--texts`, as
  sentence-transformers' calibrated int8 does), the codes scored as they are — the baseline for why
  rayembed keeps one scale for all axes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from distill_sweep import dev_sets
from results import header

from rayembed.data.readers import load_beir
from rayembed.eval.job import subset
from rayembed.eval.metrics import comparable, retrieval_metrics
from rayembed.model import Embedder, postprocess
from rayembed.model.vectors import unit

OUT = Path(__file__).resolve().parents[2] / "docs" / "results" / "int8-calibration.json"


def per_axis_codes(x: np.ndarray, top: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * (127.0 / np.maximum(top, 1e-6))), -127, 127)


def variants(model: Embedder, q: np.ndarray, d: np.ndarray, top: dict[int, np.ndarray], dim: int) -> dict:
    """(query codes, document codes) per variant at width `dim`."""
    cut = [unit(x[:, :dim]) for x in (q, d)]
    return {
        "float32": cut,
        "scale_127": [postprocess(x, precision="int8") for x in cut],
        "calibrated": [postprocess(x, precision="int8", int8_scales=model.int8_scales) for x in cut],
        "per_axis": [per_axis_codes(x, top[dim]) for x in cut],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a model folder the train job exported")
    ap.add_argument("--texts", required=True, help="JSONL with a `text` column: per_axis calibration texts")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--workdir", default="/tmp/bench-int8")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    model = Embedder.load(args.model, device="cpu")
    assert model.int8_scales, f"{args.model} has no calibrated int8 scales (int8_scales.json)"
    with open(args.texts) as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(args.rows), f, strict=False)]
    calib = model.encode(texts)
    top = {dim: np.abs(unit(calib[:, :dim])).max(0) for dim in (model.dim, 128)}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, cfg in dev_sets(Path(args.workdir)).items():
        corpus, queries, qrels = load_beir(str(cfg.beir_dir), cfg.split)
        corpus, queries = subset(corpus, queries, qrels, cfg.max_queries, cfg.max_docs)
        qids, dids = list(queries), list(corpus)
        q, d = (model.encode([src[i] for i in ids]) for src, ids in ((queries, qids), (corpus, dids)))
        for dim in (model.dim, 128):
            scored = {
                k: retrieval_metrics(comparable(a, "int8"), comparable(b, "int8"), qids, dids, qrels)[
                    "ndcg@10"
                ]
                for k, (a, b) in variants(model, q, d, top, dim).items()
            }
            results.setdefault(name, {})[str(dim)] = {"float32_ndcg@10": round(scored["float32"], 4)} | {
                f"{k}_vs_float32": round(v / scored["float32"], 4)
                for k, v in scored.items()
                if k != "float32"
            }
            print(name, dim, results[name][str(dim)], flush=True)
    out = {
        **header(),
        "model": args.model,
        "int8_scales": {str(k): v for k, v in model.int8_scales.items()},
        "collections": "dev only: snli_dev = SNLI-dev retrieval (1,000 queries), scifact_train = SciFact train queries",
        "results": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
