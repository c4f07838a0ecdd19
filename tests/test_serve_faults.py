"""A model replica killed under steady load: the ingress sends the calls it held to the other replica
(embedding has no side effect), no client sees a failure, and /metrics counts the retries."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from conftest import record, wait_for

pytestmark = pytest.mark.usefixtures("ray_local")


def _replicas(kind: str) -> list[dict]:
    import ray._private.state as state

    return [a for a in state.actors().values() if a["State"] == "ALIVE" and kind in a["ActorClassName"]]


def running(deployment: str) -> int:
    """Replicas Serve routes to (an actor that is alive may not be ready yet)."""
    from ray import serve

    app = serve.status().applications.get("rayembed")
    return int(app.deployments[deployment].replica_states.get("RUNNING", 0)) if app else 0


def busiest(replicas: list[dict], window_s: float = 0.5) -> int:
    """The pid of the replica that used the most CPU over `window_s`: the one encoding calls now."""
    import time

    import psutil

    procs = [psutil.Process(a["Pid"]) for a in replicas]
    before = [sum(p.cpu_times()[:2]) for p in procs]
    time.sleep(window_s)
    used = [sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before, strict=True)]
    return procs[used.index(max(used))].pid


def load(url: str, outcomes: Counter[str], stop: threading.Event) -> None:
    """Posts requests big enough that a model replica spends most of its time encoding them (~0.1 s of
    work each), so one killed under this load almost always holds a call."""
    body = json.dumps({"input": ["a replica may die while it holds this request " * 30] * 128}).encode()
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


def kill_one_under_load(url: str, kind: str, threads: int = 6) -> Counter[str]:
    """Clients post steadily; once 30 requests have succeeded, SIGKILL one `kind` replica; go on until 60
    more have; the outcomes by status (or exception). The replica killed is the busier one."""
    outcomes: Counter[str] = Counter()
    stop = threading.Event()
    clients = [threading.Thread(target=load, args=(url, outcomes, stop)) for _ in range(threads)]
    for t in clients:
        t.start()
    try:
        assert wait_for(lambda: outcomes["200"] >= 30, 120), outcomes
        os.kill(busiest(_replicas(kind)), signal.SIGKILL)
        killed_at = outcomes["200"]
        assert wait_for(lambda: outcomes["200"] >= killed_at + 60, 120), outcomes  # load goes on after it
    finally:
        stop.set()
        for t in clients:
            t.join()
    return outcomes


def test_a_model_replica_killed_under_load_fails_no_request(tiny_model: Path) -> None:
    from ray import serve

    from conftest import start_endpoint

    url = start_endpoint(models=[{"name": "tiny", "model": str(tiny_model), "min_replicas": 2, "max_replicas": 2}],
                         batch_wait_timeout_s=0.02)  # fmt: skip
    try:
        outcomes: Counter[str] = Counter()
        for _ in range(3):  # a kill between two of its calls retries nothing: kill again until one had a call
            assert wait_for(lambda: running("Model0-tiny") == 2 and len(_replicas("Model0-tiny")) == 2, 120)
            outcomes += kill_one_under_load(url, "Model0-tiny")
            failed = sum(n for status, n in outcomes.items() if status != "200")
            assert failed == 0, outcomes
            with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:  # the one ingress replica's
                retried = float(re.search(r"^rayembed_retries_total (\S+)$", r.read().decode(), re.M)[1])  # type: ignore[index]
            if retried >= 1:
                break
        assert retried >= 1, "three replicas killed under load, none while it held a call"  # calls sent again
        record({"faults": {"serve_model_replica_sigkill": {"requests": sum(outcomes.values()),
                                                            "failed_requests": failed, "retried": retried}}})  # fmt: skip
    finally:
        serve.shutdown()
