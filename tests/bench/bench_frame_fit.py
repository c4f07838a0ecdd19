"""Which rows should the pair's frame be fitted on? The teacher-in-frame's 128-d prefix against its full
width on SciFact (its 809 train queries, a dev collection, and its 300 test queries, over all 5,183
abstracts), for axes fitted on: the rows a corpus-recipe run read (`pca_rows`: the general mix with the
corpus among it, what train.job.fit_rotation used before `pca_source`), the corpus's rows among them (what
`pca_source: corpus` picks), and every corpus row; each as principal axes and turned for ranking
(`pca_ranking_steps`). No training: the teacher rotated on both sides, which is the frame's own limit for
the pair's 128-d index (docs/benchmarks.md). Written to docs/results/frame-fit.json.

    .venv/bin/python tests/bench/bench_frame_fit.py --run /tmp/runS/runs/distill

`--run` is the output_dir of a finished `rayembed run jobs/distill.yaml prepare.corpus=<SciFact's
corpus.jsonl>`: its general.jsonl (each row's source) and teacher/ (the teacher's vectors of every row).
Only SciFact's abstracts (documents, no queries, no labels) are in those rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "bench"))
from bench_retention import scifact_dev, score  # noqa: E402
from results import header  # noqa: E402

from conftest import DATA  # noqa: E402

OUT = ROOT / "docs" / "results" / "frame-fit.json"
PREFIXES = [256, 128, 64]  # jobs/distill.yaml's matryoshka_dims below full width


def mix_rows(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """(the teacher's vectors of the run's rows in its training order, which of them are the corpus's)."""
    import pyarrow.parquet as pq

    table = pq.read_table(run / "teacher", columns=["id", "embedding"]).to_pydict()
    with open(run / "general.jsonl") as f:
        source = {row["id"]: row["source"] for row in map(json.loads, f)}
    vectors = np.stack(table["embedding"]).astype(np.float32)
    return vectors, np.array([source[i] == "corpus" for i in table["id"]])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--run", type=Path, required=True, help="a corpus-recipe run's output_dir (SciFact corpus)"
    )
    p.add_argument("--pca-rows", type=int, default=25000, help="the run's train.pca_rows")
    p.add_argument("--steps", type=int, default=1000, help="pca_ranking_steps of the turned axes")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()

    from rayembed.data.readers import load_beir
    from rayembed.model import Embedder
    from rayembed.model.pca import principal_axes, ranking_axes

    corpus, test_q, test_rel = load_beir(str(DATA / "scifact"), "test")
    _, dev_q, dev_rel = scifact_dev()
    teacher, started = Embedder.load("default", device="cpu"), time.time()
    docs = teacher.encode(list(corpus.values()))
    sets = {
        "dev": (teacher.encode(list(dev_q.values())), (corpus, dev_q, dev_rel)),
        "test": (teacher.encode(list(test_q.values())), (corpus, test_q, test_rel)),
    }
    encode_s = round(time.time() - started)

    def prefix_keeps(axes: np.ndarray) -> dict[str, float]:
        out = {}
        for name, (queries, beir) in sets.items():
            q, d = queries @ axes, docs @ axes
            out[name] = round(score(q, d, beir, 128) / score(q, d, beir), 4)
        return out

    vectors, is_corpus = mix_rows(args.run)
    read = slice(0, args.pca_rows)
    fits = {
        "rows_read": vectors[read],
        "corpus_rows_read": vectors[read][is_corpus[read]],
        "every_corpus_row": vectors[is_corpus],
    }
    entry: dict[str, Any] = header() | {"run": str(args.run), "teacher_encode_s": encode_s}
    entry["unrotated"] = prefix_keeps(np.eye(docs.shape[1], dtype=np.float32))
    for name, x in fits.items():
        started = time.time()
        principal = prefix_keeps(principal_axes(x))
        turned = prefix_keeps(ranking_axes(x, PREFIXES, steps=args.steps))
        entry[name] = {"rows": len(x), "principal": principal, f"ranking_{args.steps}_steps": turned,
                       "fit_and_score_s": round(time.time() - started)}  # fmt: skip
        print(name, json.dumps(entry[name]), flush=True)
    entry["what"] = (
        "the teacher-in-frame's nDCG@10 at 128-d over its full width, its queries and documents both rotated; "
        "dev: SciFact's 809 train queries, test: its 300 test queries, both over all 5,183 abstracts"
    )
    args.out.write_text(json.dumps(entry, indent=2) + "\n")
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
