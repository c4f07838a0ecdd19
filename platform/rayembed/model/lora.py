"""LoRA adapters (peft) on the backbone: train low-rank updates of chosen linear layers, keep the rest
frozen, merge them back into a plain model for export.

Only the adapters (and a pooling head or output layer, which sit outside the backbone) train. Target
modules are name suffixes (`q_proj`, `up_proj`, `query`, ...); the default is every linear layer of the
backbone. Names that match nothing are refused before any training starts (`check_targets`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from rayembed.model.embedder import Embedder


def linear_names(backbone: nn.Module) -> set[str]:
    """The last name part of every linear layer in the backbone (what target_modules match)."""
    return {name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, nn.Linear)}


def check_targets(backbone: nn.Module, targets: list[str] | None) -> None:
    """Refuse target modules the backbone has no linear layer for, naming the ones it has."""
    if targets is None:
        return
    have = linear_names(backbone)
    missing = [t for t in targets if t not in have]
    if missing:
        raise ValueError(
            f"lora_target_modules {missing} match no linear layer; the backbone has {sorted(have)}"
        )


def add_lora(model: Embedder, r: int, alpha: int, dropout: float, targets: list[str] | None) -> Embedder:
    """Wrap the backbone in LoRA adapters of rank `r`; its own weights are frozen."""
    from peft import LoraConfig, get_peft_model

    check_targets(model.backbone, targets)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets or "all-linear", bias="none",
        task_type="FEATURE_EXTRACTION",
    )  # fmt: skip
    model.backbone = get_peft_model(model.backbone, config)
    return model


def has_lora(model: Embedder) -> bool:
    return hasattr(model.backbone, "peft_config")


def merge(model: Embedder) -> Embedder:
    """Fold the adapters into the backbone's weights: a plain model (what export saves)."""
    if has_lora(model):
        model.backbone = model.backbone.merge_and_unload()
    return model


def trainable_state(model: Embedder) -> dict[str, Any]:
    """The weights that train (adapters, pooling head, output layer), keyed like the model's state dict."""
    return {
        k: v
        for k, v in model.state_dict().items()
        if k in {n for n, p in model.named_parameters() if p.requires_grad}
    }
