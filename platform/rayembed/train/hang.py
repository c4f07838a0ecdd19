"""Hangs become failures: every collective waits a bounded time, a worker whose collective fails names the
step, the phase and the collective, and the driver reports a run whose step stopped advancing.

Data-parallel workers meet in collectives (gathers of negatives, gradient reductions and, under ZeRO-3,
each layer's parameter gathers in every forward and backward pass). A worker that runs one collective
more or less than the others, or is stuck elsewhere, leaves them waiting: torch's default wait is 30 min
and gloo's then ends in an error that names nothing of the run. Here:

- `bound_collectives(s)`: every process group the worker makes (DeepSpeed clones the world group for
  ZeRO) waits at most `collective_timeout_s`; Ray Train's own group gets it through `TorchConfig`.
- `Watch`: the worker's step and phase; `explain(error)` turns an error raised in a collective into a
  `CollectiveError` naming them and the collective, and posts both to the run's `Board`. Ray Train then
  restarts the workers from the last checkpoint (`max_failures`) or ends the run with that message.
- `Board` (a Ray actor) holds each worker's step, phase, pid and node; `Watchdog` (a driver thread)
  reads it and warns when no step has finished for `stall_warning_s`, naming where each worker is.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from datetime import timedelta
from typing import Any

log = logging.getLogger("rayembed.train")

# where the frames of a collective live: torch's c10d API, DeepSpeed's comm layer and ZeRO's handles
COLLECTIVE_FILES = ("torch/distributed/", "deepspeed/comm/", "deepspeed/runtime/zero/")


def bound_collectives(timeout_s: float) -> None:
    """Process groups made from now on in this process wait at most `timeout_s` in a collective (torch
    reads these defaults when a group is made without a timeout, as DeepSpeed's are)."""
    import torch.distributed.distributed_c10d as c10d

    limit = timedelta(seconds=timeout_s)
    c10d.default_pg_timeout = limit
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = limit


class CollectiveError(RuntimeError):
    """A collective failed (timed out, or a peer's connection closed): the step and phase named."""


def collective_of(error: BaseException) -> str | None:
    """The innermost collective call in `error`'s traceback ('all_reduce', 'AllGatherHandle.wait'), or
    None when the error did not come from one."""
    name = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        path = frame.f_code.co_filename.replace(os.sep, "/")
        if any(part in path for part in COLLECTIVE_FILES):
            code = frame.f_code
            name = getattr(code, "co_qualname", code.co_name)
    return name


class Watch:
    """One worker's position (step, phase), posted to the run's Board (fire and forget) as it changes."""

    def __init__(self, rank: int, timeout_s: float, board: Any = None) -> None:
        self.rank, self.timeout_s, self.board = rank, timeout_s, board
        self.step, self.phase = 0, "start"
        self.pid, self.node = os.getpid(), _node_ip()

    def at(self, step: int, phase: str) -> None:
        self.step, self.phase = step, phase
        if self.board is not None:
            self.board.beat.remote(self.rank, step, phase, self.pid, self.node)

    def explain(self, error: BaseException) -> CollectiveError | None:
        """A CollectiveError for an error raised in a collective (posted to the Board too), else None."""
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        collective = collective_of(error)
        if collective is None or not _from_backend(error, text):
            return None
        why = (
            f"waited over collective_timeout_s={self.timeout_s:g}: another worker did not reach it (stuck, "
            "slower, or running a different sequence of collectives)"
            if "timed out" in text.lower() or "timeout" in text.lower()
            else "a peer's connection failed (a worker crashed or was stopped, e.g. on a collective that "
            "did not match its own)"
        )
        message = (
            f"rank {self.rank}, step {self.step}, {self.phase}: collective {collective} failed: {why} "
            f"[{text}]"
        )
        if self.board is not None:
            try:
                import ray

                ray.get(self.board.failed.remote(self.rank, message), timeout=10)
            except Exception:  # the board is a report, not a dependency
                pass
        return CollectiveError(message)


def _from_backend(error: BaseException, text: str) -> bool:
    """An error of the communication backend (gloo, nccl), not of the code around a collective."""
    import torch.distributed as dist

    backend = getattr(dist, "DistError", ())
    return isinstance(error, backend) or any(m in text.lower() for m in ("gloo", "nccl", "timed out"))


def _node_ip() -> str:
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:
        return "?"


class Board:
    """Ray actor: where each worker of a run is, when the run's step last advanced, what failed."""

    def __init__(self) -> None:
        self.ranks: dict[int, dict[str, Any]] = {}
        self.step, self.advanced = -1, time.monotonic()
        self.failures: list[str] = []

    def beat(self, rank: int, step: int, phase: str, pid: int, node: str) -> None:
        self.ranks[rank] = {"step": step, "phase": phase, "pid": pid, "node": node, "at": time.monotonic()}
        if step > self.step:
            self.step, self.advanced = step, time.monotonic()

    def failed(self, rank: int, message: str) -> None:
        self.failures.append(message)

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        ranks = {r: v | {"for_s": now - v["at"]} for r, v in sorted(self.ranks.items())}
        return {"step": self.step, "idle_s": now - self.advanced, "ranks": ranks, "failures": self.failures}


def stall_message(snap: dict[str, Any]) -> str:
    where = "; ".join(
        f"rank {r}: step {v['step']}, {v['phase']} for {v['for_s']:.0f} s (pid {v['pid']} on {v['node']})"
        for r, v in snap["ranks"].items()
    )
    return (
        f"train: no step has finished for {snap['idle_s'] / 60:.1f} min (last step {snap['step']}); "
        f"{where or 'no worker has started'}. `py-spy dump --pid <pid>` on the worker's node shows where "
        "it waits."
    )


class Watchdog:
    """Driver thread: reads the Board every `poll_s` and warns when no step has finished for
    `stall_s` (again every `stall_s` while it lasts); `stop()` returns what it saw."""

    def __init__(self, board: Any, stall_s: float, poll_s: float | None = None) -> None:
        self.board, self.stall_s = board, stall_s
        self.poll_s = poll_s or min(30.0, stall_s / 4)
        self.stalls: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rayembed-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import ray

        warned_at = 0.0  # the idle time of the last warning
        while not self._stop.wait(self.poll_s):
            try:
                snap = ray.get(self.board.snapshot.remote(), timeout=30)
            except Exception:
                continue
            if snap["idle_s"] < warned_at:
                warned_at = 0.0  # the step advanced since
            if snap["idle_s"] >= warned_at + self.stall_s:
                message = stall_message(snap)
                log.warning(message)
                self.stalls.append(message)
                warned_at = snap["idle_s"]

    def stop(self) -> list[str]:
        """Stops watching; the stall warnings it gave."""
        self._stop.set()
        self._thread.join(timeout=5)
        return self.stalls
