"""Readers for the public evaluation/training sets (BEIR, STS Benchmark, SNLI) and a JSONL writer.

The data itself stays where it is (../shared/data); `rayembed prepare` (prepare.py) writes derived
training files.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rayembed.io import is_file, join, open_file


def read_jsonl(path: str | Path, endpoint_url: str | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file, local or s3://; a line that is not JSON is an error naming its file and line."""
    with open_file(path, "r", endpoint_url) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]], endpoint_url: str | None = None) -> int:
    """Write rows as JSONL to a local file (its folder made) or an s3:// object; returns the row count."""
    n = 0
    with open_file(path, "w", endpoint_url) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def load_beir(
    folder: str | Path, split: str = "test", endpoint_url: str | None = None
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """(corpus id -> 'title text', query id -> text, qrels query id -> {doc id: grade}) of a BEIR folder,
    local or s3://."""
    if not is_file(join(folder, "corpus.jsonl"), endpoint_url):
        raise FileNotFoundError(f"{folder} is not a BEIR folder (corpus.jsonl missing)")
    corpus = {
        str(d["_id"]): f"{d.get('title', '')} {d['text']}".strip()
        for d in read_jsonl(join(folder, "corpus.jsonl"), endpoint_url)
    }
    queries = {str(q["_id"]): q["text"] for q in read_jsonl(join(folder, "queries.jsonl"), endpoint_url)}
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with open_file(join(folder, "qrels", f"{split}.tsv"), "r", endpoint_url) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels[row["query-id"]][row["corpus-id"]] = int(row["score"])
    return corpus, {q: queries[q] for q in qrels}, dict(qrels)


def load_sts(path: str | Path, endpoint_url: str | None = None) -> tuple[list[str], list[str], list[float]]:
    """STS Benchmark CSV (tab-separated: genre, file, year, id, score, sentence1, sentence2), local or s3://."""
    s1, s2, scores = [], [], []
    with open_file(path, "r", endpoint_url) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 7:
                scores.append(float(parts[4]))
                s1.append(parts[5])
                s2.append(parts[6])
    if not scores:
        raise ValueError(f"{path}: no STS rows found")
    return s1, s2, scores


def nli_lines(
    folder: str | Path, split: str, endpoint_url: str | None = None
) -> Iterator[tuple[str, str, str]]:
    """(premise, hypothesis, label) of e-SNLI's s1/s2/labels files of a split, local or s3://."""
    with (
        open_file(join(folder, f"s1.{split}"), "r", endpoint_url) as f1,
        open_file(join(folder, f"s2.{split}"), "r", endpoint_url) as f2,
        open_file(join(folder, f"labels.{split}"), "r", endpoint_url) as fl,
    ):
        for a, b, label in zip(f1, f2, fl, strict=True):
            yield a.strip(), b.strip(), label.strip()


def snli_triples(
    folder: str | Path, split: str = "dev", endpoint_url: str | None = None
) -> Iterator[dict[str, str]]:
    """(premise, entailed hypothesis, contradicting hypothesis) triples from e-SNLI's s1/s2/labels files."""
    by_premise: dict[str, dict[str, str]] = defaultdict(dict)
    for a, b, label in nli_lines(folder, split, endpoint_url):
        by_premise[a].setdefault(label, b)
    for premise, hyps in by_premise.items():
        if "entailment" in hyps and "contradiction" in hyps:
            yield {"query": premise, "positive": hyps["entailment"], "negative": hyps["contradiction"]}


def wiki_articles(path: str | Path, endpoint_url: str | None = None) -> Iterator[dict[str, str]]:
    """Whole Wikipedia articles from wikitext-2's paragraphs (`paragraphs.jsonl`: a paragraph titled with
    a plain name starts an article, `= Section =` titles are its sections): id, title and the text with
    its section headings, paragraphs separated by blank lines. Long documents (thousands of tokens)."""
    article: dict[str, Any] | None = None
    section = None
    for row in read_jsonl(path, endpoint_url):
        title = row["title"].strip()
        if not title.startswith("=") and not (article and title == article["title"]):  # a new article
            if article:
                yield {"id": article["id"], "title": article["title"], "text": "\n\n".join(article["parts"])}
            article, section = {"id": row["id"], "title": title, "parts": []}, None
        elif article and title != section:
            section = title
            article["parts"].append(title.strip("= ").strip())
        if article:
            article["parts"].append(row["text"])
    if article:
        yield {"id": article["id"], "title": article["title"], "text": "\n\n".join(article["parts"])}
