"""The eval job, and the measuring the train job's run report and merge reuse: nDCG@10 / Recall@100 on
BEIR sets, Spearman on STS Benchmark, per Matryoshka width and precision.

- config.py   `EvalConfig`
- job.py      `evaluate`: encode with the model, postprocess like the batch job, score
- metrics.py  nDCG@k, Recall@k, the float form of int8/binary codes
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayembed.eval.job import evaluate

__all__ = ["evaluate"]


def __getattr__(name: str) -> Any:
    if name == "evaluate":
        from rayembed.eval.job import evaluate

        return evaluate
    raise AttributeError(f"module 'rayembed.eval' has no attribute {name!r}")
