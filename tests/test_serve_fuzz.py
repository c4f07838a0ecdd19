"""The endpoint fuzzed through its own OpenAPI schema (schemathesis, over real HTTP through HAProxy): every
route, bodies valid and invalid by the schema, and no answer is a 5xx, none breaks the declared schema,
and every error is in OpenAI's shape."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import record

pytestmark = pytest.mark.usefixtures("ray_local")

EXAMPLES = int(os.environ.get("RAYEMBED_FUZZ_EXAMPLES", "60"))  # per route and mode


@pytest.fixture(scope="module")
def endpoint(tiny_model: Path, _ray_shutdown_at_end: None) -> Iterator[str]:
    import ray
    from ray import serve

    from conftest import start_endpoint

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    url = start_endpoint(model=str(tiny_model), max_inputs_per_request=16, max_body_bytes=65536)
    yield url
    serve.shutdown()


def _fuzz(url: str, mode: Any, seen: Counter[str]) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def run(case: Any) -> None:
            response = case.call_and_validate(base_url=url, checks=checks, timeout=60)
            seen[f"{case.operation.label} {response.status_code}"] += 1
            if response.status_code >= 400:  # every error in OpenAI's shape (also what the schema says)
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        try:
            run()
        except Unsatisfiable:  # negative mode on a route that takes nothing (GET /info): nothing to break
            assert mode == GenerationMode.NEGATIVE and operation.method.upper() == "GET", operation.label


def test_every_route_fuzzed_gives_no_5xx_and_keeps_its_schema(endpoint: str, tmp_path: Path) -> None:
    from schemathesis import GenerationMode

    seen: Counter[str] = Counter()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        _fuzz(endpoint, mode, seen)
    routes = {key.rsplit(" ", 1)[0] for key in seen}
    assert {"POST /v1/embeddings", "POST /embed", "POST /", "POST /tokenize", "GET /v1/models", "GET /info",
            "GET /healthz", "GET /readyz", "GET /metrics"} <= routes  # fmt: skip
    codes = Counter(int(key.rsplit(" ", 1)[1]) for key in seen.elements())
    assert not [c for c in codes if c >= 500], codes
    assert codes[200] > 0 and codes[400] > 0  # both valid and refused bodies were sent
    record({"fuzz_cases": sum(codes.values()), "fuzz_500s": sum(n for c, n in codes.items() if c >= 500),
            "fuzz_statuses": {str(c): n for c, n in sorted(codes.items())}})  # fmt: skip
