"""Long documents as passages: splitting, the chunked pipeline against a splitter + sentence-transformers
loop, retrieval over chunks, and memory from 1k to 100k long documents: docs/results/chunking.json.

    .venv/bin/python tests/bench/bench_chunking.py                    # every part (~1 h on 2 CPU cores)
    .venv/bin/python tests/bench/bench_chunking.py --parts split,quality

Parts (each writes the file when it ends; figures of parts not run are kept):
- split: rayembed's plan (model/chunking.py: one tokenizer pass with offsets) against
  semantic-text-splitter and LangChain's RecursiveCharacterTextSplitter sized by the same HF tokenizer
  (`uv pip install semantic-text-splitter langchain-text-splitters`), on the 121 wikitext-2 articles,
  128-token chunks, 16 shared: tokens/s, chunks, chunks over budget, chunks ending at a sentence end.
- pipeline: `rayembed embed` (chunking=chunks, then late) on the first `--articles` articles against the
  loop users write: LangChain's splitter + `SentenceTransformer.encode` of its chunks, in one process;
  both on the same machine with the same torch threads. `split_share`: the plan's time (chunking.prepare:
  tokenizing, cutting, tokenizing the chunks) over the pipeline's wall time.
- quality: a long-document collection from SciFact (unseen in any training here): its test queries'
  relevant abstracts and others, joined `--per-doc` at a time (seeded) into long documents; a document is
  relevant where one of its abstracts is. nDCG@10 of truncated (one vector, first 256 tokens), chunked and
  late-chunked retrieval (a document's score: its best chunk's).
- rss: the pipeline on 1k and 100k long documents (3 wikitext paragraphs each, ~400 tokens, 62-token
  chunks, 1,000 documents a file) with a tiny random BERT, in fresh processes: driver and actor peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from results import header

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "bench"))
OUT = ROOT / "docs" / "results" / "chunking.json"
DATA = Path(os.environ.get("RAYEMBED_DATA", ROOT.parent / "shared" / "data"))
SIZE, OVERLAP = 128, 16


def articles() -> list[dict[str, str]]:
    from rayembed.data.readers import wiki_articles

    return list(wiki_articles(DATA / "wikitext-2" / "paragraphs.jsonl"))


def sentence_ends(pieces: list[str]) -> float:
    return round(sum(p.rstrip().endswith((".", "!", "?", '"')) for p in pieces) / max(len(pieces), 1), 3)


def split_part() -> dict[str, Any]:
    from rayembed.model import Embedder
    from rayembed.model.chunking import plan

    tok = Embedder.load("default", device="cpu").tokenizer
    texts = [a["text"] for a in articles()]
    count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    t = time.perf_counter()
    p = plan(tok, texts, SIZE, OVERLAP, "sentence")
    ours_s = time.perf_counter() - t
    tokens = sum(map(len, p.ids))
    pieces = [texts[d][s:e] for d, s, e in zip(p.doc, p.start, p.end, strict=True)]
    out: dict[str, Any] = {
        "documents": len(texts),
        "tokens": tokens,
        "chunk_tokens": SIZE,
        "overlap": OVERLAP,
    }
    out["rayembed"] = {"seconds": round(ours_s, 3), "tokens_per_s": round(tokens / ours_s), "chunks": len(pieces),
                       "over_budget": sum(n > SIZE for n in p.tokens), "sentence_ends": sentence_ends(pieces)}  # fmt: skip
    libraries: dict[str, Any] = {}
    try:
        from semantic_text_splitter import TextSplitter

        sts = TextSplitter.from_huggingface_tokenizer(tok.backend_tokenizer, SIZE, overlap=OVERLAP)
        libraries["semantic-text-splitter"] = lambda x: sts.chunks(x)
    except ImportError:
        out["semantic-text-splitter"] = "not installed"
    try:
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        lc = RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
            tok, chunk_size=SIZE, chunk_overlap=OVERLAP
        )
        libraries["langchain-recursive"] = lc.split_text
    except ImportError:
        out["langchain-recursive"] = "not installed"
    for name, split in libraries.items():
        t = time.perf_counter()
        chunks = [c for x in texts for c in split(x)]
        s = time.perf_counter() - t
        out[name] = {"seconds": round(s, 3), "tokens_per_s": round(tokens / s), "chunks": len(chunks),
                     "over_budget": sum(count(c) > SIZE for c in chunks), "sentence_ends": sentence_ends(chunks)}  # fmt: skip
        out[f"rayembed_vs_{name}_speed"] = round(
            out["rayembed"]["tokens_per_s"] / out[name]["tokens_per_s"], 2
        )
    return out


def pipeline_part(n: int, work: Path) -> dict[str, Any]:
    import ray

    from rayembed.config import EmbedConfig
    from rayembed.data.readers import write_jsonl
    from rayembed.embed import embed
    from rayembed.model import Embedder, default_model_path
    from rayembed.model.chunking import prepare

    docs = articles()[:n]
    write_jsonl(work / "lake" / "docs.jsonl", docs)
    threads = len(os.sched_getaffinity(0))
    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
    out: dict[str, Any] = {"documents": n, "threads": threads}
    for mode in ("chunks", "late"):
        cfg = EmbedConfig(input=str(work / "lake"), output=str(work / mode), chunking=mode, chunk_tokens=SIZE,
                          chunk_overlap=OVERLAP, progress=False, overwrite=True, threads_per_actor=threads)  # fmt: skip
        s = embed(cfg)
        out[f"rayembed_{mode}"] = {"wall_s": s["wall_s"], "chunks": s["chunks"], "docs_per_s": round(n / s["wall_s"], 3),
                                   "tokens_per_s": s["tokens_per_s"]}  # fmt: skip
    ray.shutdown()
    import torch
    from langchain_text_splitters import RecursiveCharacterTextSplitter
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    st = SentenceTransformer(str(default_model_path()), device="cpu")
    t = time.perf_counter()
    lc = RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
        st.tokenizer, chunk_size=SIZE, chunk_overlap=OVERLAP
    )
    chunks = [c for d in docs for c in lc.split_text(d["text"])]
    split_s = time.perf_counter() - t
    st.encode(chunks, batch_size=64)
    wall = time.perf_counter() - t
    tokens = sum(len(x) for x in st.tokenizer(chunks)["input_ids"])
    out["baseline"] = {"what": "LangChain RecursiveCharacterTextSplitter (HF tokenizer) + SentenceTransformer.encode",
                       "wall_s": round(wall, 2), "split_s": round(split_s, 2), "chunks": len(chunks),
                       "docs_per_s": round(n / wall, 3), "tokens_per_s": round(tokens / wall, 1)}  # fmt: skip
    model = Embedder.load("default", device="cpu")
    model.tokenize_threads = 1  # an actor's plan runs on its one background thread
    t = time.perf_counter()
    prepare(model, [d["text"] for d in docs], "chunks", SIZE, OVERLAP, "sentence")
    out["plan_s"] = round(time.perf_counter() - t, 2)
    out["pipeline_vs_baseline"] = round(
        out["rayembed_chunks"]["docs_per_s"] / out["baseline"]["docs_per_s"], 2
    )
    out["split_share"] = round(out["plan_s"] / out["rayembed_chunks"]["wall_s"], 4)
    return out


def long_scifact(
    per_doc: int, total: int, seed: int = 0
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """(long document id -> text, query id -> text, qrels on long documents) from SciFact's test split."""
    from rayembed.data.readers import load_beir

    corpus, queries, qrels = load_beir(DATA / "scifact", "test")
    relevant = sorted({d for rels in qrels.values() for d in rels if d in corpus})
    rng = random.Random(seed)
    others = rng.sample(sorted(set(corpus) - set(relevant)), max(0, total - len(relevant)))
    ids = relevant + others
    rng.shuffle(ids)
    docs, home = {}, {}
    for i in range(0, len(ids), per_doc):
        name = f"long-{i // per_doc}"
        docs[name] = "\n\n".join(corpus[a] for a in ids[i : i + per_doc])
        home |= {a: name for a in ids[i : i + per_doc]}
    long_qrels = {q: {home[d]: g for d, g in rels.items() if d in home} for q, rels in qrels.items()}
    return docs, {q: queries[q] for q in long_qrels}, long_qrels


def quality_part(per_doc: int, total: int) -> dict[str, Any]:
    from rayembed.eval.metrics import ndcg_at_k
    from rayembed.model import Embedder
    from rayembed.model.chunking import encode_chunks

    docs, queries, qrels = long_scifact(per_doc, total)
    model = Embedder.load("default", device="cpu")
    names, texts = list(docs), list(docs.values())
    q = model.encode(list(queries.values()))
    out: dict[str, Any] = {"collection": f"SciFact test queries over {len(docs)} long documents of {per_doc} "
                           f"abstracts each ({total} abstracts: every relevant one and random others; seed 0); "
                           "unseen in any training here", "queries": len(queries),
                           "tokens_per_doc_median": int(np.median([len(x) for x in model.tokenizer(texts)["input_ids"]]))}  # fmt: skip
    runs: dict[str, tuple[list[int], np.ndarray]] = {
        "truncated": (list(range(len(texts))), model.encode(texts))
    }
    for mode in ("chunks", "late"):
        p, vectors, _ = encode_chunks(model, texts, mode, SIZE, OVERLAP)
        runs[mode] = (p.doc, vectors)
    for mode, (doc, vectors) in runs.items():
        best = np.full((len(queries), len(texts)), -np.inf)
        np.maximum.at(best.T, np.asarray(doc), (q @ vectors.T).T)  # a document's score: its best chunk's
        scores = []
        for i, qid in enumerate(queries):
            ranked = [names[j] for j in np.argsort(-best[i])[:10]]
            scores.append(ndcg_at_k(ranked, qrels[qid]))
        out[f"ndcg@10_{mode}"] = round(float(np.mean(scores)), 4)
        out[f"vectors_{mode}"] = len(doc)
    return out


def rss_one(n: int, work: Path) -> dict[str, Any]:
    """One size in this (fresh) process: the lake, the chunked pipeline, peak RSS of driver and actors."""
    import ray
    from bench_embed_scale import PeakRSS  # type: ignore[import-not-found]

    from conftest import build_tiny
    from rayembed.config import EmbedConfig
    from rayembed.embed import embed

    paragraphs = [
        json.loads(x)["text"] for x in (DATA / "wikitext-2" / "paragraphs.jsonl").read_text().splitlines()
    ]
    (work / "lake").mkdir(parents=True)
    files = max(1, n // 1000)  # 1,000 documents a file at every size, as a lake keeps its files
    for f in range(files):
        with open(work / "lake" / f"part-{f:02d}.jsonl", "w") as out:
            for i in range(f, n, files):
                text = "\n\n".join(paragraphs[(3 * i + k) % len(paragraphs)] for k in range(3))
                out.write(json.dumps({"id": str(i), "text": text}) + "\n")
    model = build_tiny(work / "tiny")
    ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False)
    sampler = PeakRSS()
    s = embed(EmbedConfig(input=str(work / "lake"), output=str(work / "out"), model=str(model), chunking="chunks",
                          chunk_overlap=8, progress=False))  # fmt: skip
    sampler.stop.set()
    ray.shutdown()
    return {"documents": s["rows"], "chunks": s["chunks"], "wall_s": s["wall_s"],
            "driver_peak_rss_mb": round(sampler.driver / 2**20, 1),
            "actor_peak_rss_mb": max(round(v / 2**20, 1) for v in sampler.peak.values())}  # fmt: skip


def rss_part(sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(
                [sys.executable, __file__, "--rss-one", str(n), tmp], capture_output=True, text=True
            )
            if done.returncode:
                raise RuntimeError(done.stderr[-3000:])
            out[str(n)] = json.loads(done.stdout.strip().splitlines()[-1])
    lo, hi = str(min(sizes)), str(max(sizes))
    out[f"driver_rss_{hi}_vs_{lo}"] = round(out[hi]["driver_peak_rss_mb"] / out[lo]["driver_peak_rss_mb"], 3)
    out[f"actor_rss_{hi}_vs_{lo}"] = round(out[hi]["actor_peak_rss_mb"] / out[lo]["actor_peak_rss_mb"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="split,pipeline,quality,rss")
    p.add_argument("--articles", type=int, default=40, help="pipeline: articles embedded")
    p.add_argument("--per-doc", type=int, default=10, help="quality: SciFact abstracts per long document")
    p.add_argument("--abstracts", type=int, default=1000, help="quality: abstracts in the collection")
    p.add_argument("--rss-sizes", default="1000,100000")
    p.add_argument("--rss-one", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rss_one:
        print(json.dumps(rss_one(int(a.rss_one[0]), Path(a.rss_one[1]))))
        return
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    result |= header("chunking") | {"gpu": "not measured"}
    for part in a.parts.split(","):
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            if part == "split":
                result["split"] = split_part()
            elif part == "pipeline":
                result["pipeline"] = got = pipeline_part(a.articles, Path(tmp))
                result["pipeline_vs_baseline"], result["split_share"] = (
                    got["pipeline_vs_baseline"],
                    got["split_share"],
                )
            elif part == "quality":
                result["quality"] = quality_part(a.per_doc, a.abstracts)
            elif part == "rss":
                sizes = [int(x) for x in a.rss_sizes.split(",")]
                result["rss"] = got = rss_part(sizes)
                key = f"driver_rss_{max(sizes) // 1000}k_vs_{min(sizes) // 1000}k"
                result[key] = got[f"driver_rss_{max(sizes)}_vs_{min(sizes)}"]
            else:
                raise SystemExit(f"unknown part {part!r}")
        print(f"{part}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
