"""General-domain text for distillation, and an NLI retrieval collection to evaluate on.

`general_texts` is the text a student learns its teacher from when it must embed corpora it never saw:
Wikipedia paragraphs (document-like), their sentences and section headings (query-like), STS Benchmark
sentences of the news and forum genres, and every text of FlagEmbedding's example files (web queries,
passages, titles). No labels are used. STS's caption genre is left out because image captions are the
domain of `nli_retrieval` (SNLI premises are Flickr30k captions), which serves as an unseen collection.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from rayembed.data.readers import read_jsonl, write_jsonl

STS_GENRES = ("main-news", "main-forum", "main-forums")
"""STS Benchmark genres in the general mix (main-captions is left out: see the module doc)."""

_SENTENCE_END = re.compile(r"(?<=[.!?]) (?=[A-Z\"'])")


def wiki_texts(path: Path, sentences: int, rng: random.Random) -> list[str]:
    """Paragraphs, section headings and `sentences` sampled sentences (6-40 words) of wikitext-2."""
    paragraphs, headings, pool = [], set(), []
    for row in read_jsonl(path):
        paragraphs.append(row["text"])
        headings.add(row.get("title") or "")
        pool += [s for s in _SENTENCE_END.split(row["text"]) if 6 <= len(s.split()) <= 40]
    rng.shuffle(pool)
    return [*paragraphs, *sorted(h for h in headings if h), *pool[:sentences]]


def sts_texts(folder: Path, genres: tuple[str, ...] = STS_GENRES) -> list[str]:
    """Both sentences of every STS Benchmark pair (all splits) of the given genres."""
    out = []
    for split in ("train", "dev", "test"):
        for line in (folder / f"sts-{split}.csv").read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            if len(parts) >= 7 and parts[0] in genres:
                out += [parts[5], parts[6]]
    return out


def flag_texts(folder: Path) -> list[str]:
    """Queries, positives and negatives of every FlagEmbedding example file."""
    out = []
    for path in sorted(folder.rglob("*.jsonl")):
        for row in read_jsonl(path):
            out += [row["query"], *row.get("pos", []), *row.get("neg", [])]
    return out


def corpus_texts(path: str | Path, rows: int) -> list[str]:
    """`title` + `text` of the first `rows` rows of a JSONL file or folder of *.jsonl (a BEIR corpus.jsonl,
    an embed job's input); a row without a string `text` is an error naming its file and line."""
    files = sorted(Path(path).rglob("*.jsonl")) if Path(path).is_dir() else [Path(path)]
    if not files or not files[0].is_file():
        raise ValueError(f"corpus {path}: no JSONL file there")
    out: list[str] = []
    for file in files:
        for n, row in enumerate(read_jsonl(file), 1):
            if len(out) == rows:
                return out
            if not isinstance(row.get("text"), str):
                raise ValueError(f"corpus {file}:{n}: a row needs a string 'text' field")
            out.append(f"{row['title']} {row['text']}" if row.get("title") else row["text"])
    return out


def general_texts(
    data_dir: str | Path,
    sentences: int = 6000,
    seed: int = 0,
    corpus: str | Path | None = None,
    corpus_rows: int = 20000,
) -> list[dict[str, str]]:
    """The general mix as rows {id, source, text}: deduplicated, shuffled (mixed lengths in every batch);
    with `corpus`, the text of the corpus the student will embed joins it (source 'corpus')."""
    root, rng = Path(data_dir), random.Random(seed)
    parts = {
        "wikitext": wiki_texts(root / "wikitext-2" / "paragraphs.jsonl", sentences, rng),
        "sts": sts_texts(root / "stsbenchmark" / "stsbenchmark"),
        "flagembedding": flag_texts(root / "flagembedding-examples"),
        "corpus": corpus_texts(corpus, corpus_rows) if corpus else [],
    }
    seen: dict[str, str] = {}
    for source, texts in parts.items():
        for text in texts:
            text = text.strip()
            if text and text not in seen:
                seen[text] = source
    rows = [{"source": source, "text": text} for text, source in seen.items()]
    rng.shuffle(rows)
    return [{"id": str(i), **row} for i, row in enumerate(rows)]


def _nli_pairs(root: Path, split: str) -> Iterator[tuple[str, str, str]]:
    with (
        open(root / f"s1.{split}", encoding="utf-8") as f1,
        open(root / f"s2.{split}", encoding="utf-8") as f2,
        open(root / f"labels.{split}", encoding="utf-8") as fl,
    ):
        for a, b, label in zip(f1, f2, fl, strict=True):
            yield a.strip(), b.strip(), label.strip()


def nli_retrieval(source: str | Path, output: str | Path, split: str = "test") -> dict[str, int]:
    """A BEIR folder from e-SNLI: queries are premises, the corpus is every hypothesis of the split, and a
    premise's entailed hypotheses are its relevant documents (its neutral and contradicting ones, which
    share most of its words, are the hard negatives). Writes corpus.jsonl, queries.jsonl, qrels/test.tsv."""
    docs: dict[str, str] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, set[str]] = defaultdict(set)
    for premise, hypothesis, label in _nli_pairs(Path(source), split):
        if not premise or not hypothesis:
            continue
        doc = docs.setdefault(hypothesis, f"h{len(docs)}")
        if label == "entailment":
            qrels[queries.setdefault(premise, f"p{len(queries)}")].add(doc)
    out = Path(output)
    write_jsonl(out / "corpus.jsonl", ({"_id": i, "title": "", "text": t} for t, i in docs.items()))
    write_jsonl(out / "queries.jsonl", ({"_id": i, "text": t} for t, i in queries.items()))
    lines = ["query-id\tcorpus-id\tscore", *(f"{q}\t{d}\t1" for q, ds in qrels.items() for d in sorted(ds))]
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    (out / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"queries": len(qrels), "docs": len(docs), "qrels": len(lines) - 1}
