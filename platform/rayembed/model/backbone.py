"""Backbones: loading any HF `AutoModel` text backbone from a local folder, and what differs by family.

Encoders (BERT) attend both ways. Decoders (Llama, Mistral, Qwen2/3, Gemma/Gemma 3, ...) are causal as
trained; `attention="bidirectional"` removes the causal mask (NV-Embed, LLM2Vec, Gemini Embedding):
through the config's own switch where the family has one (Gemma 3's `use_bidirectional_attention`,
which transformers and sentence-transformers then honour when they load the saved folder), else by
handing the model a ready 4D padding-only mask, which transformers uses as it is, and marking every
attention module non-causal (what flash-attention reads).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

ATTENTIONS = ("causal", "bidirectional")


def attn_implementation(device: str | torch.device | None) -> str:
    """flash_attention_2 on CUDA when the package is installed, else PyTorch's SDPA."""
    on_gpu = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
    return "flash_attention_2" if on_gpu and importlib.util.find_spec("flash_attn") else "sdpa"


def load_backbone(path: Path, dtype: torch.dtype | None, attn: str = "sdpa") -> nn.Module:
    """The HF backbone in `path` (no LM head, no unused BERT pooler), weights in `dtype`."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    kwargs: dict[str, Any] = {"local_files_only": True, "config": config, "attn_implementation": attn}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:  # the HF pooler is unused by our pooling; dropping it keeps DDP/ZeRO free of unused params
        return AutoModel.from_pretrained(path, add_pooling_layer=False, **kwargs)
    except TypeError:
        return AutoModel.from_pretrained(path, **kwargs)


def is_decoder(backbone: nn.Module) -> bool:
    """A causal decoder (as trained): some attention module says `is_causal`, or the family has a
    bidirectional switch (Gemma 3), which only decoders have."""
    config = getattr(backbone, "config", None)
    return hasattr(config, "use_bidirectional_attention") or any(
        getattr(m, "is_causal", False) is True for m in backbone.modules()
    )


def set_attention(backbone: nn.Module, attention: str) -> bool:
    """Make a decoder causal or bidirectional; returns True when forward must pass a 4D padding mask
    (bidirectional without a native switch). Encoders are bidirectional already: asking is an error."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    config: Any = backbone.config
    if not is_decoder(backbone):
        raise ValueError(
            f"attention={attention!r} applies to decoder backbones; {config.model_type} is an encoder "
            "and already attends both ways"
        )
    bidirectional = attention == "bidirectional"
    for m in backbone.modules():
        if hasattr(m, "is_causal"):
            setattr(m, "is_causal", not bidirectional)  # noqa: B010 - module attributes, typed as Tensor | Module
    if hasattr(config, "use_bidirectional_attention"):
        config.use_bidirectional_attention = bidirectional
        return False
    return bidirectional


def padding_mask_4d(mask: torch.Tensor, attn: str, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] padding mask -> the [B, 1, T, T] mask of full (bidirectional) attention over real tokens,
    in the form the attention implementation takes (boolean for SDPA, additive for eager)."""
    keep = mask.bool()[:, None, None, :].expand(-1, 1, mask.shape[1], -1)
    if attn == "eager":
        return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(
            ~keep, torch.finfo(dtype).min
        )
    return keep


def layer_stack(backbone: nn.Module) -> tuple[nn.Module, str]:
    """(module holding the transformer layers, attribute name): BERT-style `encoder.layer`, decoder
    `layers` (Llama, Mistral, Qwen, Gemma)."""
    encoder = getattr(backbone, "encoder", None)
    if isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        assert encoder is not None
        return encoder, "layer"
    if isinstance(getattr(backbone, "layers", None), nn.ModuleList):
        return backbone, "layers"
    raise ValueError(f"no transformer layer stack (encoder.layer or layers) in {type(backbone).__name__}")


def keep_layers(backbone: nn.Module, layers: list[int]) -> None:
    """Keep only these transformer layers, in this order, and make the config agree (per-layer kinds
    such as sliding/full attention follow their layers; layers are renumbered for their caches)."""
    owner, attr = layer_stack(backbone)
    stack = getattr(owner, attr)
    if not layers or any(not 0 <= i < len(stack) for i in layers):
        raise ValueError(f"layers must be indices in [0, {len(stack)}), got {list(layers)}")
    setattr(owner, attr, nn.ModuleList([stack[i] for i in layers]))
    config: Any = backbone.config
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]
    for new, layer in enumerate(getattr(owner, attr)):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new
