"""Schemathesis fuzzes every operation in /openapi.json: no 5xx, and answers match the docs.

In process: schemathesis calls the app factory's app over ASGI, with its lifespan running.
"""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from model import Detector
from tests.app.support import DEFAULT_ENV, settings_from

# No 5xx for anything it sends, and status codes, content types, headers and bodies as
# documented. (positive_data_acceptance is left out: random bytes that fit "format: binary"
# are rightly refused as images.)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def test_schemathesis_finds_no_server_errors(tiny_weights: Path, tiny_detector: Detector) -> None:
    settings_ = settings_from({**DEFAULT_ENV, "SSD_WEIGHTS": str(tiny_weights)})
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings_, tiny_detector))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 11  # every operation is fuzzed
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=50,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=CHECKS)

        fuzz()
