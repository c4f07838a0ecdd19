"""Public data sets and training files: where they live, readers (BEIR, STS Benchmark, SNLI), and the
`prepare` job that writes training JSONL from them."""

from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> str:
    """Where the public data sets live: $RAYEMBED_DATA, else the first `shared/data` found beside the
    checkout, the working folder, or /work (this machine's layout)."""
    if os.environ.get("RAYEMBED_DATA"):
        return os.environ["RAYEMBED_DATA"]
    here = Path(__file__).resolve().parents[4]
    for candidate in (
        here / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
        Path("/work/shared/data"),
    ):
        if candidate.is_dir():
            return str(candidate)
    return str(here / "shared" / "data")


SHARED_DATA = shared_data_dir()
os.environ.setdefault("RAYEMBED_DATA", SHARED_DATA)  # specs say ${RAYEMBED_DATA}/scifact etc.
