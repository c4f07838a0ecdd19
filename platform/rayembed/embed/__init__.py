"""The embed job: Ray Data streams input fragments through embedding actors into committed Parquet,
exactly once; and `mine`, hard negatives from the vectors it writes.

- config.py      `EmbedConfig`, `MineConfig`
- job.py         the driver: fragments, actor plan, Ray Data pipeline, summary (`embed`)
- actor.py       the Ray Data UDF (`EmbedFragments`): read, tokenize ahead, `Embedder.encode`, write, commit
- rows.py        a fragment's rows and what of them is embedded (no model libraries: the plan's tasks use it)
- keys.py        the key index (`_keys/`) and the compare step of an incremental run, range by range
- plan.py        an incremental run's plan, as Ray tasks: scan, the base's keys, compare
- versions.py    the chain of versions and its current view; compact.py folds it; tables.py: Iceberg, Delta
- manifest.py    fragments, deterministic outputs, commit markers, the output's manifest
- mine.py        hard negatives from pipeline vectors (uses the embed job itself)
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayembed.embed.job import embed

__all__ = ["embed", "mine"]


def __getattr__(name: str) -> Any:  # the job's entry points, imported on first use (configs stay light)
    if name == "embed":
        from rayembed.embed.job import embed

        return embed
    raise AttributeError(f"module 'rayembed.embed' has no attribute {name!r}")
