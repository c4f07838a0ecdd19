"""A replica killed under steady load: HAProxy sends the requests it held to the other replica, and no
client sees a failure (embedding requests are idempotent; serve/ingress.py)."""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from conftest import record, wait_for

pytestmark = pytest.mark.usefixtures("ray_local")


def _replicas() -> list[dict]:
    import ray._private.state as state

    return [a for a in state.actors().values()
            if a["State"] == "ALIVE" and "EmbeddingService" in a["ActorClassName"]]  # fmt: skip


def test_a_replica_killed_under_load_fails_no_request(tiny_model: Path) -> None:
    from ray import serve

    from conftest import start_endpoint
    from rayembed.serve.ingress import retries

    url = start_endpoint(model=str(tiny_model), min_replicas=2, max_replicas=2, batch_wait_timeout_s=0.02)
    outcomes: Counter[str] = Counter()
    stop = threading.Event()
    # Requests big enough to be inside a replica (tokenizing, batching, encoding) when it dies.
    body = json.dumps({"input": ["a replica may die while it holds this request " * 8] * 16}).encode()

    def client() -> None:
        while not stop.is_set():
            req = urllib.request.Request(
                f"{url}/v1/embeddings", data=body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    outcomes[str(r.status)] += 1
            except urllib.error.HTTPError as e:
                outcomes[str(e.code)] += 1
            except OSError as e:
                outcomes[type(e).__name__] += 1

    try:
        assert wait_for(lambda: len(_replicas()) == 2, 120)
        before = retries()
        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        assert wait_for(lambda: outcomes["200"] >= 30, 120), outcomes
        victim = _replicas()[0]
        os.kill(victim["Pid"], signal.SIGKILL)
        killed_at = outcomes["200"]
        assert wait_for(lambda: outcomes["200"] >= killed_at + 60, 120), outcomes  # load goes on after it
        stop.set()
        for t in threads:
            t.join()
        after = retries()
        failed = sum(n for status, n in outcomes.items() if status != "200")
        assert failed == 0, outcomes
        sent_again = after["retries"] + after["redispatches"] - before["retries"] - before["redispatches"]
        assert sent_again >= 1, (before, after)  # ... because HAProxy sent the dead replica's again
        record({"faults": {"serve_replica_sigkill": {"requests": sum(outcomes.values()), "failed_requests": failed,
                                                      "retried": sent_again}}})  # fmt: skip
    finally:
        stop.set()
        serve.shutdown()
