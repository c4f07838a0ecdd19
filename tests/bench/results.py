"""What every docs/results/*.json starts with: the date, the machine it was measured on, the command.

The machine is read, not written by hand: host, CPUs, memory, and the GPU torch sees (or "no GPU"), so a
figure measured on the device machine says so by itself.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def machine() -> str:
    """`host: N CPUs, M GiB, GPU name` (or `no GPU`), from this process's view of the machine."""
    gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "GPU not checked (no torch)"
    return f"{platform.node()}: {os.cpu_count()} CPUs, {gib:.0f} GiB, {gpu}"


def command() -> str:
    """The command line that ran this benchmark, its script relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT).as_posix() if script.is_relative_to(ROOT) else sys.argv[0]
    return " ".join(["python", shown, *sys.argv[1:]])


def header(benchmark: str | None = None) -> dict[str, str]:
    """{"benchmark"?, "date", "machine", "command"}: the first keys of a result file."""
    named = {"benchmark": benchmark} if benchmark else {}
    return named | {"date": datetime.date.today().isoformat(), "machine": machine(), "command": command()}
