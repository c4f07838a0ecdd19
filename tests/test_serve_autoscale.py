"""Autoscaling on a local Ray cluster: a second replica comes up under load and goes away after."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("ray_local")


def test_replica_added_under_load_and_removed_after(tiny_model: Path) -> None:
    from ray import serve

    from conftest import start_endpoint, wait_for

    url = start_endpoint(
        model=str(tiny_model), min_replicas=1, max_replicas=2, target_ongoing_requests=1,
        upscale_delay_s=0.5, downscale_delay_s=1.0, look_back_period_s=11, batch_wait_timeout_s=0.05,
    )  # fmt: skip

    def running() -> int:
        app = serve.status().applications["rayembed"]
        return int(app.deployments["EmbeddingService"].replica_states.get("RUNNING", 0))

    body = json.dumps({"input": ["load " * 40] * 32}).encode()
    stop = threading.Event()
    codes: list[int] = []

    def client() -> None:
        while not stop.is_set():
            req = urllib.request.Request(
                f"{url}/v1/embeddings", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=60) as r:
                codes.append(r.status)

    try:
        assert running() == 1
        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            assert wait_for(lambda: running() == 2, 90), "no second replica under load"
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert codes and set(codes) == {200}
        assert wait_for(lambda: running() == 1, 90), "the extra replica was not removed after the load"
    finally:
        serve.shutdown()


def test_overload_is_refused_fast_not_queued_forever(tiny_model: Path) -> None:
    """Bounded queues: beyond max_ongoing + max_queued requests, Serve answers 503 at once."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from conftest import start_endpoint

    url = start_endpoint(
        model=str(tiny_model), min_replicas=1, max_replicas=1, max_ongoing_requests=1, max_queued_requests=1,
        batch_wait_timeout_s=0.2,
    )  # fmt: skip
    body = json.dumps({"input": ["overload " * 50] * 8}).encode()

    def call(_: int) -> int:
        req = urllib.request.Request(
            f"{url}/v1/embeddings", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    try:
        with ThreadPoolExecutor(24) as pool:
            codes = list(pool.map(call, range(24)))
        assert set(codes) <= {200, 429, 503}, codes
        assert codes.count(200) >= 1 and (codes.count(503) + codes.count(429)) >= 1, codes
    finally:
        serve.shutdown()
