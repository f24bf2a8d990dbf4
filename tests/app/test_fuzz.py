"""Schemathesis fuzzes every operation in /openapi.json: no 5xx, and answers match the docs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.app.support import Server

# No 5xx for anything it sends, and status codes, content types, headers and bodies as
# documented. (positive_data_acceptance is left out: random bytes that fit "format: binary"
# are rightly refused as images.)
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


def test_schemathesis_finds_no_server_errors(server: Server, tmp_path: Path) -> None:
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli, "schemathesis is a dev dependency (pyproject.toml)"
    result = subprocess.run(
        [
            cli,
            "run",
            server.url + "/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            "50",
            "--seed",
            "1",
            "--workers",
            "1",
            "--no-color",
            "--generation-database",
            "none",
            "--request-timeout",
            "30",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout
    assert "Operations:       7 selected / 7 total" in result.stdout
