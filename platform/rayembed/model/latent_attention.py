"""Latent-attention pooling (NV-Embed, Lee et al. 2024): token states cross-attend to a trainable latent
array, then an MLP, both with residuals; the result is mean-pooled (pooling.py).

Queries are the token states, keys and values the latents (`num_latents` x hidden), multi-head; each of
the two blocks normalises its inputs first (pre-norm). Written with plain Linear layers called through
their own forward, so DeepSpeed ZeRO-3 gathers every partitioned weight when it is used. Saved beside
the backbone as `<n>_LatentAttention/` (config.json + model.safetensors).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LatentAttention(nn.Module):
    def __init__(self, hidden_size: int, num_latents: int = 512, heads: int = 8, mlp_ratio: int = 4) -> None:
        super().__init__()
        if hidden_size % heads:
            raise ValueError(f"latent attention: hidden size {hidden_size} is not divisible by {heads} heads")
        self.config = {
            "hidden_size": hidden_size,
            "num_latents": num_latents,
            "heads": heads,
            "mlp_ratio": mlp_ratio,
        }
        self.heads = heads
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size) * hidden_size**-0.5)
        self.norm_q, self.norm_kv, self.norm_mlp = (nn.LayerNorm(hidden_size) for _ in range(3))
        self.q, self.k, self.v, self.o = (nn.Linear(hidden_size, hidden_size, bias=False) for _ in range(4))
        self.up = nn.Linear(hidden_size, hidden_size * mlp_ratio)
        self.down = nn.Linear(hidden_size * mlp_ratio, hidden_size)

    def _split(self, x: Tensor) -> Tensor:  # [B, N, H] -> [B, heads, N, H / heads]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, hidden: Tensor) -> Tensor:
        """[B, T, H] token states -> [B, T, H]: what mean pooling then averages over the text's tokens."""
        latents = self.norm_kv(self.latents).unsqueeze(0)
        q = self._split(self.q(self.norm_q(hidden)))
        k, v = self._split(self.k(latents)), self._split(self.v(latents))
        attended = F.scaled_dot_product_attention(
            q, k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
        )
        x = hidden + self.o(attended.transpose(1, 2).flatten(2))
        return x + self.down(F.gelu(self.up(self.norm_mlp(x))))

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, folder / "model.safetensors")

    @classmethod
    def load(cls, folder: Path) -> LatentAttention:
        from safetensors.torch import load_file

        config: dict[str, Any] = json.loads((folder / "config.json").read_text())
        head = cls(**config)
        head.load_state_dict(load_file(folder / "model.safetensors"))
        return head
