"""Schemathesis against a running server: every documented operation, fuzzed from the OpenAPI document itself, must
answer without a 5xx, with a status code the document lists, and with a body and headers that match it."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.server import RunningServer, run_server

EXAMPLES_PER_OPERATION = 15  # 17 operations, valid and invalid requests: about 400 requests, 20 to 30 s here
# Valid requests (which must get a documented answer, not a 5xx) and invalid ones: wrong types, out-of-range values,
# unknown fields, missing parts (which must get a documented 4xx).
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """No random weights and an unreachable hub: a fuzzed load or download fails fast instead of building a model
    or fetching files; only passthrough can load, and it is cheap."""
    with run_server(tmp_path_factory.mktemp("fuzz"), "--hub-endpoint", "http://127.0.0.1:9") as running:
        yield running


@pytest.mark.slow
def test_every_operation_answers_as_documented(fuzzed_server: RunningServer) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.url}/schema/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 17
    for operation, mode in itertools.product(operations, MODES):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,  # the same requests every run: a failure here is the server's, not the seed's
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def answers_as_documented(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=CHECKS, timeout=10)

        try:
            answers_as_documented()
        except Unsatisfiable:
            assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label  # no invalid request exists
        assert fuzzed_server.process.poll() is None, (operation.label, mode)


def test_the_server_still_serves_after_the_fuzzing(fuzzed_server: RunningServer) -> None:
    deadline = time.monotonic() + 10
    while httpx.get(f"{fuzzed_server.url}/health", timeout=5).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "Traceback" not in fuzzed_server.log(), fuzzed_server.log()[-5000:]
