"""A soup of two seeds of one distillation recipe: does averaging their weights lift the student?
(writes docs/results/quality-soup.json).

    .venv/bin/python tests/bench/bench_seed_soup.py --runs /tmp/bench-quality-rank /tmp/bench-quality-seed1

Each run is a bench_quality.py workdir holding `student3/` (the exported model and its checkpoints).
With `pca_rotation` every run starts from its own axes R (fitted on its own draw of the mix), so the
exported projection W ~ R^T and two runs' outputs sit in different frames. The soup maps each later
run's projection into the first's frame (W_k <- R_0^T R_k W_k, exact: the output turned by the known
rotations) and averages backbone and projection alike; `naive` averages the weights as they are (what
`rayembed merge` does with models it cannot tell apart). The ingredients and both soups are scored on the
**dev** collections of distill_sweep.py (where a choice may be made), the aligned soup also on the test
collections of bench_quality.py (to compare with the seeds' figures there, not to choose).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from bench_quality import collections, scores
from distill_sweep import dev_sets
from results import header

from rayembed.model import Embedder
from rayembed.train.export import saved_rotation

OUT = Path(__file__).resolve().parents[2] / "docs" / "results" / "quality-soup.json"


def rotation(run: Path) -> torch.Tensor:
    """The axes the run started from (kept with each of its checkpoints)."""
    [checkpoint, *_] = sorted(run.glob("student3/checkpoints/student3/checkpoint_*"))
    return saved_rotation(checkpoint).float()


def soup(models: list[Embedder], rotations: list[torch.Tensor] | None) -> Embedder:
    """Mean of the weights; with `rotations`, each projection first turned into the first run's frame."""
    states = [{k: v.float() for k, v in m.state_dict().items()} for m in models]
    if rotations is not None:
        for state, r in zip(states[1:], rotations[1:], strict=True):
            state["projection.weight"] = rotations[0].T @ r @ state["projection.weight"]
    mean = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
    return copy.deepcopy(models[0]).load_weights(mean, "the soup")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True, help="bench_quality.py workdirs (2 or more)")
    ap.add_argument("--workdir", default="/tmp/bench-seed-soup")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    runs = [Path(r) for r in args.runs]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    models = [Embedder.load(str(r / "student3" / "model"), device="cpu") for r in runs]
    texts = [json.loads(line)["text"] for line in (runs[0] / "texts.jsonl").read_text().splitlines()[:512]]
    aligned, naive = soup(models, [rotation(r) for r in runs]), soup(models, None)
    for m in (aligned, naive):  # as the train job and merge do: scales fitted to these weights
        m.calibrate_int8(texts, [256, 128, 64])
    dev, test = dev_sets(work), collections(work)
    test["scifact"].sts_file = None  # nDCG@10 only (scores then adds no STS-B entry)
    dev_scores = {f"seed_{i}": scores(m, dev) for i, m in enumerate(models)}
    dev_scores |= {"soup_aligned": scores(aligned, dev), "soup_naive": scores(naive, dev)}
    seeds_test = [json.loads((r / "scores-student3.json").read_text()) for r in runs]
    result = {
        **header(),
        "runs": [str(r) for r in runs],
        "dev": dev_scores,
        "test": {
            **{f"seed_{i}": {k: s[k] for k in ("scifact", "snli")} for i, s in enumerate(seeds_test)},
            "soup_aligned": scores(aligned, test),
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
