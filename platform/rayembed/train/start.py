"""The model as training starts, built the same way by every worker, the driver's checks and the export.

From `model`: cut to `student_layers`, attention (causal / bidirectional), pooling kind (with a
latent-attention head), include_prompt, an output layer (`output_dim`), the pca rotation, then LoRA
adapters and gradient checkpointing. On ZeRO-3 workers the backbone is built already partitioned
(transformers' DeepSpeed integration), so no worker ever holds the whole model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from rayembed.model import Embedder, resolve_model_path
from rayembed.model.lora import add_lora
from rayembed.train.config import TrainConfig


@contextlib.contextmanager
def zero3_init(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """While open, transformers builds models partitioned across the workers (ZeRO-3): its
    `HfDeepSpeedConfig` is looked up through a weak reference, so it lives exactly this long."""
    if ds_config is None or ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del keep


def output_layer(width: int, hidden: int, seed: int) -> torch.Tensor:
    """A [width, hidden] matrix with orthonormal rows (or columns, when wider), from `seed`."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(max(width, hidden), min(width, hidden), generator=g))
    return q.T if width <= hidden else q


def starting_model(
    cfg: TrainConfig, device: str = "cpu", rotation: Any = None, ds_config: dict[str, Any] | None = None
) -> Embedder:
    """The model as training starts (no LoRA here: `trainable_model` adds it), in fp32. `ds_config`
    (workers): load the backbone in the training precision (bf16/fp16: DeepSpeed keeps fp32 master
    copies of what trains; a LoRA run's frozen base stays at 2 bytes a weight), partitioned when ZeRO-3."""
    dtype = (
        {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
        if ds_config
        else torch.float32
    )
    with zero3_init(ds_config):
        model = Embedder.load(resolve_model_path(cfg.model, cfg.s3_endpoint_url), device=device, dtype=dtype)
    if cfg.student_layers:
        model.keep_layers(cfg.student_layers)
    if cfg.attention:
        model.set_attention(cfg.attention)
    if cfg.pooling:
        torch.manual_seed(cfg.seed)  # a new latent-attention head starts alike on every worker
        model.set_pooling(cfg.pooling, num_latents=cfg.num_latents, heads=cfg.latent_heads)
    if cfg.include_prompt is not None:
        model.include_prompt = cfg.include_prompt
    if cfg.output_dim:
        model.set_projection(output_layer(cfg.output_dim, model.hidden_size, cfg.seed))
    return model.rotate(rotation) if rotation is not None else model


def trainable_model(cfg: TrainConfig, model: Embedder, recompute: bool = False) -> Embedder:
    """The run's `dropout` on the backbone, LoRA adapters (lora_r > 0; their own lora_dropout) on the
    starting model; `recompute` (the workers): activation (gradient) checkpointing when the run asks."""
    if cfg.dropout is not None:
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = cfg.dropout
            elif isinstance(getattr(module, "attention_dropout", None), float):  # decoders' attention
                module.attention_dropout = cfg.dropout
    if recompute and cfg.gradient_checkpointing:
        hf, kwargs = model.backbone, {"use_reentrant": False}
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers 5's name
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        hf.config.use_cache = False
    if cfg.lora_r:
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    return model
