"""A real `emote serve` in a subprocess on a free loopback port, for end-to-end tests (browser, aiortc clients).

    with running_server(tmp_path, "--max-sessions", "1") as (base_url, process):
        ...

runs the solid-colour test model (`streaming.testing.SolidColourModel`, no torch model to load); pass
`model=make_tiny_model(...)` for the pixel pipeline, or `model=DEFAULT_MODEL` for the default model (after
`skip_without_default_model()`). `start_server(...)` / `stop_server(process)` when a fixture manages the lifetime.
The server runs with `--no-auth` unless the arguments hold `--token` or `auth=True` is passed (then, without
`--token`, it uses the token it keeps in its data dir: `read_token(tmp_path)`).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from avatar.errors import EmoteError
from server.reliability.local import stop

REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 90.0
DEFAULT_MODEL = "default"  # start_server(model=DEFAULT_MODEL): no --model, the bundled default
TEST_MODEL_SIZE = 64


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_tiny_model(directory: Path) -> Path:
    """Save the tiny random model (fast on CPU) to `directory`, once."""
    if not (directory / "model_index.json").is_file():
        from avatar.pipeline import AvatarPipeline

        AvatarPipeline.from_config("tiny", seed=0).save_pretrained(directory)
    return directory


def make_test_model(directory: Path, size: int = TEST_MODEL_SIZE, **options) -> Path:
    """A model directory that `load_frame_model` opens as `SolidColourModel(width=size, height=size, **options)`."""
    directory.mkdir(parents=True, exist_ok=True)
    description = {"type": "solid-colour", "options": {"width": size, "height": size, **options}}
    (directory / "frame_model.json").write_text(json.dumps(description))
    return directory


def skip_without_default_model() -> None:
    """Skip, with the reason, when the default model cannot load here (its files are not yet in the repo)."""
    import pytest

    try:
        from avatar.models import load_frame_model

        load_frame_model(None)
    except (ImportError, OSError, EmoteError) as exc:
        pytest.skip(f"the default model does not load yet: {type(exc).__name__}: {exc}")


def get_json(url: str, timeout: float = 5.0, headers: dict | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def read_token(tmp_path: Path) -> str:
    """The token a server started with `auth=True` (and no --token) made in its data dir."""
    return (tmp_path / "data" / "token").read_text().strip()


def start_server(tmp_path: Path, *extra_args: str, model: Path | str | None = None,
                 env: dict[str, str] | None = None, auth: bool = False) -> tuple[str, subprocess.Popen]:
    """Start `emote serve` on 127.0.0.1 with a fresh data dir under `tmp_path` and wait until /healthz answers.

    Without `model`, the solid-colour test model (saved under `tmp_path`). The server's output goes to
    `tmp_path/server.log`, which is quoted in the error when it does not come up.
    """
    model = model or make_test_model(tmp_path / "test-model")
    port = free_port()
    log_path = tmp_path / "server.log"
    model_args = [] if model == DEFAULT_MODEL else ["--model", str(model)]
    auth_args = [] if auth or "--token" in extra_args else ["--no-auth"]
    command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               *model_args, "--data-dir", str(tmp_path / "data"), "--log-format", "text", *auth_args, *extra_args]
    inherited = {k: v for k, v in os.environ.items() if k not in ("EMOTE_TOKEN", "EMOTE_TURN_SECRET")}
    with open(log_path, "wb") as log:  # the child keeps its own handle; a file never fills up like a pipe
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**inherited, **(env or {})})
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"emote serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            get_json(f"{base_url}/healthz", timeout=1.0)
            return base_url, process
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            pass
        if time.monotonic() > deadline:
            stop_server(process)
            raise RuntimeError(f"emote serve did not answer /healthz in {STARTUP_TIMEOUT_S:.0f} s:\n"
                               f"{log_path.read_text()[-4000:]}")
        time.sleep(0.2)


def stop_server(process: subprocess.Popen, grace_s: float = 10.0) -> int:
    """SIGINT (uvicorn's graceful shutdown), then SIGKILL if it lingers. Returns the exit code."""
    return stop(process, grace_s)


def assert_error(response, status: int, code: str) -> dict:
    """The response is the server's JSON error `{"error": code, "message": ...}` with this status."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == code and body["message"], body
    return body


@contextlib.contextmanager
def running_server(tmp_path: Path, *extra_args: str, model: Path | str | None = None,
                   env: dict[str, str] | None = None, auth: bool = False) -> Iterator[tuple[str, subprocess.Popen]]:
    base_url, process = start_server(tmp_path, *extra_args, model=model, env=env, auth=auth)
    try:
        yield base_url, process
    finally:
        stop_server(process)
