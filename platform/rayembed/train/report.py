"""Run report written at the end of every training run: report.json, report.md and curves.png.

report.json holds the run summary, rank 0's per-step history (step, loss, time_s: seconds since that
worker attempt started, so it restarts after a resume) and, when the run has
an `eval` section, the eval reports of the model before and after training (same `rayembed.eval.job.evaluate`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def eval_rows(evals: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Markdown table cells: one row per evaluated model, one column per metric and width/precision."""
    columns: list[tuple[str, str, str]] = []
    for report in evals.values():
        for part, metric in (
            ("beir", "ndcg@10"),
            ("beir", "recall@100"),
            ("beir_pair", "ndcg@10"),
            ("sts", "spearman"),
        ):
            for key, value in report.get(part, {}).items():
                if isinstance(value, dict) and metric in value and (part, key, metric) not in columns:
                    columns.append((part, key, metric))
    header = ["model", *[f"{'pair ' if p == 'beir_pair' else ''}{m} @{k}" for p, k, m in columns]]
    rows = [
        [label, *[f"{r.get(p, {}).get(k, {}).get(m, float('nan')):.4f}" for p, k, m in columns]]
        for label, r in evals.items()
    ]
    return header, rows


def teacher_lines(evals: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown for each eval that scored a pair's documents encoder alone (the teacher in the student's
    frame): the teacher's nDCG@10 at full width and the shares of it the student and the pair keep."""
    lines: list[str] = []
    for label, report in evals.items():
        kept = report.get("beir_retention")
        if kept:
            lines += ["", f"Teacher (the pair's documents encoder) nDCG@10 @{kept['width']} ({label}): "
                      f"{kept['teacher_ndcg@10']:.4f}; the student alone keeps {kept['student_vs_teacher']:.1%} "
                      f"of it, the pair {kept['asym_vs_teacher']:.1%} (labelled, {report['beir']['set']})."]  # fmt: skip
    return lines


def retention_lines(evals: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown for each eval that ran the label-free retention check (eval/retention.py): the estimate per
    width and mode, and the two kinds it is chosen from."""
    lines: list[str] = []
    for label, report in evals.items():
        kept = report.get("retention")
        if not kept:
            continue
        lines += ["", f"## Retention on the corpus, label-free ({label})", "",
                  f"{kept['docs']} documents, median {kept['median_doc_words']} words: the estimate is `{kept['method']}` "
                  "(docs/architecture.md, eval/retention.py). Share of the teacher's nDCG@10:", "",
                  "| width | mode | estimate | cloze | neighbours | real queries |", "|---|---|---|---|---|---|"]  # fmt: skip
        for width, modes in kept.items():
            if isinstance(modes, dict):
                lines += [f"| {width} | {mode} | **{v['estimate']}** | {v['cloze']} | {v['neighbours']} | "
                          f"{v.get('real_query_agreement', '')} |" for mode, v in modes.items()]  # fmt: skip
    return lines


def markdown(summary: dict[str, Any], history: list[dict[str, Any]], evals: dict[str, Any] | None) -> str:
    lines = ["# Training run report", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.items() if not isinstance(v, dict | list)]
    if history:
        first, last = history[0], history[-1]
        lines += [f"| loss at step {first['step']} | {first['loss']:.4f} |"]
        lines += [f"| loss at step {last['step']} | {last['loss']:.4f} |"]
    if evals:
        header, rows = eval_rows(evals)
        lines += ["", "## Eval", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += teacher_lines(evals) + retention_lines(evals)
    lines += ["", "![curves](curves.png)", ""]
    return "\n".join(lines)


def plot(path: Path, history: list[dict[str, Any]], evals: dict[str, Any] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if evals else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    ax.plot(steps, losses, marker="." if len(steps) < 50 else None, label="loss")
    if len(losses) >= 10:  # a moving average over ~5% of the run
        w = max(2, len(losses) // 20)
        ax.plot(steps[w - 1 :], np.convolve(losses, np.ones(w) / w, mode="valid"), label=f"mean of {w}")
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    ax.legend()
    if evals:
        header, rows = eval_rows(evals)
        ax = axes[0][1]
        x = np.arange(len(header) - 1)
        for i, row in enumerate(rows):
            ax.bar(x + i * 0.8 / len(rows), [float(v) for v in row[1:]], 0.8 / len(rows), label=row[0])
        ax.set_xticks(x + 0.4 - 0.4 / len(rows), header[1:], rotation=30, ha="right", fontsize=7)
        ax.set(title="eval before / after", ylim=(0, 1))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(
    out_dir: str | Path,
    summary: dict[str, Any],
    history: list[dict[str, Any]],
    evals: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write report.json, report.md and curves.png into `out_dir` (a local folder); returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"run": summary, "history": history, "eval": evals}
    (out / "report.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(summary, history, evals))
    plot(out / "curves.png", history, evals)
    return out
