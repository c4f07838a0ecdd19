"""LLM-based embedders trained end to end on 2 CPU Ray Train workers with real DeepSpeed: FlagEmbedding's
files as they are, LoRA under ZeRO-2 and ZeRO-3, latent-attention pooling, instructions, resume, and
students from decoders; tiny random decoders (conftest.tiny_decoder)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA
from rayembed.model import Embedder
from rayembed.train.config import TrainConfig
from rayembed.train.job import check_model, train

pytestmark = pytest.mark.usefixtures("ray_local")
FLAG = DATA / "flagembedding-examples"
PROBE = [
    "A dog runs across the field.",
    "Two people are talking in a cafe.",
    "The cell membrane is permeable.",
]
TASK = "Given a question, retrieve passages that answer it"


def _ckpt_state(result: dict) -> dict[str, torch.Tensor]:
    from rayembed.train.export import checkpoint_state

    return checkpoint_state(result["checkpoint"])


def test_flagembedding_files_lora_zero3_resume(tiny_decoder: Callable[..., Path], tmp_path: Path) -> None:
    base = tiny_decoder("qwen3")  # lasttoken, causal: what sentence-transformers loads too

    def cfg(steps: int) -> TrainConfig:
        return TrainConfig(
            data=str(FLAG), output_dir=str(tmp_path / "run"), model=str(base), data_format="flagembedding",
            group_size=4, score_weight=0.5, query_instruction=TASK, lora_r=4, zero_stage=3,
            gradient_checkpointing=True, grad_cache_chunk=4, batch_size=8, num_workers=2, max_length=64,
            lr=1e-3, max_steps=steps, checkpoint_every=1,
        )  # fmt: skip

    first = train(cfg(2))
    assert first["step"] == 2 and np.isfinite(first["loss"])
    state = _ckpt_state(first)  # the checkpoint holds only what trains: the adapters
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    ds = Path(first["checkpoint"]) / "ds"
    for rank in (0, 1):  # ZeRO-3: each worker's partition
        assert (ds / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()

    # same run: resumes at step 2; the export reads 384 tokens where the base reads 256 (of 512 positions)
    second = train(dataclasses.replace(cfg(3), export_max_length=384))
    assert second["resumed_from"] == 2 and second["step"] == 3
    history = json.loads((Path(second["report"]) / "report.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3]

    exported = Embedder.load(second["output_dir"], device="cpu")
    assert Embedder.load(base, device="cpu").max_length == 256 and exported.max_length == 384
    assert (
        json.loads((Path(second["output_dir"]) / "sentence_bert_config.json").read_text())["max_seq_length"]
        == 384
    )
    assert exported.prompts["query"] == f"Instruct: {TASK}\nQuery:"
    assert not any("lora" in k for k in exported.state_dict())  # adapters merged: a plain model
    start = Embedder.load(base, device="cpu").state_dict()
    after = exported.state_dict()
    frozen = [k for k in start if "norm" in k or "embed_tokens" in k]
    assert frozen and all(torch.equal(start[k], after[k]) for k in frozen)  # only adapters trained...
    assert not torch.equal(
        start["backbone.layers.0.self_attn.q_proj.weight"], after["backbone.layers.0.self_attn.q_proj.weight"]
    )

    # ... and the merged export gives what the adapter model gives.
    from rayembed.model.lora import add_lora

    adapted = add_lora(Embedder.load(base, device="cpu"), 4, 32, 0.05, None)
    adapted.load_weights(_ckpt_state(second), "adapters", partial=True)
    np.testing.assert_allclose(exported.encode(PROBE), adapted.encode(PROBE), atol=1e-5)
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(second["output_dir"], device="cpu")
    assert st.max_seq_length == 384
    np.testing.assert_allclose(
        st.encode(PROBE, prompt_name="query"), exported.encode(PROBE, prompt_name="query"), atol=1e-5
    )


@pytest.mark.parametrize("setting", ["max_length", "export_max_length"])
def test_token_limits_past_the_models_positions_are_refused_before_training(
    setting: str, tiny_decoder: Callable[..., Path], tmp_path: Path
) -> None:
    base = tiny_decoder("qwen3")  # 512 positions
    cfg = TrainConfig(data=str(FLAG), output_dir=str(tmp_path), model=str(base), **{setting: 513})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"{setting}=513 is more than the model's 512 positions"):
        check_model(cfg)
    assert check_model(dataclasses.replace(cfg, **{setting: 512})) == 64
    with pytest.raises(ValueError, match="max_length and export_max_length must be >= 1"):
        dataclasses.replace(cfg, **{setting: 0})


def test_latent_attention_bidirectional_lora_zero2_instructions_then_embed(
    tiny_decoder: Callable[..., Path], snli_triples: Path, tmp_path: Path
) -> None:
    """NV-Embed's recipe in small: bidirectional attention, a latent-attention head, instruction tokens
    left out of pooling, LoRA; the embed job then uses the same prompt and attention."""
    base = tiny_decoder("mistral", pooling="mean")
    result = train(
        TrainConfig(
            data=str(snli_triples), output_dir=str(tmp_path / "nv"), model=str(base), attention="bidirectional",
            pooling="latent_attention", num_latents=8, latent_heads=4, include_prompt=False, query_instruction=TASK,
            negative_column="negative", lora_r=4, lora_target_modules=["q_proj", "v_proj"], zero_stage=2,
            batch_size=8, num_workers=2, max_length=48, lr=1e-3, max_steps=2, checkpoint_every=2,
        )
    )  # fmt: skip
    trained = {k.split(".")[0] for k in _ckpt_state(result)}  # adapters and the pooling head, nothing else
    assert trained == {"backbone", "latent"}
    assert all(".lora_" in k for k in _ckpt_state(result) if k.startswith("backbone."))
    model = Embedder.load(result["output_dir"], device="cpu")
    assert (model.pooling, model.attention, model.include_prompt) == (
        "latent_attention",
        "bidirectional",
        False,
    )
    assert model.prompts["query"] == f"Instruct: {TASK}\nQuery:"
    assert model.latent is not None and model.latent.latents.shape == (8, 64)

    from rayembed.embed.config import EmbedConfig
    from rayembed.embed.job import embed

    src = tmp_path / "queries.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(PROBE)))
    out = tmp_path / "emb"
    embed(
        EmbedConfig(
            input=str(src), output=str(out), model=result["output_dir"], prompt_name="query", progress=False
        )
    )
    import pyarrow.dataset as pads

    table = pads.dataset(out, format="parquet").to_table().sort_by("id")
    got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, model.encode(PROBE, prompt_name="query"), atol=1e-5)


def test_decoder_teacher_to_encoder_student_and_decoder_student_layers(
    tiny_model: Path, tiny_decoder: Callable[..., Path], scifact_docs: Path, tmp_path: Path
) -> None:
    """Teacher vectors from a decoder through the embed pipeline; a BERT student learns them through an
    output layer to the teacher's width, and a 1-layer decoder student from the teacher's own layers."""
    from rayembed.embed.config import EmbedConfig
    from rayembed.embed.job import embed

    teacher = tiny_decoder("qwen3")  # 64-d, last-token pooling
    vectors = tmp_path / "teacher"
    embed(EmbedConfig(input=str(scifact_docs), output=str(vectors), model=str(teacher), id_column="_id",
                      passthrough_columns=["text"], progress=False))  # fmt: skip
    common = {"data": str(vectors), "loss": "distill", "teacher_column": "embedding", "text_column": "text",
              "num_workers": 2, "zero_stage": 2, "batch_size": 8, "max_length": 32, "lr": 1e-3, "max_steps": 2,
              "checkpoint_every": 2}  # fmt: skip
    with pytest.raises(ValueError, match="teacher's vectors are 64-d, the student's 32-d: set output_dim=64"):
        train(TrainConfig(output_dir=str(tmp_path / "bert"), model=str(tiny_model), **common))
    bert = train(
        TrainConfig(output_dir=str(tmp_path / "bert"), model=str(tiny_model), output_dim=64, **common)
    )
    student = Embedder.load(bert["output_dir"], device="cpu")
    assert student.dim == 64 and student.projection is not None and student.hidden_size == 32
    from sentence_transformers import SentenceTransformer

    np.testing.assert_allclose(
        SentenceTransformer(bert["output_dir"], device="cpu").encode(PROBE), student.encode(PROBE), atol=1e-5
    )
    plain = common | {"zero_stage": 0, "precision": "bf16"}  # plain data parallel: one bf16 module file
    small = train(
        TrainConfig(output_dir=str(tmp_path / "small"), model=str(teacher), student_layers=[1], **plain)
    )
    one_layer = Embedder.load(small["output_dir"], device="cpu")
    assert one_layer.backbone.config.num_hidden_layers == 1 and one_layer.pooling == "lasttoken"
    start = Embedder.load(teacher, device="cpu").backbone.layers[1].mlp.up_proj.weight
    assert not torch.equal(one_layer.backbone.layers[0].mlp.up_proj.weight, start)  # it trained from layer 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"attention": "bidirectional"}, "applies to decoder backbones; bert is an encoder"),
        ({"lora_r": 4, "lora_target_modules": ["q_proj"]}, r"\['q_proj'\] match no linear layer"),
        ({"student_layers": [0, 5]}, r"layers must be indices in \[0, 2\)"),
        (
            {"pooling": "latent_attention", "latent_heads": 5},
            "latent_heads=5 does not divide the hidden size 32",
        ),
    ],
)
def test_bad_model_settings_fail_before_any_worker_starts(
    tiny_model: Path, settings: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_model(TrainConfig(data="x", output_dir="y", model=str(tiny_model), **settings))


def test_lasttoken_without_eos_fails_before_training(
    tiny_decoder: Callable[..., Path], tmp_path: Path
) -> None:
    import shutil

    path = tmp_path / "no-eos"
    shutil.copytree(tiny_decoder("llama", pooling="mean"), path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "eos_token"})
    )
    with pytest.raises(ValueError, match="lasttoken pooling needs the text to end in an EOS token"):
        check_model(TrainConfig(data="x", output_dir="y", model=str(path), pooling="lasttoken"))
