"""Distillation that generalizes: students of all-MiniLM-L6-v2 trained on general text, evaluated on
collections whose text never entered training (writes docs/results/quality.json).

    .venv/bin/python tests/bench/bench_quality.py [--students 3,4,2] [--max-steps 250] [--workdir DIR]

1. Training text: the general mix of `rayembed prepare kind=general` (rayembed.data.mix: Wikipedia
   paragraphs, headings and sentences, STS news/forum sentences, FlagEmbedding's example texts; no labels).
2. Unseen collections: SciFact test (300 queries, all 5,183 abstracts: science) and SNLI-test retrieval
   (`prepare kind=nli_retrieval`, premise -> entailed hypotheses, 1,000 queries over 9,639 hypotheses:
   image captions). No SciFact or SNLI text is in the training mix, and the bench checks it: every query
   and document of both collections is looked up in the training text (`overlap`, must be 0).
   Seen: STS-B test Spearman (the news/forum sentences of all STS splits are training text).
3. Teacher vectors by the batch pipeline (`rayembed embed`, text passed through), once.
4. Each student (`--students`: 3 = layers 0,2,5; 4 = 0,2,4,5; 2 = 0,5 of the teacher) is trained as
   `jobs/distill.yaml` does (distill against the teacher column, pca_rotation with the axes turned for
   ranking, Matryoshka 384/256/128/64, dropout 0, ZeRO-2 on 2 CPU workers), then evaluated with `evaluate`
   (what `rayembed eval` runs) at full width and 128-d, float32 and int8, and timed on 1,000 SciFact
   abstracts (docs/s, same run as the teacher).
--corpus-text (another --out and --workdir): every document of both collections joins the training text
(what `prepare kind=general corpus=` does for a user's corpus), queries and qrels stay out (`overlap`
then counts queries); the figures go under `corpus_text`, never `unseen`.
--genre-text (another --out and --workdir): the sentences of e-SNLI *dev* (premises and hypotheses, no
labels; the 218 that are verbatim SNLI-test text left out) join the training text: other text of the SNLI
collection's genre, none of the collection's own (`overlap` still counts queries and documents, must be
0); figures under `genre_text`, never `unseen`.
Goals (issue 17): on every unseen collection the 3-layer student keeps >= 95 % of the teacher's nDCG@10;
its 128-d >= 95 % of its full width; int8 >= 99 % of float32.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from results import header

from rayembed.config import SHARED_DATA, EmbedConfig, EvalConfig, TrainConfig
from rayembed.data.mix import general_texts, nli_retrieval
from rayembed.data.readers import load_beir, write_jsonl
from rayembed.embed import embed
from rayembed.eval.job import evaluate
from rayembed.model import Embedder
from rayembed.train import train

LAYERS = {3: [0, 2, 5], 4: [0, 2, 4, 5], 2: [0, 5]}
PROTOCOL = {
    "unseen": "train on rayembed.data.mix.general_texts; unseen = collections with no text in training",
    "corpus_text": "train on general_texts + every document of both collections (queries and qrels out); "
    "corpus_text = those collections",
    "genre_text": "train on general_texts + e-SNLI dev's sentences (less those verbatim in an eval collection);"
    " genre_text = collections none of whose text is in training, SNLI-test's genre is",
}
OUT = Path(__file__).resolve().parents[2] / "docs" / "results" / "quality.json"


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def collections(work: Path) -> dict[str, EvalConfig]:
    """The unseen collections' eval settings (SciFact also carries STS-B, the seen figure)."""
    nli_retrieval(Path(SHARED_DATA) / "snli-esnli", work / "snli-test", "test")
    common = {"dims": [128], "precisions": ["float32", "int8"]}
    return {
        "scifact": EvalConfig(beir_dir=f"{SHARED_DATA}/scifact", **common),  # type: ignore[arg-type]
        "snli": EvalConfig(beir_dir=str(work / "snli-test"), sts_file=None, max_queries=1000, **common),  # type: ignore[arg-type]
    }


def overlap(rows: list[dict[str, str]], evals: dict[str, EvalConfig], docs: bool = True) -> dict[str, int]:
    """Texts of each eval collection (queries, and documents unless `docs` is False) found verbatim in the
    training text."""
    train_texts = {norm(r["text"]) for r in rows}
    out = {}
    for name, cfg in evals.items():
        corpus, queries, _ = load_beir(str(cfg.beir_dir), cfg.split)
        texts = [*corpus.values(), *queries.values()] if docs else list(queries.values())
        out[name] = sum(norm(t) in train_texts for t in texts)
    return out


def corpus_file(work: Path, evals: dict[str, EvalConfig]) -> Path:
    """--corpus-text: every document of each collection as one JSONL for `general_texts(corpus=...)`, the
    mechanism `prepare corpus=` uses (deduplicated and shuffled into the mix); the queries and qrels stay
    out, and so does a document whose text is also a query (SNLI-test has one premise that is verbatim a
    hypothesis)."""
    beir = [load_beir(str(cfg.beir_dir), cfg.split) for cfg in evals.values()]
    queries = {norm(q) for _, qs, _ in beir for q in qs.values()}
    path = work / "corpus.jsonl"
    write_jsonl(path, ({"text": t} for docs, _, _ in beir for t in docs.values() if norm(t) not in queries))
    return path


def genre_file(work: Path, evals: dict[str, EvalConfig]) -> tuple[Path, int]:
    """--genre-text: e-SNLI dev's sentences as one JSONL for `general_texts(corpus=...)`, less any that is
    verbatim text of an eval collection; returns the file and how many were left out."""
    beir = [load_beir(str(cfg.beir_dir), cfg.split) for cfg in evals.values()]
    held = {norm(t) for docs, qs, _ in beir for t in [*docs.values(), *qs.values()]}
    root = Path(SHARED_DATA) / "snli-esnli"
    lines = [s.strip() for f in ("s1.dev", "s2.dev") for s in (root / f).read_text("utf-8").splitlines()]
    sentences = [s for s in dict.fromkeys(lines) if s]
    kept = [s for s in sentences if norm(s) not in held]
    path = work / "genre.jsonl"
    write_jsonl(path, ({"text": t} for t in kept))
    return path, len(sentences) - len(kept)


def teacher_vectors(work: Path, rows: list[dict[str, str]]) -> float:
    if (work / "teacher" / "_SUCCESS").exists() or any((work / "teacher").glob("*.parquet")):
        return 0.0  # a --workdir from an earlier run
    write_jsonl(work / "texts.jsonl", rows)
    t0 = time.perf_counter()
    embed(EmbedConfig(input=str(work / "texts.jsonl"), output=str(work / "teacher"),
                      passthrough_columns=["text"], progress=False))  # fmt: skip
    return time.perf_counter() - t0


def train_student(work: Path, layers: int, args: argparse.Namespace, n_rows: int) -> dict[str, Any]:
    done = work / f"student{layers}.json"
    if done.exists():  # a --workdir from an earlier run
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    result = train(
        TrainConfig(
            data=str(work / "teacher"), output_dir=str(work / f"student{layers}"), run_name=f"student{layers}",
            model="default", student_layers=LAYERS[layers], loss="distill", teacher_column="embedding",
            text_column="text", dropout=args.dropout, kl_weight=args.kl_weight, temperature=args.temperature,
            spread_out_weight=0.1,
            matryoshka_dims=[384, 256, 128, 64], num_workers=2, zero_stage=2, batch_size=args.batch_size,
            max_length=256, forward_tokens=4096, lr=args.lr, warmup_steps=10, max_steps=args.max_steps,
            shuffle_buffer=2000, checkpoint_every=10**6, pca_rotation=True, pca_rows=n_rows, seed=args.seed,
            pca_ranking_steps=args.pca_ranking_steps,
        )
    )  # fmt: skip
    run = {"path": result["output_dir"], "steps": result["step"], "seconds": round(time.perf_counter() - t0),
           "final_loss": round(result["loss"], 4)}  # fmt: skip
    done.write_text(json.dumps(run))
    return run


def docs_per_s(model: Embedder, docs: list[str]) -> float:
    model.encode(docs[:64])  # warm-up
    t0 = time.perf_counter()
    model.encode(docs, batch_size=64)
    return round(len(docs) / (time.perf_counter() - t0), 1)


def scores(
    model: Embedder, evals: dict[str, EvalConfig], documents: Embedder | None = None
) -> dict[str, Any]:
    """nDCG@10 per collection and variant (384, 128, 384-int8, 128-int8), STS-B Spearman; with a pair's
    `documents` encoder also `pair`: per collection, the model's queries against its documents (from the
    same evaluate call, so the model encodes each collection once)."""
    out: dict[str, Any] = {}
    for name, cfg in evals.items():
        report = evaluate(cfg, model, documents)
        out[name] = {k: round(v["ndcg@10"], 4) for k, v in report["beir"].items() if isinstance(v, dict)}
        if documents is not None:
            pair = {k: round(v["ndcg@10"], 4) for k, v in report["beir_pair"].items() if isinstance(v, dict)}
            out.setdefault("pair", {})[name] = pair
        if "sts" in report:
            out["stsb"] = {
                k: round(v["spearman"], 4) for k, v in report["sts"].items() if isinstance(v, dict)
            }
    return out


def ratios(student: dict[str, Any], teacher: dict[str, Any], name: str) -> dict[str, float]:
    s, t = student[name], teacher[name]
    return {
        "student_vs_teacher": round(s["384"] / t["384"], 4),
        "dim128_vs_full": round(s["128"] / s["384"], 4),
        "int8_vs_float32": round(s["384-int8"] / s["384"], 4),
        "teacher_ndcg@10": t["384"],
        "student_ndcg@10": s["384"],
    }


def summary(
    results: dict[str, Any], students: dict[int, dict[str, Any]], evals: list[str], texts: int
) -> dict[str, Any]:
    """`unseen`: per collection, the 3-layer student's ratios (others under `other_students`); `seen`:
    STS-B Spearman ratios; `students`: each run and its encode speed against the teacher's."""
    teacher, main = results["teacher"], 3 if 3 in students else next(iter(students))
    unseen = {}
    for name in evals:
        unseen[name] = ratios(results[f"student{main}"], teacher, name) | {
            "student_layers": LAYERS[main], "steps": students[main]["steps"], "texts": texts,
            "seconds": students[main]["seconds"],
            "other_students": {f"{n}_layers": ratios(results[f"student{n}"], teacher, name) for n in students if n != main},
        }  # fmt: skip
    seen = {f"{n}_layers": {"stsb_spearman_vs_teacher": round(results[f"student{n}"]["stsb"]["384"] / teacher["stsb"]["384"], 4)}
            for n in students}  # fmt: skip
    runs = {f"{n}_layers": {"layers": LAYERS[n], **run, "docs_per_s": results[f"student{n}"]["docs_per_s"],
                            "docs_per_s_vs_teacher": round(results[f"student{n}"]["docs_per_s"] / teacher["docs_per_s"], 2)}
            for n, run in students.items()}  # fmt: skip
    return {"unseen": unseen, "seen": seen, "students": runs, "teacher_docs_per_s": teacher["docs_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--students", default="3,4,2", help="student depths, of 3, 4, 2")
    ap.add_argument("--max-steps", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=32, help="per worker (2 workers)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dropout", type=float, default=0.0, help="the student's dropout while training")
    ap.add_argument("--kl-weight", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--sentences", type=int, default=6000, help="Wikipedia sentences in the mix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--pca-ranking-steps", type=int, default=1000, help="train.pca_ranking_steps (0: principal axes)"
    )
    ap.add_argument("--workdir", default="/tmp/bench-quality", help="kept: teacher vectors are reused")
    ap.add_argument("--out", default=str(OUT))
    text = ap.add_mutually_exclusive_group()
    text.add_argument("--corpus-text", action="store_true",
                    help="the collections' documents join the training text (queries do not); figures under "
                    "`corpus_text`, not `unseen` (use another --out and --workdir)")  # fmt: skip
    text.add_argument("--genre-text", action="store_true",
                    help="e-SNLI dev's sentences join the training text (SNLI-test's own text stays out); "
                    "figures under `genre_text`, not `unseen` (use another --out and --workdir)")  # fmt: skip
    args = ap.parse_args()
    kind = "corpus_text" if args.corpus_text else "genre_text" if args.genre_text else "unseen"
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    evals = collections(work)
    corpus, left_out = (corpus_file(work, evals) if args.corpus_text else None), 0
    if args.genre_text:
        corpus, left_out = genre_file(work, evals)
    rows = general_texts(SHARED_DATA, args.sentences, args.seed, corpus, corpus_rows=10**9)
    found = overlap(rows, evals, docs=not args.corpus_text)
    assert not any(found.values()), f"eval text in the training mix: {found}"
    seconds = {"teacher_vectors": round(teacher_vectors(work, rows))}
    students = {n: train_student(work, n, args, len(rows)) for n in map(int, args.students.split(","))}
    t0 = time.perf_counter()
    scifact_docs, _, _ = load_beir(f"{SHARED_DATA}/scifact")
    speed_docs = list(scifact_docs.values())[:1000]
    models = {"teacher": Embedder.load("default")} | {
        f"student{n}": Embedder.load(run["path"]) for n, run in students.items()
    }
    results = {}
    for name, model in models.items():
        done = work / f"scores-{name}.json"
        results[name] = json.loads(done.read_text()) if done.exists() else scores(model, evals)
        done.write_text(json.dumps(results[name]))
    for name, model in models.items():  # speed measured in this run for all, one after the other
        results[name]["docs_per_s"] = docs_per_s(model, speed_docs)
    seconds["eval"] = round(time.perf_counter() - t0)
    figures = summary(results, students, list(evals), len(rows))
    figures = {kind: figures.pop("unseen")} | figures  # --corpus-text, --genre-text: not unseen figures
    out = {
        **header(),
        "protocol": PROTOCOL[kind],
        "texts": len(rows), "genre_text_left_out": left_out, "overlap": found, "seconds": seconds, **figures,
        "scores": results,
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
