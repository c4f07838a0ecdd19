"""The training objective without Ray: a teacher run in the loop and the same teacher's embeddings
given as a column make the same distillation loss; contrastive towers follow the configured columns."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rayembed.config import TrainConfig
from rayembed.model import Embedder
from rayembed.train.objective import objective

TEXTS = ["a dog runs", "a cat sleeps", "rain falls on the roof", "two men talk"]


def test_teacher_column_equals_teacher_in_loop(tiny_model: Path) -> None:
    from conftest import build_tiny

    teacher = Embedder.load(tiny_model, device="cpu").eval()
    student = Embedder.load(build_tiny(tiny_model.parent / "student-obj", seed=3), device="cpu").eval()
    column = teacher.encode(TEXTS)  # what `rayembed embed` writes for the teacher
    base = dict(data="x", output_dir="y", loss="distill", matryoshka_dims=[32, 16])
    batch = {"text": np.array(TEXTS, dtype=object), "embedding": np.array(list(column), dtype=object)}
    cpu = torch.device("cpu")
    towers, in_loop = objective(TrainConfig(**base, teacher=str(tiny_model)), batch, teacher, cpu)
    towers_col, from_column = objective(TrainConfig(**base, teacher_column="embedding"), batch, None, cpu)
    assert towers == towers_col == [TEXTS]
    reps = [student(**student.tokenize(TEXTS))]
    a, b = in_loop(reps), from_column(reps)
    assert float(a.detach()) > 0
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_contrastive_towers_and_config_checks() -> None:
    cfg = TrainConfig(data="x", output_dir="y", negative_column="neg", batch_size=8, grad_cache_chunk=4)
    batch = {
        "query": np.array(["q1", "q2"]),
        "positive": np.array(["p1", "p2"]),
        "neg": np.array(["n1", "n2"]),
    }
    towers, loss_of = objective(cfg, batch, None, torch.device("cpu"))
    assert towers == [["q1", "q2"], ["p1", "p2"], ["n1", "n2"]]
    q = torch.eye(2, 8)
    assert float(loss_of([q, q, -q])) < float(loss_of([q, q.flip(0), -q]))  # matching pairs score lower
    with pytest.raises(ValueError, match="grad_cache_chunk must divide"):
        TrainConfig(data="x", output_dir="y", batch_size=8, grad_cache_chunk=3)
    with pytest.raises(ValueError, match="teacher model or a teacher_column"):
        TrainConfig(data="x", output_dir="y", loss="distill")


def test_spread_out_weight_adds_the_regulariser() -> None:
    from rayembed.train.losses import InfoNCE
    from rayembed.train.regularizers import SpreadOut

    batch = {"query": np.array(["q1", "q2", "q3"]), "positive": np.array(["p1", "p2", "p3"])}
    q, d = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), torch.randn(3, 8)
    plain = objective(TrainConfig(data="x", output_dir="y"), batch, None, torch.device("cpu"))[1]
    spread = objective(
        TrainConfig(data="x", output_dir="y", spread_out_weight=0.5), batch, None, torch.device("cpu")
    )[1]
    torch.testing.assert_close(plain([q, d]), InfoNCE(20.0)(q, d))
    torch.testing.assert_close(spread([q, d]), InfoNCE(20.0)(q, d) + 0.5 * SpreadOut()(q, d))
    assert float(SpreadOut()(q, d)) > 0


PAIRS = {"query": np.array(TEXTS[:2] * 2, dtype=object), "positive": np.array(TEXTS[2:] * 2, dtype=object)}


@pytest.mark.parametrize("loss", ["gist", "score_distill"])
def test_guided_losses_use_the_teacher_in_the_loop_on_full_width(loss: str, tiny_model: Path) -> None:
    from rayembed.train.regularizers import GISTLoss, ScoreDistill

    teacher = Embedder.load(tiny_model, device="cpu").eval()
    cfg = TrainConfig(
        data="x", output_dir="y", loss=loss, teacher=str(tiny_model), matryoshka_dims=[32, 16],
        scale=10.0, gist_margin=0.05,
    )  # fmt: skip
    towers, loss_of = objective(cfg, PAIRS, teacher, torch.device("cpu"))
    assert towers == [list(PAIRS["query"]), list(PAIRS["positive"])]
    gq, gd = teacher.embed_texts(towers[0]).detach(), teacher.embed_texts(towers[1]).detach()
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    if loss == "gist":
        fn = GISTLoss(scale=10.0, margin=0.05)
        want = fn(q, d, gq, gd) + fn(q[:, :16], d[:, :16], gq, gd)  # the guide is never sliced
    else:
        scores = 10.0 * F.normalize(gq, dim=-1) @ F.normalize(gd, dim=-1).T
        fn2 = ScoreDistill(temperature=1.0, scale=10.0)
        want = fn2(q, d, scores) + fn2(q[:, :16], d[:, :16], scores)
    torch.testing.assert_close(loss_of([q, d]), want)
    assert float(want) > 0


def test_guided_and_learnable_scale_config_checks() -> None:
    with pytest.raises(ValueError, match="needs a teacher model"):
        TrainConfig(data="x", output_dir="y", loss="gist")
    with pytest.raises(ValueError, match="no negative_column"):
        TrainConfig(data="x", output_dir="y", loss="score_distill", teacher="t", negative_column="n")
    with pytest.raises(ValueError, match="learnable_scale needs loss=symmetric_infonce"):
        TrainConfig(data="x", output_dir="y", learnable_scale=True)


def test_learnable_scale_steps_with_its_own_optimizer_and_round_trips() -> None:
    from rayembed.train.objective import LossState, build_loss

    cfg = TrainConfig(data="x", output_dir="y", loss="symmetric_infonce", learnable_scale=True, scale=2.0)
    state = LossState(build_loss(cfg), lr=0.1)
    assert state.metrics() == {"scale": pytest.approx(2.0)}
    q = torch.eye(4, 8)
    _, loss_of = objective(cfg, {"query": np.array(["a"] * 4), "positive": np.array(["b"] * 4)}, None,
                           torch.device("cpu"), state.loss_fn)  # fmt: skip
    loss_of([q, q]).backward()  # perfect pairs: a larger scale lowers the loss
    state.step()
    assert state.metrics()["scale"] == pytest.approx(2.0 * np.exp(0.1), rel=1e-3)  # Adam's first step: lr
    again = LossState(build_loss(cfg), lr=0.1)
    again.load_state_dict(state.state_dict())
    assert again.metrics() == state.metrics()
    fixed = LossState(build_loss(TrainConfig(data="x", output_dir="y")), lr=0.1)
    fixed.step()  # nothing to step
    assert fixed.state_dict() == {} and fixed.metrics() == {}


def test_2d_matryoshka_adds_each_sub_models_loss_at_its_width() -> None:
    from rayembed.train.losses import InfoNCE, matryoshka

    cfg = TrainConfig(data="x", output_dir="y", matryoshka_dims=[32, 16], matryoshka_2d=[[1, 8]])
    batch = {"query": np.array(["q1", "q2", "q3"]), "positive": np.array(["p1", "p2", "p3"])}
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g)  # [full 32 | first layer 32]
    loss_of = objective(cfg, batch, None, torch.device("cpu"))[1]
    loss = InfoNCE(20.0)
    want = matryoshka(loss, [32, 16], None, q[:, :32], d[:, :32]) + loss(q[:, 32:40], d[:, 32:40])
    torch.testing.assert_close(loss_of([q, d]), want)
    with pytest.raises(ValueError, match="matryoshka_2d must be"):
        TrainConfig(data="x", output_dir="y", matryoshka_2d=[[2]])


def test_dropout_setting_reaches_every_dropout_of_encoders_and_decoders(
    tiny_model: Path, tiny_decoder: Callable[..., Path]
) -> None:
    from rayembed.train.start import starting_model, trainable_model

    def rates(model: Embedder) -> set[float]:  # the backbone's own (LoRA's dropout apart)
        own = [m for n, m in model.backbone.named_modules() if "lora_" not in n]
        layers = {m.p for m in own if isinstance(m, torch.nn.Dropout)}
        return layers | {m.attention_dropout for m in own if hasattr(m, "attention_dropout")}

    bert = TrainConfig(data="x", output_dir="y", model=str(tiny_model))
    assert rates(trainable_model(bert, starting_model(bert))) == {0.1}  # null: the model's own
    for model in (tiny_model, tiny_decoder("qwen3")):
        cfg = TrainConfig(data="x", output_dir="y", model=str(model), dropout=0.2, lora_r=4)
        trained = trainable_model(cfg, starting_model(cfg))
        assert rates(trained) == {0.2}, model  # BERT's 0.1 and the decoder's 0.0 alike
        lora = {m.p for n, m in trained.backbone.named_modules() if "lora_dropout" in n and hasattr(m, "p")}
        assert lora == {0.05}  # LoRA keeps its own lora_dropout
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        TrainConfig(data="x", output_dir="y", dropout=1.0)


def test_int8_calibration_takes_the_first_texts_row_by_row(tiny_model: Path) -> None:
    from rayembed.model.vectors import calibrate_int8
    from rayembed.train.export import calibrate
    from rayembed.train.job import calibration_texts, row_texts

    cfg = TrainConfig(data="x", output_dir="y", negative_column="negative", matryoshka_dims=[32, 16],
                      int8_calibration_texts=5)  # fmt: skip
    rows = {c: np.array([f"{c} {i}" for i in range(4)]) for c in ("query", "positive", "negative")}
    assert row_texts(cfg, rows)[:4] == ["query 0", "positive 0", "negative 0", "query 1"]
    model = Embedder.load(tiny_model, device="cpu")
    assert calibration_texts(cfg, rows) == row_texts(cfg, rows)[:5]
    calibrate(cfg, model, calibration_texts(cfg, rows))
    expected = calibrate_int8(model.encode(row_texts(cfg, rows)[:5]), [32, 16])
    assert model.int8_scales == expected and set(expected) == {32, 16}
    off = Embedder.load(tiny_model, device="cpu")
    none = TrainConfig(data="x", output_dir="y", int8_calibration_texts=0)
    calibrate(none, off, calibration_texts(none, rows))
    assert off.int8_scales == {}
    with pytest.raises(ValueError, match="int8_calibration_texts must be 0"):
        TrainConfig(data="x", output_dir="y", int8_calibration_texts=1)


def test_export_options_and_whether_a_node_fits_them() -> None:
    from rayembed.train.export import export_fits, export_options

    cpu = TrainConfig(data="x", output_dir="y")
    gpu = TrainConfig(data="x", output_dir="y", use_gpu=True)
    big = TrainConfig(
        data="x", output_dir="y", export_resources={"num_cpus": 8, "memory": 64e9, "resources": {"export": 1}}
    )
    assert export_options(cpu) == {"num_cpus": 2, "num_gpus": 0}  # the two workers' CPUs, free by then
    assert export_options(gpu) == {"num_cpus": 1, "num_gpus": 1}  # one GPU worker's
    assert export_options(big) == {"num_cpus": 8, "num_gpus": 0, "memory": 64e9, "resources": {"export": 1}}
    head = {"Alive": True, "Resources": {"CPU": 4.0, "memory": 16e9}}
    wide = TrainConfig(data="x", output_dir="y", num_workers=8, cpus_per_worker=2)
    assert (
        export_options(wide)["num_cpus"] == 16 and export_options(wide, [head])["num_cpus"] == 4
    )  # a node's
    gpus = {"Alive": True, "Resources": {"CPU": 64.0, "GPU": 8.0, "memory": 512e9}}
    large = {"Alive": True, "Resources": {"CPU": 16.0, "memory": 256e9, "export": 1.0}}
    assert export_fits(export_options(cpu), [head]) and not export_fits(export_options(gpu), [head])
    assert export_fits(export_options(gpu), [head, gpus])
    assert not export_fits(export_options(big), [head, gpus]) and export_fits(
        export_options(big), [head, large]
    )
    assert not export_fits(export_options(big), [head, large | {"Alive": False}])


def test_each_term_of_the_loss_is_recorded_and_they_add_up_to_it() -> None:
    """What the tracker logs as loss/<term>: each Matryoshka width, each 2D sub-model and the spread-out
    regulariser, unweighted, adding up (with their weights) to the loss that is trained."""
    from rayembed.train.losses import InfoNCE
    from rayembed.train.regularizers import SpreadOut

    cfg = TrainConfig(data="x", output_dir="y", matryoshka_dims=[32, 16], matryoshka_weights=[1.0, 0.5],
                      matryoshka_2d=[[1, 8]], spread_out_weight=0.25)  # fmt: skip
    batch = {"query": np.array(["q1", "q2", "q3"]), "positive": np.array(["p1", "p2", "p3"])}
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g)  # [full 32 | first layer 32]
    recorded: dict[str, torch.Tensor] = {}
    loss = float(objective(cfg, batch, None, torch.device("cpu"), terms=recorded)[1]([q, d]))
    assert all(not t.requires_grad for t in recorded.values())  # detached: logging keeps no graph
    terms = {k: float(t) for k, t in recorded.items()}  # read as the tracker reads them
    assert set(terms) == {"infonce@32", "infonce@16", "L1/infonce@8", "spread_out"}
    nce = InfoNCE(20.0)
    assert terms["infonce@16"] == pytest.approx(float(nce(q[:, :16], d[:, :16])))
    assert terms["L1/infonce@8"] == pytest.approx(float(nce(q[:, 32:40], d[:, 32:40])))
    assert terms["spread_out"] == pytest.approx(float(SpreadOut()(q[:, :32], d[:, :32])))
    weighted = (
        terms["infonce@32"] + 0.5 * terms["infonce@16"] + terms["L1/infonce@8"] + 0.25 * terms["spread_out"]
    )
    assert loss == pytest.approx(weighted, rel=1e-5)
    assert len({round(v, 6) for v in terms.values()}) == 4  # four different values, not one copied
