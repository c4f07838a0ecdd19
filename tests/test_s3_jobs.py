"""Every job takes s3:// wherever it takes a path: prepare's sources and outputs, and eval's model, BEIR
folder, STS file and report, on the loopback S3 server; each gives exactly what the same job gives on
local files. (Train and embed on S3: test_train_multinode.py, test_embed.py; merge's checkpoints and output
on S3: test_train_multinode.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DATA
from rayembed.config import EvalConfig, PrepareConfig
from rayembed.data.prepare import prepare_job
from rayembed.eval.job import evaluate
from rayembed.io import open_file, s3, upload_dir
from rayembed.model import Embedder

ROOT = "s3://rayembed/s3jobs"


@pytest.fixture(scope="module")
def shared_on_s3(s3_endpoint: str) -> str:
    """The shared data folders the prepare kinds read, copied to S3 as a user's bucket would hold them."""
    # (stsbenchmark's .tar.gz stays behind: written through s3fs to moto, an object named *.gz is stored
    # wrapped in one more gzip layer, 133 bytes more than the file; the same bytes named *.bin are not)
    for name in (
        "wikitext-2",
        "stsbenchmark/stsbenchmark",
        "flagembedding-examples",
        "snli-esnli",
        "scifact",
    ):
        upload_dir(DATA / name, f"{ROOT}/data/{name}", s3_endpoint)
    return f"{ROOT}/data"


def _s3_text(uri: str, endpoint: str) -> str:
    with open_file(uri, "r", endpoint) as f:
        return str(f.read())


@pytest.mark.parametrize(
    "kind, source, settings",
    [
        (
            "general",
            "",
            {"limit": 3000, "sentences": 500, "corpus": "scifact/corpus.jsonl", "corpus_rows": 50},
        ),
        ("snli", "snli-esnli", {"limit": 300}),
        ("beir", "scifact", {"split": "test", "limit": 100}),
        ("articles", "", {"limit": 5}),
    ],
)
def test_prepare_reads_and_writes_s3_as_it_does_local_files(
    kind: str, source: str, settings: dict[str, object], shared_on_s3: str, s3_endpoint: str, tmp_path: Path
) -> None:
    local = {**settings, "corpus": str(DATA / str(settings["corpus"])) if "corpus" in settings else None}
    mine = prepare_job(
        PrepareConfig(kind=kind, source=str(DATA / source), output=str(tmp_path / "out.jsonl"), **local)  # type: ignore[arg-type]
    )
    remote = {**settings, "corpus": f"{shared_on_s3}/{settings['corpus']}" if "corpus" in settings else None}
    out = f"{ROOT}/prepared/{kind}.jsonl"
    theirs = prepare_job(
        PrepareConfig(
            kind=kind, source=f"{shared_on_s3}/{source}".rstrip("/"), output=out, s3_endpoint_url=s3_endpoint,
            **remote,  # type: ignore[arg-type]
        )
    )  # fmt: skip
    assert theirs["rows"] == mine["rows"] > 0 and theirs.get("sources") == mine.get("sources")
    assert _s3_text(out, s3_endpoint) == (tmp_path / "out.jsonl").read_text(encoding="utf-8")


def test_prepare_nli_collection_and_random_model_to_s3(
    shared_on_s3: str, s3_endpoint: str, tmp_path: Path
) -> None:
    local = prepare_job(
        PrepareConfig(kind="nli_retrieval", source=str(DATA / "snli-esnli"), output=str(tmp_path / "nli"))
    )
    remote = prepare_job(
        PrepareConfig(kind="nli_retrieval", source=f"{shared_on_s3}/snli-esnli", output=f"{ROOT}/nli",
                      s3_endpoint_url=s3_endpoint)
    )  # fmt: skip
    assert {k: v for k, v in remote.items() if k != "output"} == {
        k: v for k, v in local.items() if k != "output"
    }
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        assert _s3_text(f"{ROOT}/nli/{name}", s3_endpoint) == (tmp_path / "nli" / name).read_text(
            encoding="utf-8"
        )

    made = prepare_job(
        PrepareConfig(
            kind="random_model", family="qwen3", output=f"{ROOT}/qwen3", s3_endpoint_url=s3_endpoint
        )
    )
    assert made["output"] == f"{ROOT}/qwen3"
    from rayembed.model import resolve_model_path

    model = Embedder.load(resolve_model_path(f"{ROOT}/qwen3", s3_endpoint), device="cpu")
    assert model.encode(["a random decoder from S3"]).shape == (1, model.dim)


def test_eval_from_s3_equals_eval_from_local_files(
    tiny_model: Path, shared_on_s3: str, s3_endpoint: str, tmp_path: Path
) -> None:
    upload_dir(tiny_model, f"{ROOT}/tiny", s3_endpoint)
    sizes = {"max_queries": 20, "max_docs": 200, "dims": [16], "precisions": ["float32", "int8"]}
    local = evaluate(
        EvalConfig(
            model=str(tiny_model), beir_dir=str(DATA / "scifact"),
            sts_file=str(DATA / "stsbenchmark" / "stsbenchmark" / "sts-test.csv"), **sizes,  # type: ignore[arg-type]
        )
    )  # fmt: skip
    out = f"{ROOT}/eval/report.json"
    remote = evaluate(
        EvalConfig(
            model=f"{ROOT}/tiny", beir_dir=f"{shared_on_s3}/scifact/",
            sts_file=f"{shared_on_s3}/stsbenchmark/stsbenchmark/sts-test.csv", output=out,
            s3_endpoint_url=s3_endpoint, **sizes,  # type: ignore[arg-type]
        )
    )  # fmt: skip
    assert remote == local and remote["beir"]["set"] == "scifact" and remote["beir"]["queries"] == 20
    assert json.loads(_s3_text(out, s3_endpoint)) == remote


def test_missing_s3_inputs_are_clear_errors(shared_on_s3: str, s3_endpoint: str) -> None:
    with pytest.raises(FileNotFoundError, match="not a BEIR folder"):
        evaluate(EvalConfig(beir_dir=f"{ROOT}/nowhere", sts_file=None, s3_endpoint_url=s3_endpoint))
    with pytest.raises(FileNotFoundError, match="sts-dev.csv does not exist"):
        evaluate(
            EvalConfig(beir_dir=None, sts_file=f"{shared_on_s3}/sts-dev.csv", s3_endpoint_url=s3_endpoint)
        )
    with pytest.raises(ValueError, match="no JSONL file there"):
        prepare_job(
            PrepareConfig(kind="general", source=shared_on_s3, corpus=f"{ROOT}/no-corpus", output=f"{ROOT}/x.jsonl",
                          s3_endpoint_url=s3_endpoint)
        )  # fmt: skip
    assert not s3(s3_endpoint).exists("rayembed/s3jobs/x.jsonl")  # nothing half-written
