#!/usr/bin/env bash
# Every GPU benchmark of the project in one call, sized to end within 9 minutes on one H100; JSON out.
#
#   bash tests/bench/gpu.sh [OUT_DIR]        # default: docs/results (writes gpu.json there)
#
# Needs rayembed installed with a CUDA torch (the cluster image: cluster/Dockerfile) and the data sets in
# $RAYEMBED_DATA (SciFact, e-SNLI). Runs, each under its own time limit:
#   1. embed: `rayembed embed` vs a bare Embedder.encode loop vs sentence-transformers on the bundled
#      all-MiniLM-L6-v2 in float16, SciFact + SNLI repeated until the bare loop takes about 2 minutes;
#      pipeline tokens/s and MFU (forward FLOPs x tokens/s / the GPU's dense 16-bit peak)   (issue 16)
#   2. train: single-GPU samples/s and peak memory, contrastive ZeRO-2 bf16                  (issue 15)
# and merges their JSON into OUT_DIR/gpu.json with the date, the machine and this command.
# Status: written on a CPU-only VM; not yet run on a GPU (docs/benchmarks.md says which figures exist).
set -uo pipefail
out=${1:-docs/results}
py=${PYTHON:-python}
tmp=$(mktemp -d)
mkdir -p "$out"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$tmp/gpu.txt" || exit 1
timeout 330 "$py" tests/bench/bench_embed.py --device cuda --gpu-dtype float16 --batch-size 256 \
  --scifact 5183 --snli 9842 --repeat 24 --files 48 >"$tmp/embed.json" 2>"$tmp/embed.log"
echo "embed: exit $?" >&2
timeout 150 "$py" tests/bench/bench_train_scaling.py --gpu --workers 1 --steps 40 --warmup 5 \
  --batch-size 128 --out "$tmp/train.json" >/dev/null 2>"$tmp/train.log"
echo "train: exit $?" >&2

"$py" - "$tmp" "$out/gpu.json" "$*" <<'EOF'
import datetime, json, platform, sys
from pathlib import Path

tmp, dest, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]


def load(name: str) -> object:
    try:
        return json.loads((tmp / name).read_text())
    except (OSError, ValueError):
        log = tmp / name.replace(".json", ".log")
        return {"error": log.read_text()[-2000:] if log.exists() else "no output"}


result = {
    "date": datetime.date.today().isoformat(),
    "machine": f"{platform.node()}: {(tmp / 'gpu.txt').read_text().strip()}",
    "command": f"bash tests/bench/gpu.sh {argv}".strip(),
    "embed": load("embed.json"),
    "train": load("train.json"),
}
dest.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
EOF
