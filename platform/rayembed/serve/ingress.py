"""The HAProxy in front of the replicas: its retry policy, and its own counters read from its stats socket.

Ray Serve runs HAProxy on each node (`RAY_SERVE_ENABLE_HA_PROXY`, set by `import rayembed`), and HAProxy
sends each request straight to a replica's HTTP server. A replica that dies (a crash, SIGKILL, its node
lost) drops the requests it held: HAProxy gets no answer on them. Ray's default retries only requests
that never reached a replica (`conn-failure`); an embedding request has no side effect, so `import
rayembed` also has it retry those that got no answer (`RAY_SERVE_HAPROXY_RETRY_ON=conn-failure
empty-response junk-response`) on another replica (`option redispatch`), up to HAProxy's 3 retries. A request is retried only if it fits HAProxy's buffer (Ray sets
`tune.bufsize`); bigger ones fail as before. `stats()` reads what HAProxy counted, retries included.
"""

from __future__ import annotations

import csv
import io
import os
import socket
from typing import Any


def stats(socket_path: str | None = None) -> list[dict[str, Any]]:
    """HAProxy's `show stat` on this node: one row per frontend, backend and server, with `wretr` (retries)
    and `wredis` (redispatches to another server) among the counters."""
    path = socket_path or os.environ.get("RAY_SERVE_HAPROXY_SOCKET_PATH", "/tmp/haproxy-serve/admin.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"show stat\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    text = b"".join(chunks).decode().lstrip("# ")
    return list(csv.DictReader(io.StringIO(text)))


def retries(socket_path: str | None = None) -> dict[str, int]:
    """Requests HAProxy sent again, summed over its backends: {'retries': wretr, 'redispatches': wredis}."""
    rows = [r for r in stats(socket_path) if r.get("svname") == "BACKEND"]
    return {
        "retries": sum(int(r.get("wretr") or 0) for r in rows),
        "redispatches": sum(int(r.get("wredis") or 0) for r in rows),
    }
