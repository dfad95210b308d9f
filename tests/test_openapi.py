"""/openapi.json tells the truth about a real `emote serve`: every route is described and documents what it answers,
a wrong method gets 405 with the path's real methods in `Allow`, and schemathesis (every phase, every check) finds
no failure and no error."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest
from fastapi.routing import APIRoute

from server.openapi import BEARER_SCHEME
from server.serve import build_app
from server.settings import Settings
from server_fixtures import REPO_ROOT, make_test_model, start_server, stop_server

TOKEN = "openapi-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HOOKS = REPO_ROOT / "tests" / "openapi_hooks.py"
ST_MAX_EXAMPLES = 50  # per operation and phase: about 25 s of requests on a 2-core machine
ST_SEED = 20261207
ST_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Limits out of schemathesis's way: it opens a few hundred sessions and uploads from one address, and 503/429
    are documented but would count as failures (503) or cut the stateful chains short (429)."""
    tmp = tmp_path_factory.mktemp("openapi-server")
    base_url, process = start_server(tmp, "--token", TOKEN, "--max-sessions", "1000", "--idle-timeout", "30",
                                     "--session-rate-per-min", "0", "--upload-rate-per-min", "0",
                                     "--max-avatars", "10000")
    yield base_url, tmp / "server.log"
    stop_server(process)
    log = (tmp / "server.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    assert not re.search(r'" 5\d\d\b', log), "a 5xx answer"


def operations(schema: dict):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield path, method.upper(), operation


def test_every_route_is_described_and_401_is_documented_only_with_a_token(tmp_path):
    model = make_test_model(tmp_path / "model")
    for auth in (True, False):
        settings = Settings(model=model, data_dir=tmp_path / "data", token=TOKEN if auth else None,
                            allow_no_auth=not auth).validate()
        app = build_app(settings)
        try:
            schema = app.openapi()
            routes = {(route.path, method) for route in app.routes if isinstance(route, APIRoute)
                      for method in route.methods}
            assert routes == {(path, method) for path, method, _ in operations(schema)}
            assert "HTTPValidationError" not in str(schema), "FastAPI's generic 422: our 422 is an ErrorBody"
            operation_ids = {operation["operationId"] for _, _, operation in operations(schema)}
            links = [link for _, _, operation in operations(schema) for response in operation["responses"].values()
                     for link in response.get("links", {}).values()]
            assert len(links) == 6 and all(link["operationId"] in operation_ids for link in links)
            for path, method, operation in operations(schema):
                assert "default" not in operation["responses"], (method, path)
                errors = {status for status in operation["responses"] if status[0] in "45"}
                assert all(operation["responses"][status]["content"]["application/json"]["schema"]["$ref"]
                           .endswith("/ErrorBody") for status in errors), (method, path)
                if auth:
                    assert ("401" in errors) == (operation.get("security") == [{BEARER_SCHEME: []}]), (method, path)
                else:
                    assert "401" not in errors and "security" not in operation, (method, path)
            assert ("securitySchemes" in schema["components"]) == auth
        finally:
            app.state.avatars.close()


def test_every_route_answers_without_a_token_as_documented(server):
    base_url, _ = server
    schema = httpx.get(f"{base_url}/openapi.json").json()
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for path, method, operation in operations(schema):
            url = path.replace("{avatar_id}", "default").replace("{session_id}", "0" * 32)
            response = client.request(method, url)
            assert str(response.status_code) in operation["responses"], (method, path, response.status_code)
            if operation.get("security") == [{BEARER_SCHEME: []}]:
                assert response.status_code == 401, (method, path)
                assert response.headers["www-authenticate"] == "Bearer"
                assert response.json()["error"] == "unauthorized"
            else:  # the token is optional here: it adds details
                assert operation.get("security") == [{}, {BEARER_SCHEME: []}], (method, path)
                assert response.status_code == 200, (method, path)


@pytest.mark.parametrize("method,path,allow", [
    ("PUT", "/api/avatars/default", "DELETE, GET"),
    ("PATCH", "/api/sessions", "GET, POST"),
    ("POST", "/api/sessions/" + "0" * 32, "DELETE, GET"),
    ("GET", "/api/sessions/" + "0" * 32 + "/interrupt", "POST"),
    ("OPTIONS", "/healthz", "GET"),
    ("TRACE", "/api/avatars/default/portrait.png", "GET"),
])
def test_a_wrong_method_gets_405_with_the_real_methods(server, method, path, allow):
    base_url, _ = server
    response = httpx.request(method, base_url + path, headers=AUTH)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert response.json()["error"] == "method_not_allowed"


def test_schemathesis_finds_no_failure_in_any_phase(server, tmp_path):
    """All four phases (examples, coverage, fuzzing, stateful) with every check, against the real server with its
    token; tests/openapi_hooks.py generates the SDP offers and portraits JSON Schema cannot describe."""
    base_url, server_log = server
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{base_url}/openapi.json",
               "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
               "--max-examples", str(ST_MAX_EXAMPLES), "--seed", str(ST_SEED), "--workers", "1",
               "--header", f"Authorization: Bearer {TOKEN}", "--generation-database", "none", "--no-color"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=ST_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-12000:]
    summary = output[output.index("SUMMARY"):]
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in summary, summary
    assert re.search(r"API Links:\s+[1-9]\d* covered", output), output[-4000:]
    assert "No issues found" in output, summary
    print(output[output.index("Examples"):])
    # The generated requests did real work, not only rejections: sessions and avatars were made and used.
    log = server_log.read_text()
    for request in (r"POST /api/sessions(\?\S*)? HTTP/1.1\" 201", r"GET /api/sessions/[0-9a-f]{32} HTTP/1.1\" 200",
                    r"POST /api/sessions/[0-9a-f]{32}/interrupt HTTP/1.1\" 204",
                    r"DELETE /api/sessions/[0-9a-f]{32} HTTP/1.1\" 204", r"POST /api/avatars HTTP/1.1\" 201",
                    r"GET /api/avatars/[0-9a-f]{32} HTTP/1.1\" 200",
                    r"DELETE /api/avatars/[0-9a-f]{32} HTTP/1.1\" 204"):
        assert re.search(request, log), request
