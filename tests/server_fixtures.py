"""A real `emote serve` in a subprocess on a free loopback port, for end-to-end tests (browser, aiortc clients).

    with running_server(tmp_path, "--max-sessions", "1", model=tiny_model_dir) as (base_url, process):
        ...

or `start_server(...)` / `stop_server(process)` when a fixture manages the lifetime itself.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 90.0


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


def get_json(url: str, timeout: float = 5.0, headers: dict | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def start_server(tmp_path: Path, *extra_args: str, model: Path | None = None,
                 env: dict[str, str] | None = None) -> tuple[str, subprocess.Popen]:
    """Start `emote serve` on 127.0.0.1 with a fresh data dir under `tmp_path` and wait until /healthz answers.

    Without `model`, a tiny model is saved under `tmp_path`. The server's output goes to `tmp_path/server.log`,
    which is quoted in the error when it does not come up.
    """
    model = model or make_tiny_model(tmp_path / "tiny-model")
    port = free_port()
    log_path = tmp_path / "server.log"
    command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--model", str(model), "--data-dir", str(tmp_path / "data"), "--log-format", "text", *extra_args]
    with open(log_path, "wb") as log:  # the child keeps its own handle; a file never fills up like a pipe
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
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
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextlib.contextmanager
def running_server(tmp_path: Path, *extra_args: str, model: Path | None = None,
                   env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    base_url, process = start_server(tmp_path, *extra_args, model=model, env=env)
    try:
        yield base_url, process
    finally:
        stop_server(process)
