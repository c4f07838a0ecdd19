"""Compaction (`rayembed compact`): a chain of incremental versions folds into one full version that is
exactly the chain's current view, row for row, readable as plain Parquet, and a base for the next night;
a compaction killed before its commit leaves no version, and its rerun gives the same result."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from conftest import DATA
from rayembed.cli import main
from rayembed.config import EmbedConfig
from rayembed.embed import compact as compact_module
from rayembed.embed import embed
from rayembed.embed.versions import current
from test_embed_incremental import _lake

pytestmark = pytest.mark.usefixtures("ray_local")


def _sorted(table: pa.Table) -> pa.Table:
    table = table.select(sorted(table.column_names))
    return table.sort_by("id").replace_schema_metadata(None)


@pytest.fixture(scope="module")
def nights(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, str], dict[str, object]]:
    """Three nights, built once for the module's compactions (which only read them): a full run, then
    changes, additions and deletions (one id deleted, then back). (folder, current rows, embed settings)."""
    import ray

    from rayembed.data.readers import read_jsonl

    if not ray.is_initialized():  # ray_local's cluster (a module fixture cannot ask for that one)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    root = tmp_path_factory.mktemp("nights")
    docs = [d["text"] for _, d in zip(range(60), read_jsonl(DATA / "scifact" / "corpus.jsonl"), strict=False)]
    rows = {str(i): docs[i] for i in range(30)}
    common: dict[str, object] = {"model": str(tiny_model), "id_column": "id", "progress": False}
    embed(EmbedConfig(input=str(_lake(root / "lake1", rows)), output=str(root / "n1"), **common))
    rows |= {"3": docs[40], "31": docs[31], "32": docs[32]}
    del rows["5"], rows["20"]
    embed(EmbedConfig(input=str(_lake(root / "lake2", rows)), output=str(root / "n2"),
                      incremental_from=str(root / "n1"), **common))  # fmt: skip
    rows |= {"5": docs[45], "3": docs[43], "33": docs[33]}  # 5 comes back, 3 changes again
    del rows["31"], rows["7"]
    embed(EmbedConfig(input=str(_lake(root / "lake3", rows)), output=str(root / "n3"),
                      incremental_from=str(root / "n2"), **common))  # fmt: skip
    return root, rows, common


def test_a_compacted_chain_is_its_current_view_and_the_next_nights_base(
    nights: tuple[Path, dict[str, str], dict[str, object]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain, rows, common = nights
    rows = dict(rows)
    walked = current(pafs.LocalFileSystem(), str(chain / "n3"))
    assert sorted(walked.column("id").to_pylist()) == sorted(rows)
    # several id buckets and several output files, so the bounded-memory path is the one tested
    argv = [
        "compact",
        str(chain / "n3"),
        str(tmp_path / "full"),
        "--bucket-ids",
        "7",
        "--rows-per-file",
        "8",
    ]
    assert main(argv) == 0
    assert '"versions": 3' in capsys.readouterr().out
    assert len(list((tmp_path / "full").glob("part-*.parquet"))) == 4  # 30 rows, 8 a file
    plain = pq.read_table(tmp_path / "full")  # any Parquet reader: the `_` files are not data
    assert _sorted(plain).equals(_sorted(walked))
    assert _sorted(current(pafs.LocalFileSystem(), str(tmp_path / "full"))).equals(_sorted(walked))

    assert main(argv) == 2  # already a version: refused without --overwrite
    assert "overwrite" in capsys.readouterr().err
    assert main(["compact", str(chain / "n3"), str(chain / "n1")]) == 2  # a link of the chain
    assert main(["compact", str(chain / "lake1"), str(tmp_path / "x")]) == 2  # not an embed output

    # the next night starts from the compacted version: only what changed since is embedded
    rows |= {"40": "a new document about the lake"}
    night = embed(EmbedConfig(input=str(_lake(tmp_path / "lake4", rows)), output=str(tmp_path / "n4"),
                              incremental_from=str(tmp_path / "full"), **common))  # fmt: skip
    assert night["rows"] == 1 and night["unchanged"] == len(rows) - 1 and night["deleted"] == 0
    assert sorted(current(pafs.LocalFileSystem(), str(tmp_path / "n4")).column("id").to_pylist()) == sorted(
        rows
    )


def test_a_killed_compaction_leaves_no_version_and_its_rerun_finishes(
    nights: tuple[Path, dict[str, str], dict[str, object]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain, rows, common = nights
    real = compact_module._write

    def killed(*args: object, **kwargs: object) -> dict[str, int]:
        real(*args, **kwargs)  # the data files are written, the commit (the manifest) is not
        raise KeyboardInterrupt

    monkeypatch.setattr(compact_module, "_write", killed)
    with pytest.raises(KeyboardInterrupt):
        compact_module.compact(str(chain / "n3"), str(tmp_path / "full"), bucket_ids=5)
    assert (
        list((tmp_path / "full").glob("part-*.parquet"))
        and not (tmp_path / "full" / "_manifest.json").exists()
    )
    with pytest.raises(FileNotFoundError, match="not an embed output"):
        embed(EmbedConfig(input=str(chain / "lake3"), output=str(tmp_path / "n4"),
                          incremental_from=str(tmp_path / "full"), **common))  # fmt: skip
    monkeypatch.setattr(compact_module, "_write", real)
    done = compact_module.compact(str(chain / "n3"), str(tmp_path / "full"), rows_per_file=100)
    assert done["rows"] == len(rows) and done["files"] == 1  # the partial files are gone
    walked = current(pafs.LocalFileSystem(), str(chain / "n3"))
    assert _sorted(pq.read_table(tmp_path / "full")).equals(_sorted(walked))


def test_compaction_on_s3(tiny_model: Path, tmp_path: Path, s3_endpoint: str) -> None:
    """A chain written to S3 compacts into an S3 folder (each part's upload completed, the manifest last)."""
    from rayembed.io import filesystem

    docs = {str(i): f"document {i} about the lake, night one" for i in range(12)}
    common: dict[str, object] = {"model": str(tiny_model), "id_column": "id", "progress": False,
                                 "s3_endpoint_url": s3_endpoint}  # fmt: skip
    root = "s3://rayembed/compact"
    embed(EmbedConfig(input=str(_lake(tmp_path / "l1", docs)), output=f"{root}/n1", **common))
    docs |= {"3": "changed on night two", "12": "new on night two"}
    del docs["4"]
    embed(EmbedConfig(input=str(_lake(tmp_path / "l2", docs)), output=f"{root}/n2",
                      incremental_from=f"{root}/n1", **common))  # fmt: skip
    argv = ["compact", f"{root}/n2", f"{root}/full", "--s3-endpoint-url", s3_endpoint, "--rows-per-file", "5"]
    assert main(argv) == 0
    fs = filesystem(root, s3_endpoint)
    walked = current(fs, "rayembed/compact/n2", endpoint_url=s3_endpoint)
    folded = current(fs, "rayembed/compact/full", endpoint_url=s3_endpoint)
    assert sorted(folded.column("id").to_pylist()) == sorted(docs) and _sorted(folded).equals(_sorted(walked))
    assert (
        len([i for i in fs.get_file_info(pafs.FileSelector("rayembed/compact/full")) if "part-" in i.path])
        == 3
    )


def test_nights_named_by_date_build_on_the_latest_finished_one(tiny_model: Path, tmp_path: Path) -> None:
    """`incremental_from: latest` (jobs/embed-nightly.yaml): the first night is a full run; each next one
    builds on the newest *finished* version beside its output (a night killed before its end is passed
    over), a weekly compaction included (`rayembed compact <folder>/latest <folder>/{date}-full`)."""
    import time

    lake = tmp_path / "lake-vectors"
    docs = {str(i): f"paragraph {i} of the lake" for i in range(10)}
    common: dict[str, object] = {"model": str(tiny_model), "id_column": "id", "progress": False,
                                 "incremental_from": "latest"}  # fmt: skip

    def night(name: str) -> dict[str, object]:
        return embed(
            EmbedConfig(input=str(_lake(tmp_path / f"in-{name}", docs)), output=str(lake / name), **common)
        )

    first = night("2026-12-01")
    assert first["rows"] == 10 and "incremental_from" not in first  # nothing before it: a full run
    docs["3"] = "changed on the second night"
    second = night("2026-12-02")
    assert second["incremental_from"] == str(lake / "2026-12-01") and second["rows"] == 1
    (lake / "2026-12-03").mkdir()  # a night killed before its end: a manifest, no summary
    (lake / "2026-12-03" / "_manifest.json").write_text((lake / "2026-12-02" / "_manifest.json").read_text())
    docs["11"] = "new on the fourth night"
    fourth = night("2026-12-04")
    assert fourth["incremental_from"] == str(lake / "2026-12-02") and fourth["rows"] == 1
    assert main(["compact", str(lake / "latest"), str(lake / "2026-12-04-full")]) == 0
    del docs["0"]
    fifth = night("2026-12-05")
    assert fifth["incremental_from"] == str(lake / "2026-12-04-full") and fifth["deleted"] == 1
    view = current(pafs.LocalFileSystem(), str(lake / "2026-12-05"))
    assert sorted(view.column("id").to_pylist()) == sorted(docs)
    today = EmbedConfig(input=str(tmp_path / "in-2026-12-05"), output=str(lake / "{date}"), **common)
    assert today.output == str(lake / time.strftime("%Y-%m-%d", time.gmtime()))
