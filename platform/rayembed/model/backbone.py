"""Backbones: loading an HF `AutoModel` from a local folder, and the transformer layer stack of each family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def load_backbone(path: Path, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    kwargs: dict[str, Any] = {"local_files_only": True, "config": config}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:  # the HF pooler is unused by mean/CLS pooling; dropping it keeps DDP/ZeRO free of unused params
        return AutoModel.from_pretrained(path, add_pooling_layer=False, **kwargs)
    except TypeError:
        return AutoModel.from_pretrained(path, **kwargs)


def layer_stack(backbone: nn.Module) -> tuple[nn.Module, str]:
    """(module holding the transformer layers, attribute name): BERT-style `encoder.layer`."""
    encoder = getattr(backbone, "encoder", None)
    if isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        assert encoder is not None
        return encoder, "layer"
    raise ValueError(f"keep_layers supports BERT-style encoders (encoder.layer); got {type(backbone)}")
