"""The train job: Ray Train + DeepSpeed ZeRO, contrastive and distillation objectives, checkpoints,
merging.

- config.py      `TrainConfig`, `MergeConfig`
- job.py         the driver: checks, Ray Dataset, `TorchTrainer`, export, run report (`train`)
- loop.py        what every worker runs: DeepSpeed engine, steps, checkpoint/resume (`train_loop`)
- objective.py   a batch -> text towers + the loss of their embeddings
- losses.py      InfoNCE, distillation, Matryoshka (`LOSSES`: name -> class); regularizers.py: the rest
- dist.py        cross-worker gathers with gradients, DeepSpeed start; gradcache.py: GradCache chunks
- export.py      ZeRO consolidation into model folders
- report.py      report.json / report.md / curves.png; merge.py: model souping
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayembed.train.job import train

__all__ = ["train"]


def __getattr__(name: str) -> Any:  # the job's entry points, imported on first use (configs stay light)
    if name == "train":
        from rayembed.train.job import train

        return train
    raise AttributeError(f"module 'rayembed.train' has no attribute {name!r}")
