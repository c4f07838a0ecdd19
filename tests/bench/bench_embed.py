"""Batch-embedding throughput on one machine, in one run (not a timed test; prints JSON).

    .venv/bin/python tests/bench/bench_embed.py [--scifact 2000] [--snli 4000] [--batch-size 32]
    python tests/bench/bench_embed.py --device cuda --batch-size 128 --scifact 5183 --snli 9842 --repeat 8


(a) the `rayembed embed` pipeline end to end (local Ray already up; includes actor start, model load,
    reading JSONL, writing and committing Parquet), (b) a bare loop calling `Embedder.encode` on the same
    texts in the same chunks, (c) `SentenceTransformer.encode` with the same model and batch size.
Corpus: SciFact documents (title + abstract, long) mixed with SNLI sentences (short).
On a GPU all three run the model in `--gpu-dtype` (float16 by default, as the pipeline's GPU actors do), on
CPU in `--cpu-dtype` (float32 by default; with bfloat16, sentence-transformers in float32 is timed too).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from rayembed.config import SHARED_DATA, EmbedConfig
from rayembed.data.readers import read_jsonl
from rayembed.model import Embedder, resolve_model_path


def corpus(n_scifact: int, n_snli: int, repeat: int = 1) -> list[dict[str, str]]:
    docs = read_jsonl(Path(SHARED_DATA) / "scifact" / "corpus.jsonl")
    rows = [
        {"id": f"d{d['_id']}", "text": f"{d['title']} {d['text']}".strip()}
        for _, d in zip(range(n_scifact), docs, strict=False)
    ]
    lines = (Path(SHARED_DATA) / "snli-esnli" / "s2.dev").read_text().splitlines()
    rows += [{"id": f"s{i}", "text": t} for i, t in enumerate(lines[:n_snli]) if t.strip()]
    rows = [{"id": f"{r['id']}-{k}", "text": r["text"]} for k in range(repeat) for r in rows]
    rng = np.random.default_rng(0)
    return [rows[i] for i in rng.permutation(len(rows))]  # lengths mixed throughout, as in a real lake


PEAK_DENSE_16BIT = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12}
"""Dense fp16/bf16 tensor-core peak FLOP/s by device name (NVIDIA data sheets; first match wins)."""


def flops_per_token(model: Embedder, mean_len: float) -> float:
    """Forward FLOPs per token: 2 x the parameters outside the embedding tables (their GEMMs) plus
    attention's scores and weighted sums, 4 x layers x hidden x the mean sequence length."""
    cfg = model.backbone.config
    weights = sum(p.numel() for n, p in model.backbone.named_parameters() if "embeddings" not in n)
    return 2 * weights + 4 * cfg.num_hidden_layers * cfg.hidden_size * mean_len


def mfu(model: Embedder, device_name: str, tokens: int, docs: int, seconds: float) -> dict[str, Any]:
    """tokens/s and model FLOPs utilisation (forward FLOPs x tokens/s / the device's dense 16-bit peak)."""
    peak = next((v for k, v in PEAK_DENSE_16BIT.items() if k in device_name), None)
    rate = tokens / seconds
    used = flops_per_token(model, tokens / docs) * rate
    return {"tokens_per_s": round(rate), "model_tflops": round(used / 1e12, 2),
            "mfu": round(used / peak, 4) if peak else None}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scifact", type=int, default=2000)
    ap.add_argument("--snli", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--repeat", type=int, default=1, help="corpus copies (a GPU needs more work to amortize start-up)"
    )
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--threads-per-actor", type=int, default=None, help="default: the job's own choice")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--gpu-dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    ap.add_argument("--cpu-dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()

    import ray
    import torch
    from sentence_transformers import SentenceTransformer

    from rayembed.embed import embed

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = getattr(torch, args.gpu_dtype if device == "cuda" else args.cpu_dtype)
    rows = corpus(args.scifact, args.snli, args.repeat)
    texts = [r["text"] for r in rows]
    cfg_kw: dict[str, Any] = {
        "batch_size": args.batch_size,
        "threads_per_actor": args.threads_per_actor,
        "use_gpu": device == "cuda",
        "gpu_dtype": args.gpu_dtype,
        "cpu_dtype": args.cpu_dtype,
    }
    chunk = EmbedConfig(input="x", output="y").chunk_rows
    results: dict[str, object] = {
        "docs": len(texts),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": args.batch_size,
    }

    with tempfile.TemporaryDirectory() as tmp:
        lake = Path(tmp) / "lake"
        lake.mkdir()
        per = -(-len(rows) // args.files)
        for f in range(args.files):
            (lake / f"part-{f}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows[f * per : (f + 1) * per])
            )
        ray.init(
            num_cpus=os.cpu_count(),
            num_gpus=int(device == "cuda"),
            include_dashboard=False,
            log_to_driver=False,
        )
        t = time.perf_counter()
        summary = embed(EmbedConfig(input=str(lake), output=f"{tmp}/out", progress=False, **cfg_kw))
        a = time.perf_counter() - t
        ray.shutdown()
        assert summary["rows"] == len(texts), summary
        results["pipeline"] = {
            **summary["plan"],
            "seconds": round(a, 2),
            "docs_per_s": round(len(texts) / a, 1),
            "padding_ratio": summary["padding_ratio"],
            "tokens": summary["tokens"],
        }

    model = Embedder.load("default", device=device, dtype=dtype)
    if device == "cuda":  # as the pipeline's GPU actor does (rayembed.embed.job.plan_for)
        model.tokenize_threads = args.threads_per_actor or min(8, os.cpu_count() or 1)
    results["encode_loop_tokenize_threads"] = model.tokenize_threads
    t = time.perf_counter()
    mine = np.concatenate(
        [
            model.encode(
                texts[i : i + chunk],
                batch_size=args.batch_size,
                max_tokens=EmbedConfig(input="x", output="y").max_tokens,
            )
            for i in range(0, len(texts), chunk)
        ]
    )
    b = time.perf_counter() - t
    results["encode_loop"] = {"seconds": round(b, 2), "docs_per_s": round(len(texts) / b, 1)}

    st = SentenceTransformer(str(resolve_model_path("default")), device=device).to(dtype)
    t = time.perf_counter()
    theirs = st.encode(texts, batch_size=args.batch_size)
    c = time.perf_counter() - t
    results["sentence_transformers"] = {"seconds": round(c, 2), "docs_per_s": round(len(texts) / c, 1)}

    if dtype != torch.float32:  # also what sentence-transformers gives out of the box (float32)
        st = SentenceTransformer(str(resolve_model_path("default")), device=device)
        t = time.perf_counter()
        st.encode(texts, batch_size=args.batch_size)
        c32 = time.perf_counter() - t
        results["sentence_transformers_float32"] = {
            "seconds": round(c32, 2),
            "docs_per_s": round(len(texts) / c32, 1),
        }
        results["ratio_pipeline_vs_sentence_transformers_float32"] = round(c32 / a, 3)
    pipeline = results["pipeline"]
    assert isinstance(pipeline, dict)
    results["pipeline"] = pipeline | mfu(model, str(results["device"]), pipeline["tokens"], len(texts), a)
    results["max_abs_diff_vs_st"] = float(np.abs(mine - theirs).max())
    results["ratio_pipeline_vs_encode_loop"] = round(b / a, 3)
    results["ratio_pipeline_vs_sentence_transformers"] = round(c / a, 3)
    results["ratio_encode_loop_vs_sentence_transformers"] = round(c / b, 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
