"""The index-compatible pair (train/pair.py): a distillation's student and its teacher turned into the
student's frame score in one space; the endpoint serves them behind one name, `input_type` (or a
prompt_name of query / document) choosing the encoder; models of other frames are refused as a pair."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA
from rayembed.model import Embedder
from rayembed.model.layout import mark_frame_fit, model_revision, pair_role
from rayembed.serve.api import Job, Limits, parse_request, parse_tei
from rayembed.serve.config import ServeConfig
from rayembed.serve.engine import ModelEngine
from rayembed.train.config import TrainConfig
from rayembed.train.pair import teacher_in_frame


def _scifact(n_queries: int = 20, n_docs: int = 200) -> tuple[list[str], list[str]]:
    root = DATA / "scifact"
    queries = [json.loads(x)["text"] for x in (root / "queries.jsonl").read_text().splitlines()[:n_queries]]
    docs = [json.loads(x)["text"] for x in (root / "corpus.jsonl").read_text().splitlines()[:n_docs]]
    return queries, docs


def test_a_student_equal_to_its_teacher_ranks_exactly_as_the_teacher(tiny_model: Path) -> None:
    """Student = teacher turned by the run's rotation: teacher_in_frame(doc) . student(query) is the
    teacher's own score at full width, so the ranking is the teacher's; each prefix width scores as the
    turned teacher's prefix does. Without a rotation both share the teacher's native frame."""
    rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(32, 32)))[0]
    cfg = TrainConfig(data="x", output_dir="y", loss="distill", teacher=str(tiny_model), teacher_column="e")
    student = Embedder.load(tiny_model, device="cpu").rotate(rotation)
    documents = teacher_in_frame(cfg, student, rotation)
    assert documents.frame == student.frame is not None
    queries, docs = _scifact()
    teacher = Embedder.load(tiny_model, device="cpu")
    want = teacher.encode(queries) @ teacher.encode(docs).T
    pair = student.encode(queries) @ documents.encode(docs).T
    np.testing.assert_allclose(pair, want, atol=1e-5)
    assert (np.argsort(-pair, axis=1)[:, :10] == np.argsort(-want, axis=1)[:, :10]).mean() > 0.99
    turned = teacher.encode(docs) @ rotation
    np.testing.assert_allclose(documents.encode(docs, dim=8), turned[:, :8] / np.linalg.norm(turned[:, :8], axis=1,
                               keepdims=True), atol=1e-5)  # fmt: skip

    plain = Embedder.load(tiny_model, device="cpu")
    unturned = teacher_in_frame(cfg, plain, None)
    assert unturned.frame == plain.frame == f"native-{model_revision(tiny_model)}"
    with pytest.raises(ValueError, match="is 32-d, the student 16-d: no pair"):
        teacher_in_frame(cfg, Embedder.load(tiny_model, device="cpu").set_projection(torch.eye(16, 32)), None)


def test_the_eval_scores_the_pairs_queries_against_its_documents(
    tiny_pair: tuple[Path, Path], tiny_model: Path, tmp_path: Path
) -> None:
    """`document_model`: BEIR's documents embedded by the pair's document encoder, each side quantised
    with its own int8 scales (`beir_pair`), beside the query model's own figures (`beir`); the document
    encoder alone (`beir_documents`: the teacher's own figures at full width) and the full-width shares of
    it the student and the pair keep (`beir_retention`)."""
    from rayembed.data.readers import load_beir
    from rayembed.eval.config import EvalConfig
    from rayembed.eval.job import evaluate, subset
    from rayembed.eval.metrics import comparable, retrieval_metrics
    from rayembed.model import postprocess

    student_dir, documents_dir = tiny_pair
    settings = {"beir_dir": str(DATA / "scifact"), "sts_file": None, "max_queries": 30, "max_docs": 300,
                "dims": [8], "precisions": ["float32", "int8"]}  # fmt: skip
    report = evaluate(EvalConfig(model=str(student_dir), document_model=str(documents_dir), **settings))
    alone = evaluate(EvalConfig(model=str(student_dir), **settings))
    assert report["beir"] == alone["beir"] and report["beir_pair"]["documents"] == "tiny-bert"
    corpus, queries, qrels = load_beir(str(DATA / "scifact"), "test")
    corpus, queries = subset(corpus, queries, qrels, 30, 300)
    student, documents = (Embedder.load(p, device="cpu") for p in tiny_pair)
    q, d = student.encode(list(queries.values())), documents.encode(list(corpus.values()))
    qv, dv = (
        comparable(postprocess(x, 8, "int8", True, m.int8_scales), "int8")
        for x, m in ((q, student), (d, documents))
    )
    want = retrieval_metrics(qv, dv, list(queries), list(corpus), qrels)
    assert report["beir_pair"]["8-int8"] == pytest.approx(want)
    assert report["beir_pair"]["32"] != report["beir"]["32"]
    teacher = evaluate(EvalConfig(model=str(documents_dir), **settings))["beir"]  # the encoder on its own
    assert report["beir_documents"] == teacher | {"documents": "tiny-bert"}
    kept, full = report["beir_retention"], teacher["32"]["ndcg@10"]
    assert kept == {"width": 32, "teacher_ndcg@10": full,
                    "student_vs_teacher": pytest.approx(report["beir"]["32"]["ndcg@10"] / full),
                    "asym_vs_teacher": pytest.approx(report["beir_pair"]["32"]["ndcg@10"] / full)}  # fmt: skip
    assert kept["student_vs_teacher"] != kept["asym_vs_teacher"]  # the student alone is not the pair
    # the teacher's own figures at full width: the teacher in frame is the teacher turned
    assert full == pytest.approx(
        evaluate(EvalConfig(model=str(tiny_model), **settings))["beir"]["32"]["ndcg@10"]
    )
    with pytest.raises(ValueError, match="not one pair"):
        evaluate(EvalConfig(model=str(tiny_model), document_model=str(documents_dir), **settings))
    # a student trained with a query instruction: its queries get it, the teacher's queries do not (the
    # teacher has no prompt of that name), so the teacher's figures stay its own
    instructed = Embedder.load(student_dir, device="cpu")
    instructed.prompts = {"query": "Represent this question for retrieval: "}
    prompted = evaluate(EvalConfig(model=str(instructed.save(tmp_path / "instructed")),
                                   document_model=str(documents_dir), query_prompt_name="query", **settings))  # fmt: skip
    assert prompted["beir_documents"] == report["beir_documents"] and prompted["beir"] != report["beir"]


def test_the_engine_serves_the_pair_behind_one_name(tiny_pair: tuple[Path, Path], tiny_model: Path) -> None:
    student_dir, documents_dir = tiny_pair
    assert (pair_role(student_dir), pair_role(documents_dir)) == ("query", "document")
    cfg = ServeConfig(model=str(student_dir), document_model=str(documents_dir), model_name="pair")
    engine = ModelEngine(cfg.specs()[0], cfg)
    texts = ["which protein binds the receptor", "a paragraph about receptors and proteins"]
    student, documents = (Embedder.load(p, device="cpu") for p in tiny_pair)

    def embed(**job: object) -> tuple[np.ndarray, str, str]:
        done = asyncio.run(engine.embed(Job(texts=texts, **job)))  # type: ignore[arg-type]
        return done.vectors, done.revision, done.name

    doc, revision, name = embed(input_type="document")
    np.testing.assert_allclose(doc, documents.encode(texts), atol=1e-6)
    assert revision == model_revision(documents_dir) and name == "pair"
    for job in ({"input_type": "query"}, {}, {"prompt_name": "query"}):  # no input_type: the student
        vectors, revision, _ = embed(**job)
        np.testing.assert_allclose(vectors, student.encode(texts), atol=1e-6)
        assert revision == model_revision(student_dir)
    np.testing.assert_allclose(embed(prompt_name="document")[0], doc, atol=1e-6)
    assert not np.allclose(doc, student.encode(texts), atol=1e-3)
    described = engine.describe()
    assert described["frame"] == student.frame and described["document_revision"] == model_revision(
        documents_dir
    )
    # the request bodies carry it: OpenAI's (Cohere's names too) and TEI's
    assert (
        parse_request(b'{"input": "x", "input_type": "search_document"}', Limits())[1].input_type
        == "document"
    )
    assert parse_tei(b'{"inputs": "x", "input_type": "query"}', Limits(), True)[1].input_type == "query"

    # a plain model takes input_type as its prompt's name when it has that prompt, else as nothing
    plain_cfg = ServeConfig(model=str(tiny_model))
    plain = ModelEngine(plain_cfg.specs()[0], plain_cfg)
    vectors = asyncio.run(plain.embed(Job(texts=texts, input_type="document"))).vectors
    np.testing.assert_allclose(vectors, Embedder.load(tiny_model, device="cpu").encode(texts), atol=1e-6)


def test_models_of_other_frames_are_refused_as_a_pair(tiny_pair: tuple[Path, Path], tiny_model: Path) -> None:
    student_dir, documents_dir = tiny_pair
    for model, documents in ((student_dir, tiny_model), (tiny_model, documents_dir)):
        cfg = ServeConfig(model=str(model), document_model=str(documents))
        with pytest.raises(ValueError, match="are not one pair: a pair's models record one frame"):
            ModelEngine(cfg.specs()[0], cfg)


@pytest.mark.usefixtures("ray_local")
def test_the_embed_job_records_the_frame_and_an_incremental_run_keeps_to_it(
    tiny_pair: tuple[Path, Path], tiny_model: Path, scifact_docs: Path, tmp_path: Path
) -> None:
    """The teacher in frame embeds the corpus (the pair's offline half): the output names its frame, in
    the manifest and the Parquet metadata, and what the frame was fitted on as lineage, which a resume
    does not compare; an incremental run with a model of another frame is refused."""
    import dataclasses

    import pyarrow.parquet as pq

    from rayembed.config import EmbedConfig
    from rayembed.embed import embed

    documents = Path(shutil.copytree(tiny_pair[1], tmp_path / "teacher-in-frame"))  # exported unmarked
    frame = Embedder.load(documents, device="cpu").frame
    cfg = EmbedConfig(input=str(scifact_docs), output=str(tmp_path / "v0"), model=str(documents), id_column="_id",
                      progress=False, fragment_bytes=1 << 17)  # fmt: skip
    rows = embed(cfg)["rows"]
    assert "lineage" not in json.loads((tmp_path / "v0" / "_manifest.json").read_text())
    [stopped, *_] = sorted((tmp_path / "v0" / "_committed").glob("*.json"))
    stopped.unlink()  # the run stopped before this fragment committed
    fit = {"rows": 4715, "of": 25000, "source": "corpus"}  # as a corpus run's export records it
    mark_frame_fit(documents, fit)  # the folder exported again since, the same weights and frame
    resumed = embed(cfg)  # the same vectors: resumed, not refused for its new lineage
    assert (resumed["fragments_skipped"], resumed["rows"]) == (resumed["fragments"] - 1, rows)
    embed(cfg := dataclasses.replace(cfg, output=str(tmp_path / "v1")))
    manifest = json.loads((tmp_path / "v1" / "_manifest.json").read_text())
    assert manifest["settings"]["frame"] == frame and manifest["lineage"]["frame_fit"] == fit
    [part, *_] = sorted((tmp_path / "v1").rglob("*.parquet"))
    meta = pq.read_schema(part).metadata
    assert meta[b"rayembed.frame"].decode() == frame and json.loads(meta[b"rayembed.frame_fit"]) == fit
    with pytest.raises(ValueError, match="other settings.*'frame': \\('" + str(frame)):
        embed(dataclasses.replace(cfg, model=str(tiny_model), output=str(tmp_path / "v2"),
                                  incremental_from=str(tmp_path / "v1")))  # fmt: skip


def test_a_prefix_of_a_corpus_fitted_frame_is_flagged_before_embedding(
    tiny_pair: tuple[Path, Path], scifact_docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Axes fitted on one corpus rank other text less well below full width (docs/benchmarks.md): the embed
    job says so when such a prefix is asked for, and not at full width or for axes of the general mix."""
    import dataclasses

    from rayembed.config import EmbedConfig
    from rayembed.embed.job import settings_of

    documents = Path(shutil.copytree(tiny_pair[1], tmp_path / "teacher-in-frame"))
    mark_frame_fit(documents, {"rows": 4715, "of": 25000, "source": "corpus"})
    full = Embedder.load(documents, device="cpu").dim
    cfg = EmbedConfig(
        input=str(scifact_docs), output=str(tmp_path / "out"), model=str(documents), dim=full // 2
    )
    settings_of(cfg)
    assert f"a {full // 2}-d prefix ranks that corpus best" in capsys.readouterr().out
    settings_of(dataclasses.replace(cfg, dim=None))
    mark_frame_fit(documents, {"rows": 22315})  # the general mix's rows
    settings_of(cfg)
    assert "prefix" not in capsys.readouterr().out
