"""The general-domain distillation mix and the NLI retrieval collection (rayembed.data.mix), through the
`prepare` job as users run it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from rayembed.cli import main
from rayembed.config import SHARED_DATA
from rayembed.data.readers import load_beir, read_jsonl

DATA = Path(SHARED_DATA)


def test_general_mix_has_no_text_of_the_unseen_collections(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "general.jsonl"
    assert main(["prepare", "kind=general", f"source={DATA}", f"output={out}", "sentences=500"]) == 0
    rows = list(read_jsonl(out))
    assert json.loads(capsys.readouterr().out)["prepare"]["rows"] == len(rows) > 5000
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts) and all(t.strip() for t in texts)  # deduplicated, no empty text
    assert [r["id"] for r in rows] == [str(i) for i in range(len(rows))]
    assert set(Counter(r["source"] for r in rows)) == {"wikitext", "sts", "flagembedding"}
    corpus, queries, _ = load_beir(DATA / "scifact")
    snli = {line.strip() for name in ("s1.test", "s2.test") for line in (DATA / "snli-esnli" / name).open()}
    held_out = {*corpus.values(), *queries.values(), *snli}
    assert not held_out & set(texts)  # neither unseen collection's text is training text
    captions = [line.split("\t")[5] for line in (DATA / "stsbenchmark/stsbenchmark/sts-test.csv").open()
                if line.startswith("main-captions")]  # fmt: skip
    assert not set(captions) & set(texts)  # STS captions (the NLI collection's domain) left out


def test_the_corpus_to_embed_joins_the_mix_as_its_own_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text(
        json.dumps({"_id": "1", "title": "Cats", "text": "Cats purr when they are content."}) + "\n"
        + json.dumps({"_id": "2", "text": "Dogs bark at the postman."}) + "\n"
    )  # fmt: skip
    (docs / "b.jsonl").write_text(json.dumps({"_id": "3", "text": "Not read: corpus_rows=2."}) + "\n")
    out = tmp_path / "general.jsonl"
    args = ["prepare", "kind=general", f"source={DATA}", f"output={out}", "sentences=0"]
    assert main([*args, f"corpus={docs}", "corpus_rows=2"]) == 0
    assert json.loads(capsys.readouterr().out)["prepare"]["sources"]["corpus"] == 2
    got = sorted(r["text"] for r in read_jsonl(out) if r["source"] == "corpus")
    assert got == ["Cats Cats purr when they are content.", "Dogs bark at the postman."]  # title + text

    (docs / "a.jsonl").write_text(json.dumps({"_id": "1", "body": "no text field"}) + "\n")
    assert main([*args, f"corpus={docs}"]) != 0
    assert "a.jsonl:1: a row needs a string 'text' field" in capsys.readouterr().err
    assert main([*args, f"corpus={tmp_path / 'none'}"]) != 0
    assert "no JSONL file there" in capsys.readouterr().err
    assert main(["prepare", "kind=snli", f"source={DATA}", f"output={out}", f"corpus={docs}"]) != 0
    assert "corpus applies to prepare kind=general" in capsys.readouterr().err


def test_nli_retrieval_is_a_beir_folder_of_entailed_hypotheses(tmp_path: Path) -> None:
    assert main(["prepare", "kind=nli_retrieval", f"source={DATA / 'snli-esnli'}", f"output={tmp_path}",
                 "split=test"]) == 0  # fmt: skip
    corpus, queries, qrels = load_beir(tmp_path, "test")
    assert len(queries) > 3000 and len(corpus) > 9000
    pairs = set()
    for s1, s2, label in zip(
        *((DATA / "snli-esnli" / f"{n}.test").open() for n in ("s1", "s2", "labels")), strict=True
    ):
        if label.strip() == "entailment":
            pairs.add((s1.strip(), s2.strip()))
    got = {(queries[q], corpus[d]) for q, docs in qrels.items() for d in docs}
    assert got == pairs  # every entailment pair judged relevant, nothing else


def test_an_unknown_prepare_kind_is_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["prepare", "kind=wiki", f"source={DATA}", f"output={tmp_path / 'x.jsonl'}"]) != 0
    assert "prepare kind must be one of snli, beir, general, nli_retrieval" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_articles_are_whole_wikipedia_articles_with_their_sections(tmp_path: Path) -> None:
    from rayembed.data.readers import wiki_articles

    rows = list(wiki_articles(DATA / "wikitext-2" / "paragraphs.jsonl"))
    paragraphs = (DATA / "wikitext-2" / "paragraphs.jsonl").read_text().splitlines()
    assert len(rows) == 121 and len({r["id"] for r in rows}) == 121
    assert rows[0]["title"] == "Homarus gammarus" and "\n\nDescription\n\n" in rows[0]["text"]
    words = sorted(len(r["text"].split()) for r in rows)
    assert words[0] > 200 and words[len(words) // 2] > 2000  # long documents
    assert sum(r["text"].count("\n\n") for r in rows) >= len(paragraphs) - len(rows)  # no paragraph lost
