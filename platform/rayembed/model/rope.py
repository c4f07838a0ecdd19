"""RoPE scaling: a rotary-position model (Llama, Mistral, Qwen, Gemma, ModernBERT) read past the positions
it was trained on, by linear position interpolation or YaRN, as transformers computes them when a model's
config.json asks (Qwen's model cards tell users to add `rope_scaling` there for 128k). Here it is a
setting of the embed job and the endpoint instead, so the saved folder stays as trained. No torch import:
configs check their setting with `check_rope_scaling` before anything loads."""

from __future__ import annotations

from typing import Any

# Dynamic NTK is left out: its frequencies follow the longest text of each batch, so a text's vector
# would depend on the texts batched with it (batch and online would disagree).
ROPE_SCALINGS = ("linear", "yarn")
ROPE_KEYS = {"rope_type", "factor", "original_max_position_embeddings"}


def check_rope_scaling(scaling: dict[str, Any] | None) -> tuple[str, float, int | None] | None:
    """A `rope_scaling` setting ({rope_type: linear | yarn, factor: > 1, original_max_position_embeddings:
    optional}, the form of a model card's config.json and vLLM's --rope-scaling) as its parts; a
    ValueError saying what is wrong otherwise (configs check theirs with it, before loading anything)."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(
            f"rope_scaling must be a mapping such as {{rope_type: yarn, factor: 4}}, got {scaling!r}"
        )
    unknown = set(scaling) - ROPE_KEYS
    if unknown or scaling.get("rope_type") not in ROPE_SCALINGS:
        raise ValueError(
            f"rope_scaling takes rope_type ({' | '.join(ROPE_SCALINGS)}), factor and optionally "
            f"original_max_position_embeddings; got {scaling}"
        )
    factor, original = scaling.get("factor"), scaling.get("original_max_position_embeddings")
    if not isinstance(factor, int | float) or isinstance(factor, bool) or factor <= 1:
        raise ValueError(f"rope_scaling.factor must be a number > 1, got {factor!r}")
    if original is not None and (not isinstance(original, int) or original < 1):
        raise ValueError(
            f"rope_scaling.original_max_position_embeddings must be a positive int, got {original!r}"
        )
    return str(scaling["rope_type"]), float(factor), original


def scale_rope(backbone: Any, scaling: dict[str, Any]) -> int:
    """Stretch a RoPE model's positions by `factor` (linear interpolation or YaRN, computed by transformers
    exactly as when the model's config.json says so) and rebuild its rotary embeddings; returns the new
    number of positions. Where layers have their own RoPE (Gemma 3, ModernBERT), the full-attention ones
    are scaled and the sliding-window ones, which never look past their window, are not."""
    parts = check_rope_scaling(scaling)
    assert parts is not None
    rope_type, factor, original = parts
    config: Any = backbone.config
    params = getattr(config, "rope_parameters", None)
    rotary = [(parent, name, child) for parent in backbone.modules() for name, child in parent.named_children()
              if hasattr(child, "rope_type") and type(child).__name__.endswith("RotaryEmbedding")]  # fmt: skip
    if not rotary or not isinstance(params, dict):
        raise ValueError(
            f"rope_scaling applies to models with rotary position embeddings (Llama, Mistral, Qwen, Gemma, "
            f"ModernBERT); {config.model_type} has learned positions and stops at its "
            f"max_position_embeddings ({config.max_position_embeddings})"
        )
    positions = int(config.max_position_embeddings)
    original = original or positions
    if original > positions:
        raise ValueError(
            f"rope_scaling.original_max_position_embeddings {original} is above the model's {positions}"
        )
    layered = all(isinstance(v, dict) for v in params.values())
    target = params.get("full_attention") if layered else params
    if not isinstance(target, dict):
        raise ValueError(f"{config.model_type}: no full_attention RoPE to scale in {sorted(params)}")
    if target.get("rope_type", "default") != "default":
        raise ValueError(
            f"the model's RoPE is scaled already ({target['rope_type']}, factor {target.get('factor')}): "
            f"its {positions} positions include it"
        )
    target.update(rope_type=rope_type, factor=factor, original_max_position_embeddings=original)
    config.max_position_embeddings = int(original * factor)
    for parent, name, child in rotary:
        device = next(child.buffers()).device
        setattr(parent, name, type(child)(config).to(device))
    return int(config.max_position_embeddings)
