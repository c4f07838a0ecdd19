"""LLM-based embedders in the one Embedder: every decoder family, pooling kind, attention kind and
prompt handling, checked against sentence-transformers on tiny random models (no weights downloaded)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DECODERS
from rayembed.model import Embedder

TEXTS = ["A man is playing a guitar on stage.", "short", "Ray Data streams batches of documents " * 6]
QUERY = "Instruct: Given a question, retrieve passages that answer it\nQuery:"  # Qwen3-Embedding's form


def _st(path: Path) -> object:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


@pytest.mark.parametrize("pooling", ["lasttoken", "mean"])
@pytest.mark.parametrize("family", DECODERS)
def test_every_family_exports_what_sentence_transformers_loads(
    tiny_decoder: Callable[..., Path], family: str, pooling: str
) -> None:
    path = tiny_decoder(family, pooling=pooling)
    model = Embedder.load(path, device="cpu")
    ours = model.encode(TEXTS, batch_size=2)
    alone = np.stack([model.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(ours, alone, atol=1e-5)  # right padding: a text's vector ignores its batch
    np.testing.assert_allclose(ours, _st(path).encode(TEXTS, batch_size=2), atol=1e-5)  # type: ignore[attr-defined]
    ids = model.tokenizer("hello world")["input_ids"]
    assert (ids[-1] == model.tokenizer.eos_token_id) == (pooling == "lasttoken")  # EOS ends lasttoken texts
    assert model.tokenizer.pad_token_id is not None  # Llama/Mistral have none: EOS stands in
    pool_cfg = json.loads((path / "1_Pooling" / "config.json").read_text())  # what TEI and vLLM read
    assert pool_cfg["pooling_mode_lasttoken"] == (pooling == "lasttoken")
    assert pool_cfg["pooling_mode_mean_tokens"] == (pooling == "mean")


@pytest.mark.parametrize("family", DECODERS)
def test_bidirectional_lets_a_later_token_change_an_earlier_ones_state(
    tiny_decoder: Callable[..., Path], family: str
) -> None:
    """cls pooling reads the first token's state: it sees the last word only without the causal mask."""
    a, b = "the cell binds a receptor", "the cell binds a protein"
    for attention, changes in (("causal", False), ("bidirectional", True)):
        model = Embedder.load(tiny_decoder(family, pooling="cls", attention=attention), device="cpu")
        assert model.attention == attention  # recorded in the saved model
        first = model.encode([a, b])
        assert (np.abs(first[0] - first[1]).max() > 1e-4) == changes, attention


def test_gemma3_bidirectional_uses_its_own_switch_and_loads_in_sentence_transformers(
    tiny_decoder: Callable[..., Path],
) -> None:
    path = tiny_decoder("gemma3", pooling="mean", attention="bidirectional")
    assert json.loads((path / "config.json").read_text())["use_bidirectional_attention"] is True
    ours = Embedder.load(path, device="cpu").encode(TEXTS)
    np.testing.assert_allclose(ours, _st(path).encode(TEXTS), atol=1e-5)  # type: ignore[attr-defined]


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_instruction_tokens_left_out_of_mean_pooling_as_sentence_transformers_does(
    tiny_decoder: Callable[..., Path], family: str
) -> None:
    prompts = {"query": QUERY, "document": ""}
    path = tiny_decoder(family, pooling="mean", prompts=prompts, include_prompt=False)
    model = Embedder.load(path, device="cpu")
    assert not model.include_prompt and model.prompts == prompts
    ours = model.encode(TEXTS, prompt_name="query", batch_size=2)
    theirs = _st(path).encode(TEXTS, prompt_name="query", batch_size=2)  # type: ignore[attr-defined]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    counted = Embedder.load(tiny_decoder(family, pooling="mean", prompts=prompts), device="cpu")
    assert np.abs(counted.encode(TEXTS, prompt_name="query") - ours).max() > 1e-3  # the prompt counted
    # Training-side tokenize: (prompt, text) pairs carry each row's prompt length.
    feats = model.tokenize([(QUERY, "short"), "no instruction"])
    assert feats["prompt_length"].tolist() == [model.prompt_length(QUERY), 0]
    with torch.no_grad():
        pooled = model(**feats)
    np.testing.assert_allclose(pooled[0].numpy(), ours[1], atol=1e-5)


def test_latent_attention_head_is_saved_and_reloaded(
    tiny_decoder: Callable[..., Path], tmp_path: Path
) -> None:
    path = tiny_decoder(
        "mistral", pooling="latent_attention", attention="bidirectional", num_latents=16, heads=4
    )
    model = Embedder.load(path, device="cpu")
    assert model.pooling == "latent_attention" and model.latent is not None
    assert model.latent.latents.shape == (16, 64)
    modules = json.loads((path / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == [
        "Transformer",
        "LatentAttention",
        "Pooling",
        "Normalize",
    ]
    vectors = model.encode(TEXTS)
    np.testing.assert_allclose(
        Embedder.load(model.save(tmp_path / "again"), device="cpu").encode(TEXTS), vectors, atol=1e-6
    )
    plain = Embedder.load(tiny_decoder("mistral", pooling="mean", attention="bidirectional"), device="cpu")
    assert np.abs(plain.encode(TEXTS) - vectors).max() > 1e-3  # the head does something


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_student_from_a_decoders_layers(
    tiny_decoder: Callable[..., Path], family: str, tmp_path: Path
) -> None:
    teacher = Embedder.load(tiny_decoder(family, pooling="mean"), device="cpu")
    student = Embedder.load(tiny_decoder(family, pooling="mean"), device="cpu").keep_layers([1])
    assert student.backbone.config.num_hidden_layers == 1 and len(student.backbone.layers) == 1
    for mine, theirs in zip(
        student.backbone.layers[0].parameters(), teacher.backbone.layers[1].parameters(), strict=True
    ):
        assert torch.equal(mine, theirs)
    if family == "gemma3":
        assert student.backbone.config.layer_types == [teacher.backbone.config.layer_types[1]]
    saved = student.save(tmp_path / "student")
    np.testing.assert_allclose(
        Embedder.load(saved, device="cpu").encode(TEXTS), _st(saved).encode(TEXTS), atol=1e-5
    )  # type: ignore[attr-defined]


def test_lora_trains_only_adapters_and_merges_into_a_plain_model(
    tiny_decoder: Callable[..., Path], tmp_path: Path
) -> None:
    from rayembed.model.lora import add_lora, has_lora, merge

    model = add_lora(
        Embedder.load(tiny_decoder("qwen3"), device="cpu"),
        r=4,
        alpha=8,
        dropout=0.0,
        targets=["q_proj", "v_proj"],
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and (".q_proj." in n or ".v_proj." in n) for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # as after training: the adapters change the vectors
    adapted = model.encode(TEXTS)
    assert np.abs(adapted - Embedder.load(tiny_decoder("qwen3"), device="cpu").encode(TEXTS)).max() > 1e-3
    with pytest.raises(ValueError, match="merge the LoRA adapters"):
        model.save(tmp_path / "unmerged")
    saved = merge(model).save(tmp_path / "merged")
    assert not has_lora(model) and not any(
        "lora" in k for k in Embedder.load(saved, device="cpu").state_dict()
    )
    np.testing.assert_allclose(Embedder.load(saved, device="cpu").encode(TEXTS), adapted, atol=1e-5)
    np.testing.assert_allclose(_st(saved).encode(TEXTS), adapted, atol=1e-5)  # type: ignore[attr-defined]


def test_bad_model_settings_get_clear_errors(
    tiny_model: Path, tiny_decoder: Callable[..., Path], tmp_path: Path
) -> None:
    from rayembed.model.lora import add_lora

    with pytest.raises(ValueError, match="applies to decoder backbones; bert is an encoder"):
        Embedder.load(tiny_model, device="cpu").set_attention("bidirectional")
    with pytest.raises(ValueError, match=r"lora_target_modules \['q_projj'\] match no linear layer"):
        add_lora(Embedder.load(tiny_decoder("llama"), device="cpu"), 4, 8, 0.0, ["q_projj"])
    no_eos = Embedder.load(tiny_decoder("llama", pooling="mean"), device="cpu")
    no_eos.tokenizer.eos_token = None
    no_eos.tokenizer.add_eos_token = False
    with pytest.raises(ValueError, match="lasttoken pooling needs the text to end in an EOS token"):
        no_eos.set_pooling("lasttoken")
    pooling = tiny_model / "1_Pooling" / "config.json"
    bad = tmp_path / "max-pooled"
    import shutil

    shutil.copytree(tiny_model, bad)
    (bad / "1_Pooling" / "config.json").write_text(
        json.dumps(
            json.loads(pooling.read_text())
            | {"pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}
        )
    )
    with pytest.raises(ValueError, match="pooling .*max_tokens.* is not supported"):
        Embedder.load(bad, device="cpu")


def test_a_plain_decoder_folder_pools_by_its_last_token(
    tiny_decoder: Callable[..., Path], tmp_path: Path
) -> None:
    """An HF decoder folder without sentence-transformers files (a base model as downloaded)."""
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_decoder("qwen2"), plain)
    for extra in ("modules.json", "1_Pooling", "2_Normalize", "sentence_bert_config.json", "rayembed.json"):
        target = plain / extra
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    model = Embedder.load(plain, device="cpu")
    assert (
        model.pooling == "lasttoken" and model.tokenizer("a")["input_ids"][-1] == model.tokenizer.eos_token_id
    )
