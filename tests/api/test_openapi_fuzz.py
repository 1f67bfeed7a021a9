"""The OpenAPI document is the truth: schemathesis, driven by the document alone, sends a real
API process generated and mutated requests on every route, and every answer must be one the
document lists (status, content type, headers, body schema), with no unexpected error inside.

Bounded (a fixed seed and a few dozen examples per operation), so it is a specification
check, not an open-ended fuzzing campaign; `make bench` and hand runs can go further."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.core.settings import Settings
from tests.support.data import KEY, TENANT, Demo
from tests.support.processes import Process, answers, wait_until
from tests.support.services import free_port

CHECKS = ",".join(
    [
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


def _api(spawn: Callable[..., Process], settings: Settings, **env: str) -> tuple[str, Process]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = spawn(
        "api-fuzz",
        "api",
        "--port",
        str(port),
        env={"SMSD_API_PORT": str(port), "SMSD_PUBLIC_BASE_URL": base, **env},
    )
    wait_until(lambda: answers(f"{base}/health/ready"), 30, "the API")
    return base, process


def _schemathesis(base: str, workdir: Path, *headers: str) -> subprocess.CompletedProcess[str]:
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{base}/schema/openapi.json",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "25",
        "--seed",
        "20261130",
        # One worker: hypothesis' strategy descriptions are not thread-safe (a tool error, not
        # a finding, with several).
        "--workers",
        "1",
        "--request-timeout",
        "10",
    ]
    for header in headers:
        command += ["--header", header]
    # Run elsewhere than the checkout: it keeps a cache of its own in the working directory.
    return subprocess.run(
        command, cwd=workdir, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.parametrize("credentials", ["demo account", "none"])
def test_every_answer_is_one_the_openapi_document_lists(
    demo: Demo,
    migrated: Settings,
    spawn: Callable[..., Process],
    tmp_path: Path,
    credentials: str,
) -> None:
    if credentials == "demo account":
        # Past authentication, so the routes' own validation is what gets exercised.
        base, api = _api(spawn, migrated, SMSD_AUTH_FAILURE_LIMIT="1000000")
        run = _schemathesis(base, tmp_path, f"Tenant-Id: {TENANT}", f"Application-Key: {KEY}")
    else:
        # Generated credentials: 401s, then the key-guessing throttle's 429s.
        base, api = _api(spawn, migrated)
        run = _schemathesis(base, tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "passed" in run.stdout
    # Nothing unexpected inside either: an error-level log is a bug even behind a 4xx.
    errors = [line for line in api.output().splitlines() if '"level": "error"' in line]
    assert errors == []
