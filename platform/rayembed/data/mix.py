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
from pathlib import Path

from rayembed.data.readers import nli_lines, read_jsonl, write_jsonl
from rayembed.io import files_under, join, open_file

STS_GENRES = ("main-news", "main-forum", "main-forums")
"""STS Benchmark genres in the general mix (main-captions is left out: see the module doc)."""

_SENTENCE_END = re.compile(r"(?<=[.!?]) (?=[A-Z\"'])")


def wiki_texts(path: str, sentences: int, rng: random.Random, endpoint_url: str | None = None) -> list[str]:
    """Paragraphs, section headings and `sentences` sampled sentences (6-40 words) of wikitext-2."""
    paragraphs, headings, pool = [], set(), []
    for row in read_jsonl(path, endpoint_url):
        paragraphs.append(row["text"])
        headings.add(row.get("title") or "")
        pool += [s for s in _SENTENCE_END.split(row["text"]) if 6 <= len(s.split()) <= 40]
    rng.shuffle(pool)
    return [*paragraphs, *sorted(h for h in headings if h), *pool[:sentences]]


def sts_texts(
    folder: str, genres: tuple[str, ...] = STS_GENRES, endpoint_url: str | None = None
) -> list[str]:
    """Both sentences of every STS Benchmark pair (all splits) of the given genres."""
    out = []
    for split in ("train", "dev", "test"):
        with open_file(join(folder, f"sts-{split}.csv"), "r", endpoint_url) as f:
            lines = f.read().splitlines()
        for line in lines:
            parts = line.split("\t")
            if len(parts) >= 7 and parts[0] in genres:
                out += [parts[5], parts[6]]
    return out


def flag_texts(folder: str, endpoint_url: str | None = None) -> list[str]:
    """Queries, positives and negatives of every FlagEmbedding example file."""
    out = []
    for path in files_under(folder, ".jsonl", endpoint_url):
        for row in read_jsonl(path, endpoint_url):
            out += [row["query"], *row.get("pos", []), *row.get("neg", [])]
    return out


def corpus_texts(path: str | Path, rows: int, endpoint_url: str | None = None) -> list[str]:
    """`title` + `text` of the first `rows` rows of a JSONL file or folder of *.jsonl (a BEIR corpus.jsonl,
    an embed job's input), local or s3://; a row without a string `text` is an error naming its file and
    line."""
    files = files_under(path, ".jsonl", endpoint_url)
    if not files:
        raise ValueError(f"corpus {path}: no JSONL file there")
    out: list[str] = []
    for file in files:
        for n, row in enumerate(read_jsonl(file, endpoint_url), 1):
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
    endpoint_url: str | None = None,
) -> list[dict[str, str]]:
    """The general mix as rows {id, source, text}: deduplicated, shuffled (mixed lengths in every batch);
    with `corpus`, the text of the corpus the student will embed joins it (source 'corpus'). `data_dir`
    and `corpus` may be local or s3://."""
    rng, url = random.Random(seed), endpoint_url
    parts = {
        "wikitext": wiki_texts(join(data_dir, "wikitext-2", "paragraphs.jsonl"), sentences, rng, url),
        "sts": sts_texts(join(data_dir, "stsbenchmark", "stsbenchmark"), endpoint_url=url),
        "flagembedding": flag_texts(join(data_dir, "flagembedding-examples"), url),
        "corpus": corpus_texts(corpus, corpus_rows, url) if corpus else [],
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


def nli_retrieval(
    source: str | Path, output: str | Path, split: str = "test", endpoint_url: str | None = None
) -> dict[str, int]:
    """A BEIR folder from e-SNLI: queries are premises, the corpus is every hypothesis of the split, and a
    premise's entailed hypotheses are its relevant documents (its neutral and contradicting ones, which
    share most of its words, are the hard negatives). Writes corpus.jsonl, queries.jsonl, qrels/test.tsv."""
    docs: dict[str, str] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, set[str]] = defaultdict(set)
    for premise, hypothesis, label in nli_lines(source, split, endpoint_url):
        if not premise or not hypothesis:
            continue
        doc = docs.setdefault(hypothesis, f"h{len(docs)}")
        if label == "entailment":
            qrels[queries.setdefault(premise, f"p{len(queries)}")].add(doc)
    write_jsonl(
        join(output, "corpus.jsonl"),
        ({"_id": i, "title": "", "text": t} for t, i in docs.items()),
        endpoint_url,
    )
    write_jsonl(
        join(output, "queries.jsonl"), ({"_id": i, "text": t} for t, i in queries.items()), endpoint_url
    )
    lines = ["query-id\tcorpus-id\tscore", *(f"{q}\t{d}\t1" for q, ds in qrels.items() for d in sorted(ds))]
    with open_file(join(output, "qrels", "test.tsv"), "w", endpoint_url) as f:
        f.write("\n".join(lines) + "\n")
    return {"queries": len(qrels), "docs": len(docs), "qrels": len(lines) - 1}
