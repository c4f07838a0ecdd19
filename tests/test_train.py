"""Train job end to end: Ray Train, 2 CPU workers, real DeepSpeed ZeRO (gloo), real SNLI rows."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tiny
from rayembed.config import SHARED_DATA, TrainConfig
from rayembed.model import Embedder
from rayembed.model.layout import pair_role
from rayembed.train import train

pytestmark = pytest.mark.usefixtures("ray_local")
DATA = Path(SHARED_DATA)
PROBE = [
    "A dog runs across the field.",
    "Two people are talking in a cafe.",
    "The cell membrane is permeable.",
]
ST_FILES = ["model.safetensors", "config.json", "modules.json", "1_Pooling/config.json", "tokenizer.json"]


def _changed(base: Path, trained: Path) -> float:
    a = Embedder.load(base, device="cpu").encode(PROBE)
    b = Embedder.load(trained, device="cpu").encode(PROBE)
    return float(np.abs(a - b).max())


def test_contrastive_zero2_train_then_resume(tiny_model: Path, snli_triples: Path, tmp_path: Path) -> None:
    def cfg(max_steps: int, pca_rows: int = 64, workers: int = 2) -> TrainConfig:
        return TrainConfig(
            data=str(snli_triples),
            output_dir=str(tmp_path / "run"),
            model=str(tiny_model),
            num_workers=workers,
            zero_stage=2,
            loss="symmetric_infonce",
            learnable_scale=True,
            scale_lr=0.05,
            negative_column="negative",
            matryoshka_dims=[32, 16],
            batch_size=8,
            max_length=32,
            lr=1e-3,
            max_steps=max_steps,
            checkpoint_every=1,
            pca_rotation=True,  # axes of the model's own embeddings of the first pca_rows rows' texts
            pca_rows=pca_rows,
            eval={"beir_dir": str(DATA / "scifact"), "max_queries": 10, "max_docs": 50, "sts_file": None},
        )

    first = train(cfg(2))
    assert first["step"] == 2 and first["resumed_from"] == 0 and np.isfinite(first["loss"])
    ckpt = Path(first["checkpoint"])
    assert (ckpt / "latest").read_text().strip() == "ds"
    for name in (
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ):
        assert (ckpt / "ds" / name).is_file(), name  # one optimizer partition per worker: ZeRO-2 sharding
    # The learnable scale: stepped every step, reported, and kept in the checkpoint's client state.
    scales = [h["scale"] for h in json.loads((ckpt / "history.json").read_text())]
    assert len(scales) == 2 and abs(np.log(scales[0] / 20.0)) == pytest.approx(0.05, rel=0.05)
    client = torch.load(ckpt / "ds" / "mp_rank_00_model_states.pt", weights_only=False)
    assert float(client["loss"]["log_scale"].exp()) == pytest.approx(scales[1], rel=1e-5)
    model_dir = Path(first["output_dir"])
    assert all((model_dir / f).is_file() for f in ST_FILES)
    assert _changed(tiny_model, model_dir) > 1e-4
    exported = Embedder.load(model_dir, device="cpu")
    assert exported.max_length == 64  # training's max_length=32 is not exported
    # int8 scales calibrated on the first rows' texts, at full width and each Matryoshka width.
    assert set(exported.int8_scales) == {32, 16} and min(exported.int8_scales.values()) > 127
    assert json.loads((model_dir / "int8_scales.json").read_text())["scales"].keys() == {"16", "32"}

    rotation = torch.from_numpy(np.load(ckpt / "pca_rotation.npy"))  # before keep_checkpoints prunes it
    from rayembed.model.pca import frame_id

    assert exported.frame == frame_id(rotation.numpy())  # the axes' id (rayembed.json): what merge compares
    assert first["pca_fit"] == {"rows": 64}  # what they were fitted on, in the report and the folder
    assert json.loads((model_dir / "rayembed.json").read_text())["frame_fit"] == {"rows": 64}
    # What the driver of a resumed run reads instead of fitting the axes again.
    from rayembed.train.job import checkpoint_rotation

    kept_axes = checkpoint_rotation(str(tmp_path / "run" / "checkpoints"), "rayembed-train")
    assert kept_axes is not None and np.array_equal(kept_axes, rotation.numpy())
    assert checkpoint_rotation(str(tmp_path / "run" / "checkpoints"), "another-run") is None
    # Same run name and storage: the rerun resumes at step 2 and trains only steps 3-4, keeping the
    # rotation it started with (this driver fits other axes, from more rows). It runs on one worker: the
    # two ZeRO-2 partitions are loaded through DeepSpeed's universal form (what elastic training does
    # after a node loss; tests/test_train_elastic.py removes a node under ZeRO-3).
    second = train(cfg(4, pca_rows=200, workers=1))
    assert second["resumed_from"] == 2 and second["step"] == 4
    # ... and says what they were fitted on: the first start's 64 rows (its run record), not this one's 200
    assert second["pca_fit"] == {"rows": 64}
    assert json.loads((Path(second["output_dir"]) / "rayembed.json").read_text())["frame_fit"] == {"rows": 64}
    other = build_tiny(tmp_path / "other", seed=5)  # same shape, other weights: refused, not resumed
    with pytest.raises(ValueError, match="started with other settings .*model"):
        train(dataclasses.replace(cfg(5), model=str(other)))
    torch.testing.assert_close(
        torch.from_numpy(np.load(Path(second["checkpoint"]) / "pca_rotation.npy")), rotation
    )
    from rayembed.io import read_dataset
    from rayembed.train.job import fit_rotation, rotation_rows

    wider = cfg(4, pca_rows=200)
    refit = fit_rotation(
        wider, rotation_rows(wider, read_dataset(str(snli_triples)).take_batch(200, batch_format="numpy"))[0]
    )
    assert not np.allclose(np.abs(refit), np.abs(rotation.numpy()), atol=1e-2)

    # The run report: per-step history carried across the resume, eval before/after, a plot.
    report_dir = Path(second["report"])
    report = json.loads((report_dir / "report.json").read_text())
    assert [h["step"] for h in report["history"]] == [1, 2, 3, 4]
    assert [h["workers"] for h in report["history"]] == [2, 2, 1, 1]
    resumed = report["history"][2]["scale"]  # one Adam step (<= ~lr in log) from where step 2 left it
    assert abs(np.log(resumed / scales[1])) <= 0.05 * 1.05 and resumed != pytest.approx(20.0, rel=1e-3)
    assert all(np.isfinite(h["loss"]) for h in report["history"])
    assert set(report["eval"]) == {"before", "after"}
    assert 0 <= report["eval"]["after"]["beir"]["32"]["ndcg@10"] <= 1
    assert report["eval"]["before"]["beir"]["docs"] == 50
    assert "| after |" in (report_dir / "report.md").read_text()
    assert (report_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(second["checkpoint"]) != ckpt
    kept = [
        p for p in (tmp_path / "run" / "checkpoints" / "rayembed-train").glob("checkpoint_*") if p.is_dir()
    ]
    assert len(kept) == 2  # keep_checkpoints

    # Soup of the run's two kept DeepSpeed checkpoints (ZeRO shards consolidated per checkpoint).
    from rayembed.config import MergeConfig
    from rayembed.train.merge import merge, state_of

    soup = merge(
        MergeConfig(models=[str(p) for p in kept], base=str(tiny_model), output=str(tmp_path / "soup"))
    )
    states = [state_of(str(p), Embedder.load(tiny_model, device="cpu")) for p in kept]
    merged = Embedder.load(soup["output"], device="cpu").state_dict()
    for k, v in states[0].items():
        torch.testing.assert_close(merged[k], (v + states[1][k]) / 2)
    assert Embedder.load(soup["output"], device="cpu").frame == exported.frame  # the run's axes
    # A checkpoint and the run's export (the base here) share those axes: merged, not refused.
    both = [str(kept[0]), str(second["output_dir"])]
    mixed = merge(MergeConfig(models=both, base=str(second["output_dir"]), output=str(tmp_path / "mixed")))
    assert Embedder.load(mixed["output"], device="cpu").frame == exported.frame

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(second["output_dir"], device="cpu").encode(PROBE)
    np.testing.assert_allclose(Embedder.load(second["output_dir"], device="cpu").encode(PROBE), st, atol=1e-5)


def test_distill_zero3_gradcache_from_pipeline_teacher(
    tiny_model: Path, scifact_docs: Path, tmp_path: Path
) -> None:
    """Teacher embeddings come from the batch pipeline (text passed through), not from the loop;
    the student is the teacher's second layer alone (student_layers), with a PCA-rotated output. The
    teacher named beside its column is exported in the student's frame: the index-compatible pair."""
    from rayembed.config import EmbedConfig
    from rayembed.embed import embed

    teacher_out = tmp_path / "teacher"
    embed(
        EmbedConfig(
            input=str(scifact_docs), output=str(teacher_out), model=str(tiny_model), id_column="_id",
            passthrough_columns=["text"], progress=False,
        )
    )  # fmt: skip
    result = train(
        TrainConfig(
            data=str(teacher_out),
            output_dir=str(tmp_path / "distill"),
            model=str(tiny_model),
            student_layers=[1],
            loss="distill",
            text_column="text",
            teacher_column="embedding",
            teacher=str(tiny_model),  # the model that embedded the column: not run, exported in frame
            num_workers=2,
            zero_stage=3,
            batch_size=8,
            grad_cache_chunk=4,
            forward_tokens=64,  # each 4-row chunk in length-sorted pieces of <= 64 padded tokens
            shuffle_buffer=64,
            max_length=32,
            lr=1e-3,
            max_steps=2,
            checkpoint_every=2,
            pca_rotation=True,
            matryoshka_dims=[32, 8],
            tracking={"backend": "wandb", "uri": str(tmp_path / "wandb"), "experiment": "distill"},
            eval={
                "beir_dir": None,
                "sts_file": None,
                "corpus": str(scifact_docs),
                "corpus_docs": 200,
                "pseudo_queries": 50,
            },  # the label-free retention check on the corpus (teacher: the run's)
        )
    )
    ckpt = Path(result["checkpoint"]) / "ds"
    # tracked in W&B (offline): the driver's params, rank 0's steps with each Matryoshka term of the loss
    # and its tokens/s, the export's eval-free summary and model, each process a segment of the one run
    run_id = result["tracking"]["run_id"]
    segments = sorted((tmp_path / "wandb" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    logged = b"".join(p.read_bytes() for p in segments)
    assert len(segments) == 3, segments  # driver, rank 0, export
    assert b"zero_stage" in logged and b"loss/distill@32" in logged and b"loss/distill@8" in logged
    assert b"tokens_per_s_per_worker" in logged and f"{run_id}-model-step-2".encode() in logged
    assert result["tracking"]["failed"] == result["tracking"]["dropped"] == 0
    for rank in (0, 1):  # ZeRO-3: parameters too are partitioned per worker
        assert (ckpt / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").is_file()
        assert (ckpt / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
    assert result["step"] == 2 and np.isfinite(result["loss"]) and result["peak_mem_mb"] > 0
    # pca_rotation: the axes of the teacher's vectors, kept in the checkpoint; the export has them as a
    # sentence-transformers Dense layer, started at those axes and trained since.
    import pyarrow.parquet as pq

    from rayembed.model.pca import principal_axes

    teacher_vecs = np.stack(pq.read_table(teacher_out, columns=["embedding"])["embedding"].to_numpy(False))
    axes = np.load(Path(result["checkpoint"]) / "pca_rotation.npy")
    np.testing.assert_allclose(np.abs(axes.T @ principal_axes(teacher_vecs)), np.eye(32), atol=1e-3)
    exported = Embedder.load(result["output_dir"], device="cpu")
    assert exported.backbone.config.num_hidden_layers == 1 and exported.projection is not None
    start = Embedder.load(tiny_model, device="cpu").keep_layers([1]).rotate(axes)
    moved = float(np.abs(exported.projection.weight.detach().numpy() - axes.T).max())
    assert 1e-4 < moved < 0.1  # trained from the axes, not far
    assert float(np.abs(exported.encode(PROBE) - start.encode(PROBE)).max()) > 1e-4  # trained away from init
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(result["output_dir"], device="cpu").encode(PROBE)
    np.testing.assert_allclose(exported.encode(PROBE), st, atol=1e-5)
    # the pair: the teacher turned by the run's axes, one frame, roles marked, int8 at the same widths
    documents = Path(result["pair"]["document_model"])
    assert (
        documents == tmp_path / "distill" / "teacher-in-frame"
        and f"{run_id}-teacher-in-frame-step-2".encode() in logged
    )
    in_frame = Embedder.load(documents, device="cpu")
    assert in_frame.frame == exported.frame == result["pair"]["frame"] is not None
    assert (pair_role(Path(result["output_dir"])), pair_role(documents)) == ("query", "document")
    assert sorted(in_frame.int8_scales) == sorted(exported.int8_scales) == [8, 32]
    turned = Embedder.load(tiny_model, device="cpu").encode(PROBE) @ axes
    np.testing.assert_allclose(in_frame.encode(PROBE), turned, atol=1e-5)
    # the retention check ran in the export's eval, through the pair too, into the report and W&B
    report = json.loads((tmp_path / "distill" / "report" / "report.json").read_text())
    kept = report["eval"]["after"]["retention"]
    assert (
        kept["pseudo_queries"] == 50 and kept["32"]["asymmetric"]["estimate"] > 0 and b"retention" in logged
    )
    shown = (tmp_path / "distill" / "report" / "report.md").read_text()
    row = f"| 32 | asymmetric | **{kept['32']['asymmetric']['estimate']}** | {kept['32']['asymmetric']['cloze']} |"
    assert "## Retention on the corpus, label-free (after)" in shown and row in shown


def test_gist_with_in_loop_guide_gathers_across_workers(
    tiny_model: Path, snli_triples: Path, tmp_path: Path
) -> None:
    """GIST: documents and the guide's document embeddings are gathered from both workers (GradCache),
    with a 2D Matryoshka sub-model trained alongside."""
    from conftest import build_tiny

    student = build_tiny(tmp_path / "student", seed=5)
    result = train(
        TrainConfig(
            data=str(snli_triples), output_dir=str(tmp_path / "gist"), model=str(student),
            loss="gist", teacher=str(tiny_model), gist_margin=0.05, matryoshka_dims=[32, 16],
            matryoshka_2d=[[1, 16]],  # and the first layer alone at width 16 (Starbucks 2D Matryoshka)
            num_workers=2, zero_stage=2, batch_size=8, grad_cache_chunk=4, max_length=32, lr=1e-3,
            max_steps=2, checkpoint_every=2,
        )
    )  # fmt: skip
    assert result["step"] == 2 and np.isfinite(result["loss"]) and result["loss"] > 0
    assert _changed(student, Path(result["output_dir"])) > 1e-4


def test_missing_column_and_unknown_model_fail_fast(
    tiny_model: Path, snli_triples: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['nope'\]"):
        train(
            TrainConfig(
                data=str(snli_triples),
                output_dir=str(tmp_path),
                model=str(tiny_model),
                negative_column="nope",
            )
        )
    with pytest.raises(FileNotFoundError, match="not found"):
        train(TrainConfig(data=str(snli_triples), output_dir=str(tmp_path), model=str(tmp_path / "missing")))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no training rows in .*empty.jsonl"):
        train(
            TrainConfig(data=str(tmp_path / "empty.jsonl"), output_dir=str(tmp_path), model=str(tiny_model))
        )
    with pytest.raises(ValueError, match="zero_stage"):
        TrainConfig(data="x", output_dir="y", zero_stage=4)


def test_training_rows_read_without_progress_bars(snli_triples: Path, tmp_path: Path) -> None:
    """The run reports its own steps: its datasets (plain and FlagEmbedding files) show no Ray Data progress
    bars in workers' logs, and other datasets of the same process keep theirs."""
    import ray.data

    from rayembed.train.job import dataset

    flag = str(Path(SHARED_DATA) / "flagembedding-examples" / "retrieval")
    for data, fmt, rows in ((str(snli_triples), "columns", 200), (flag, "flagembedding", 30)):
        cfg = TrainConfig(data=data, output_dir=str(tmp_path), data_format=fmt)
        ds = dataset(cfg)
        assert ds.context.enable_progress_bars is False and ds.select_columns(["query"]).count() == rows
    assert ray.data.DataContext.get_current().enable_progress_bars is True
