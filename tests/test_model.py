"""The shared model package: one encode function, sentence-transformers layout, postprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rayembed.model import Embedder, length_batches, pad_batch, postprocess, resolve_model_path

TEXTS = [
    "A man is playing a guitar on stage.",
    "Vitamin D deficiency is associated with an increased risk of tuberculosis.",
    "short",
    "Ray Data streams batches of documents through a pool of embedding actors " * 8,
]


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    return Embedder.load("default", device="cpu")


def test_default_model_is_bundled_minilm(minilm: Embedder) -> None:
    assert minilm.name == "all-MiniLM-L6-v2"
    assert minilm.dim == 384 and minilm.pooling == "mean" and minilm.normalize
    assert minilm.max_length == 256


def test_saved_model_matches_sentence_transformers(minilm: Embedder, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    saved = minilm.save(tmp_path / "minilm")
    ours = Embedder.load(saved, device="cpu").encode(TEXTS, batch_size=2)
    theirs = SentenceTransformer(str(saved), device="cpu").encode(TEXTS, batch_size=2)
    assert ours.shape == theirs.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # ... and the bundled original folder too (it is what `default` loads).
    original = SentenceTransformer(str(resolve_model_path("default")), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(minilm.encode(TEXTS), original, atol=1e-5)


def test_encode_order_and_batching_do_not_change_vectors(minilm: Embedder) -> None:
    one_by_one = np.stack([minilm.encode([t])[0] for t in TEXTS])
    batched = minilm.encode(TEXTS, batch_size=3, max_tokens=64)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_bfloat16_on_cpu_stays_within_cosine_0_9995_of_float32(minilm: Embedder) -> None:
    import torch

    bf16 = Embedder.load("default", device="cpu", dtype=torch.bfloat16)
    a, b = minilm.encode(TEXTS), bf16.encode(TEXTS)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)
    assert (a * b).sum(1).min() > 0.9995


def test_matryoshka_truncation_renormalises(minilm: Embedder) -> None:
    full = minilm.encode(TEXTS)
    small = minilm.encode(TEXTS, dim=64)
    assert small.shape == (len(TEXTS), 64)
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(small, expected, atol=1e-6)


def test_postprocess_int8_and_binary() -> None:
    emb = np.array([[0.6, -0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(postprocess(emb, precision="int8"), [[76, -102, 0, 0, 0, 0, 0, 0]])
    # sign bits 1,0,0,... -> 0b10000000
    np.testing.assert_array_equal(postprocess(emb, precision="binary"), [[128]])
    np.testing.assert_allclose(postprocess(emb, dim=2), [[0.6, -0.8]], rtol=1e-6)
    with pytest.raises(ValueError, match="divisible by 8"):
        postprocess(emb, dim=4, precision="binary")
    with pytest.raises(ValueError, match="dim must be in"):
        postprocess(emb, dim=9)


def test_int8_calibration_uses_the_range_the_components_fill() -> None:
    from rayembed.model.vectors import calibrate_int8, int8_scale, unit

    rng = np.random.default_rng(0)
    emb = unit(rng.standard_normal((2000, 384)).astype(np.float32))
    scales = calibrate_int8(emb, [384, 128])
    assert scales[384] == pytest.approx(127 / np.quantile(np.abs(emb), 0.9999), rel=1e-3)
    assert 127 < scales[128] < scales[384]  # narrower unit vectors have larger components
    # The widest calibrated width <= dim, else 127 (a wider width's scale would clip narrower vectors).
    assert [int8_scale(scales, d) for d in (384, 256, 128, 64)] == [
        scales[384],
        scales[128],
        scales[128],
        127,
    ]
    assert int8_scale({}, 384) == 127
    plain, calibrated = (
        postprocess(emb, precision="int8"),
        postprocess(emb, precision="int8", int8_scales=scales),
    )
    assert np.abs(plain).max() < 64 and np.abs(calibrated).max() == 127  # clipped only at the extreme tail
    err = [np.abs(c / s - emb).mean() for c, s in ((plain, 127), (calibrated, scales[384]))]
    assert err[1] < err[0] / 2
    cut = postprocess(emb, dim=128, precision="int8", int8_scales=scales)
    expected = np.clip(np.rint(unit(emb[:, :128]) * scales[128]), -127, 127)
    np.testing.assert_array_equal(cut, expected)
    with pytest.raises(ValueError, match="calibration width"):
        calibrate_int8(emb, [512])


def test_calibrated_scales_are_saved_hashed_and_used_by_encode(tiny_model: Path, tmp_path: Path) -> None:
    from rayembed.model.layout import model_revision
    from rayembed.model.vectors import unit

    model = Embedder.load(tiny_model, device="cpu")
    scales = model.calibrate_int8(TEXTS * 8, widths=[16])
    assert set(scales) == {model.dim, 16} and min(scales.values()) > 127
    model.save(tmp_path / "m")
    loaded = Embedder.load(tmp_path / "m", device="cpu")
    assert loaded.int8_scales == scales
    codes = loaded.encode(TEXTS, precision="int8")
    np.testing.assert_array_equal(
        codes, np.clip(np.rint(loaded.encode(TEXTS) * scales[model.dim]), -127, 127)
    )
    np.testing.assert_array_equal(  # 16-d: its own scale; 24-d: the widest calibrated width below it
        loaded.encode(TEXTS, dim=24, precision="int8"),
        np.clip(np.rint(unit(loaded.encode(TEXTS)[:, :24]) * scales[16]), -127, 127),
    )
    assert model_revision(tmp_path / "m") != model_revision(tiny_model)  # other codes, other revision
    (tmp_path / "m" / "int8_scales.json").write_text('{"scales": {"32": 5}}')
    with pytest.raises(ValueError, match="scales in \\[127"):
        Embedder.load(tmp_path / "m", device="cpu")
    with pytest.raises(ValueError, match="at least 2 texts"):
        model.calibrate_int8(["one"])


def test_length_batches_cap_rows_and_tokens() -> None:
    lengths = [10, 200, 30, 200, 5, 50]
    batches = length_batches(lengths, batch_size=4, max_tokens=400)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) <= 4 and len(b) * max(lengths[i] for i in b) <= 400
    assert sorted(int(i) for i in batches[0]) == [1, 3]  # the two longest first


def test_pad_batch_right_pads_ragged_rows() -> None:
    ids, mask = pad_batch([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_threaded_tokenizing_gives_the_same_tokens(minilm: Embedder) -> None:
    rng = np.random.default_rng(0)
    words = ["the", "cell", "protein", "binds", "a", "receptor", "in", "mice", "and", "humans"]
    texts = [" ".join(rng.choice(words, int(rng.integers(1, 400)))) for _ in range(700)]
    one = minilm.tokenize_ids(texts)
    try:
        minilm.tokenize_threads = 3  # parts of 256, 256 and 188 texts (MIN_TOKENIZE_PART = 256)
        three = minilm.tokenize_ids(texts)
    finally:
        minilm.tokenize_threads = 1
    assert three.ids == one.ids and three.truncated == one.truncated
    assert any(one.truncated) and not all(one.truncated)


def test_bad_input_gets_clear_errors(minilm: Embedder, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="input 1 is empty"):
        minilm.encode(["ok", "  "])
    with pytest.raises(ValueError, match="input 0 is NoneType"):
        minilm.encode([None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not a single string"):
        minilm.encode("a string")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision"):
        minilm.encode(["x"], precision="fp8")
    with pytest.raises(FileNotFoundError, match="not found"):
        Embedder.load(tmp_path / "no-such-model")


def test_tiny_model_roundtrip(tiny_model: Path) -> None:
    m = Embedder.load(tiny_model, device="cpu")
    assert m.dim == 32 and m.name == "tiny-bert" and m.max_length == 64
    again = Embedder.load(m.save(tiny_model.parent / "tiny-copy"), device="cpu")
    np.testing.assert_array_equal(m.encode(TEXTS), again.encode(TEXTS))


def test_student_from_teacher_layers(tmp_path: Path) -> None:
    """A 3-layer student made of MiniLM-L6's layers 0, 2, 5: same weights, saved and reloaded anywhere."""
    import torch
    from sentence_transformers import SentenceTransformer

    teacher = Embedder.load("default", device="cpu")
    student = Embedder.load("default", device="cpu").keep_layers([0, 2, 5])
    assert student.backbone.config.num_hidden_layers == 3 and len(student.backbone.encoder.layer) == 3
    for mine, theirs in zip(student.backbone.encoder.layer, [0, 2, 5], strict=True):
        for a, b in zip(mine.parameters(), teacher.backbone.encoder.layer[theirs].parameters(), strict=True):
            assert torch.equal(a, b)
    assert torch.equal(
        student.backbone.embeddings.word_embeddings.weight, teacher.backbone.embeddings.word_embeddings.weight
    )
    saved = student.save(tmp_path / "student")
    ours = Embedder.load(saved, device="cpu")
    assert ours.backbone.config.num_hidden_layers == 3
    np.testing.assert_allclose(
        ours.encode(TEXTS), SentenceTransformer(str(saved), device="cpu").encode(TEXTS), atol=1e-5
    )
    assert not np.allclose(
        ours.encode(TEXTS), teacher.encode(TEXTS), atol=1e-3
    )  # a different (smaller) model
    with pytest.raises(ValueError, match=r"indices in \[0, 6\)"):
        Embedder.load("default", device="cpu").keep_layers([0, 6])


def test_sub_model_outputs_for_2d_matryoshka(tiny_model: Path) -> None:
    """forward(layers=[1]) returns the full model's embedding, then what the first layer alone gives."""
    import torch

    model = Embedder.load(tiny_model, device="cpu").eval()
    feats = model.tokenize(TEXTS)
    with torch.no_grad():
        both = model(**feats, layers=[1])
        full = model(**feats)
        first = Embedder.load(tiny_model, device="cpu").keep_layers([0]).eval()(**feats)
    assert both.shape == (len(TEXTS), 2 * model.dim)
    torch.testing.assert_close(both[:, : model.dim], full)
    torch.testing.assert_close(both[:, model.dim :], first)
    with pytest.raises(ValueError, match=r"layers must be in \[1, 2\]"):
        model(**feats, layers=[3])


def test_length_chunked_forward_gives_the_rows_and_gradients_of_one_padded_pass(tiny_model: Path) -> None:
    """by_length: length-sorted chunks trimmed to their own longest row, put back in row order."""
    import torch

    from rayembed.model.batching import by_length, length_chunks

    model = Embedder.load(tiny_model, device="cpu").eval()
    texts = [TEXTS[i % len(TEXTS)] + " x" * (i % 3) for i in range(9)]
    feats = model.tokenize(texts)
    chunks = length_chunks(feats, max_tokens=4 * int(feats["attention_mask"].sum(1).max()))
    assert len(chunks) > 1 and sorted(i for idx, _ in chunks for i in idx) == list(range(9))
    for idx, part in chunks:  # each trimmed to its own longest row: no column of padding only
        assert part["input_ids"].shape[0] == len(idx) and part["attention_mask"][:, -1].any()

    def grads(max_tokens: int | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = by_length(lambda f: model(**f), feats, max_tokens)
        (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()  # every row weighed apart
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    one, g_one = grads(None)
    for budget in (40, 10**6):  # several chunks; one chunk, its rows sorted by length
        chunked, g_chunked = grads(budget)
        torch.testing.assert_close(chunked, one, atol=1e-5, rtol=1e-4)
        for a, b in zip(g_chunked, g_one, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
