"""The HAProxy in front of the replicas: its retry policy, and its own counters read from its stats socket.

Ray Serve runs HAProxy on each node (`RAY_SERVE_ENABLE_HA_PROXY`, set by `import rayembed`), and HAProxy
sends each request straight to a replica's HTTP server. A replica that dies (a crash, SIGKILL, its node
lost) drops the requests it held: HAProxy gets no answer on them. Ray's default retries only requests
that never reached a replica (`conn-failure`); an embedding request has no side effect, so `import
rayembed` also has it retry those that got no answer (`RAY_SERVE_HAPROXY_RETRY_ON=conn-failure
empty-response junk-response`) on another replica (`option redispatch`), up to HAProxy's 3 retries. A request is retried only if it fits HAProxy's buffer (Ray sets
`tune.bufsize`). Measured (HAProxy 2.8.25 with Ray's generated config, a server killed while holding 3
requests): some are retried (`wretr`), others still reach the client as a closed connection, which HAProxy
does not even log; so a crash-safe endpoint routes to model deployments, whose ingress retries the calls
a dead replica held (`request_retries`, deployment.Remote). `retries()` reads what HAProxy counted.
"""

from __future__ import annotations

import csv
import io
import os
import socket
from pathlib import Path
from typing import Any


def sockets() -> list[str]:
    """The stats sockets of the HAProxy processes on this host: Ray keeps one per node under
    dirname($RAY_SERVE_HAPROXY_SOCKET_PATH)/<node id>/."""
    default = os.environ.get("RAY_SERVE_HAPROXY_SOCKET_PATH", "/tmp/haproxy-serve/admin.sock")
    base, name = os.path.split(default)
    return sorted(str(p) for p in Path(base).glob(f"*/{name}") if p.is_socket())


def stats(socket_path: str) -> list[dict[str, Any]]:
    """HAProxy's `show stat` from one stats socket: one row per frontend, backend and server, with `wretr`
    (retries) and `wredis` (redispatches to another server) among the counters."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(socket_path)
        s.sendall(b"show stat\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    text = b"".join(chunks).decode().lstrip("# ")
    return list(csv.DictReader(io.StringIO(text)))


def retries() -> dict[str, int]:
    """Requests the HAProxy processes on this host sent again, over their backends: {'retries': wretr,
    'redispatches': wredis} (what `rayembed.serve.ingress.retries()` prints for an operator, too)."""
    rows = []
    for path in sockets():
        try:
            rows += [r for r in stats(path) if r.get("svname") == "BACKEND"]
        except OSError:  # a socket left by an HAProxy that is gone (a stopped cluster's)
            continue
    return {
        "retries": sum(int(r.get("wretr") or 0) for r in rows),
        "redispatches": sum(int(r.get("wredis") or 0) for r in rows),
    }
