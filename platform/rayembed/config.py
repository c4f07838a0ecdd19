"""Every job's config, one registry: job name -> `@dataclass` (each lives in its job's room).

`rayembed.spec` builds them from YAML specs and `key=value` overrides; `rayembed.cli` runs them.
"""

from __future__ import annotations

from rayembed.data import SHARED_DATA
from rayembed.data.config import PrepareConfig
from rayembed.embed.config import EmbedConfig, MineConfig
from rayembed.eval.config import EvalConfig
from rayembed.serve.config import ServeConfig
from rayembed.train.config import MergeConfig, TrainConfig

CONFIGS: dict[str, type] = {
    "prepare": PrepareConfig,
    "train": TrainConfig,
    "merge": MergeConfig,
    "mine": MineConfig,
    "eval": EvalConfig,
    "embed": EmbedConfig,
    "serve": ServeConfig,
}
JOBS = tuple(CONFIGS)

__all__ = [
    "CONFIGS",
    "JOBS",
    "SHARED_DATA",
    "EmbedConfig",
    "EvalConfig",
    "MergeConfig",
    "MineConfig",
    "PrepareConfig",
    "ServeConfig",
    "TrainConfig",
]
