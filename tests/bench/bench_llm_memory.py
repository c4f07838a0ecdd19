"""Peak memory per training worker of a >= 300M-parameter decoder: DDP vs ZeRO-2 vs ZeRO-3, full
fine-tuning vs LoRA, each next to the bytes per parameter the theory predicts.

Each point is a real `rayembed train` run on its own fresh local Ray cluster: a random-weight decoder
of a real shape (default Qwen2-0.5B's layers with a 32k vocabulary, 387M parameters, bf16 on disk as
real checkpoints are; the full 0.5B shape's data-parallel point does not fit two workers in this 24 GiB
VM), 2 CPU workers (gloo), SNLI triples, a few steps. `peak_mem_mb` is rank 0's peak RSS and `base_mem_mb` its RSS before the model was built (Python,
torch, Ray), so `peak - base` is what the model, gradients, optimizer and activations took.

Theory (AdamW; N workers; P parameters; T of them trained):
  bf16 full fine-tuning: bf16 weights 2P + bf16 grads 2P + fp32 master 4P + Adam 8P = 16P bytes,
    of which ZeRO-2 shards grads, master and Adam (2P + 14P/N) and ZeRO-3 everything (16P/N);
  fp32: weights 4P + grads 4P + Adam 8P (ZeRO-2: 4P + 12P/N; ZeRO-3: 16P/N);
  LoRA: the frozen base's weights (2P bf16 / 4P fp32, ZeRO-3: / N) plus 16 bytes per trained weight.

    .venv/bin/python tests/bench/bench_llm_memory.py            # writes docs/results/llm-memory.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from results import header

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [  # (name, zero stage, lora)
    ("ddp-full", 0, False), ("zero2-full", 2, False), ("zero3-full", 3, False),
    ("zero2-lora", 2, True), ("zero3-lora", 3, True),
]  # fmt: skip


def theory_bytes(stage: int, lora: bool, precision: str, params: int, trained: int, workers: int) -> float:
    """Bytes per worker the model, its gradients and optimizer take (no activations, no runtime)."""
    w = 2 if precision == "bf16" else 4
    if lora:
        return w * params / (workers if stage == 3 else 1) + 16 * trained / (workers if stage >= 1 else 1)
    rest = 16 - w  # grads (+ fp32 master for bf16) + Adam, per parameter
    if stage == 0:
        return 16.0 * params
    if stage in (1, 2):
        grads = w if stage == 1 else 0
        return (w + grads) * params + (rest - grads) * params / workers
    return 16.0 * params / workers


def run(
    name: str,
    stage: int,
    lora: bool,
    ckpt: bool,
    args: argparse.Namespace,
    model: Path,
    data: Path,
    tmp: Path,
) -> dict:
    from rayembed.train.config import TrainConfig
    from rayembed.train.job import train

    cfg = TrainConfig(
        data=str(data), output_dir=str(tmp / f"{name}-{ckpt}"), model=str(model), num_workers=args.workers,
        zero_stage=stage, precision=args.precision, lora_r=args.lora_r if lora else 0,
        lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"] if lora else None,
        negative_column="negative", batch_size=args.batch_size, max_length=args.max_length, lr=1e-5,
        max_steps=args.steps, checkpoint_every=args.steps, report_interval_s=0, gradient_checkpointing=ckpt,
    )  # fmt: skip
    start = time.perf_counter()
    result = train(cfg)
    return {"peak_mem_mb": round(result["peak_mem_mb"], 1), "base_mem_mb": round(result["base_mem_mb"], 1),
            "step": result["step"], "wall_s": round(time.perf_counter() - start, 1)}  # fmt: skip


def counts(model: Path, lora_r: int) -> tuple[int, int]:
    """(parameters, LoRA weights trained on q/k/v/o) of the model, counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        backbone = AutoModel.from_config(AutoConfig.from_pretrained(model))
    params = sum(p.numel() for p in backbone.parameters())
    linears = [
        m
        for n, m in backbone.named_modules()
        if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]
    return params, sum(lora_r * (m.in_features + m.out_features) for m in linears)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen2")
    p.add_argument("--size", default="0.4b")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--configs", default=",".join(c[0] for c in CONFIGS))
    p.add_argument("--variants", default="checkpointing,no-checkpointing",
                   help="activation checkpointing on (LLM training's usual setting) and/or off")  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "llm-memory.json"))
    args = p.parse_args()

    import ray

    from rayembed.data import SHARED_DATA
    from rayembed.data.prepare import prepare
    from rayembed.model.random_models import build_random_model

    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        started = time.perf_counter()
        model = build_random_model(args.family, tmp / "model", args.size)
        print(f"built {args.family}-{args.size} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        data = tmp / "snli.jsonl"
        prepare("snli", f"{SHARED_DATA}/snli-esnli", str(data), split="dev", limit=256)
        params, trained = counts(model, args.lora_r)
        for variant in args.variants.split(","):
            rows[variant] = {}
            for name, stage, lora in CONFIGS:
                if name not in args.configs.split(","):
                    continue
                ray.init(num_cpus=args.workers + 2, include_dashboard=False, log_to_driver=False)
                try:  # a fresh cluster per point: one point's out-of-memory kill cannot break the next
                    row = run(name, stage, lora, variant == "checkpointing", args, model, data, tmp)
                    row["model_mem_mb"] = round(row["peak_mem_mb"] - row["base_mem_mb"], 1)
                except Exception as e:  # noqa: BLE001 - a point that does not fit is a result too
                    row = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
                finally:
                    ray.shutdown()
                    shutil.rmtree(
                        tmp / f"{name}-{variant == 'checkpointing'}", ignore_errors=True
                    )  # GBs each
                theory = theory_bytes(stage, lora, args.precision, params, trained, args.workers)
                rows[variant][name] = row | {
                    "theory_mb": round(theory / 2**20, 1),
                    "theory_bytes_per_param": round(theory / params, 2),
                }
                print(variant, name, json.dumps(rows[variant][name]), file=sys.stderr)

    def ratio(variant: str, a: str, b: str, key: str = "peak_mem_mb") -> float | None:
        got = rows.get(variant, {})
        if key in got.get(a, {}) and key in got.get(b, {}):
            return round(got[a][key] / got[b][key], 3)
        return None

    ratios = {
        v: {"zero3_vs_ddp": ratio(v, "zero3-full", "ddp-full"), "zero2_vs_ddp": ratio(v, "zero2-full", "ddp-full"),
            "lora_vs_full": ratio(v, "zero3-lora", "zero3-full"), "lora_vs_full_zero2": ratio(v, "zero2-lora", "zero2-full"),
            "zero3_vs_ddp_above_base": ratio(v, "zero3-full", "ddp-full", "model_mem_mb"),
            "lora_vs_full_above_base": ratio(v, "zero3-lora", "zero3-full", "model_mem_mb")}
        for v in rows
    }  # fmt: skip
    headline = ratios.get("checkpointing") or next(iter(ratios.values()), {})
    out = {
        **header("llm-memory"),
        "model": {"family": args.family, "size": args.size, "parameters": params, "lora_trained": trained},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "configs")},
        "runs": rows,
        "ratios": ratios,
        "zero3_vs_ddp": headline.get("zero3_vs_ddp"),  # with activation checkpointing
        "lora_vs_full": headline.get("lora_vs_full"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
