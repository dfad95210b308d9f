"""A private `emote serve` for reliability runs that are not given a server: a subprocess on a free loopback port,
with a fresh data directory and a random token, stopped gracefully (SIGINT) at the end.

    with local_server(model=None) as (base_url, token):   # None: the bundled default model
        ...
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from avatar.errors import EmoteError

STARTUP_TIMEOUT_S = 180.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def healthz(base_url: str, token: str | None = None, timeout: float = 5.0) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(f"{base_url}/healthz", headers=headers), timeout=timeout) as r:
        return json.loads(r.read())


def stop(process: subprocess.Popen, grace_s: float = 15.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextlib.contextmanager
def local_server(model: Path | None = None, *extra_args: str) -> Iterator[tuple[str, str]]:
    """Start `emote serve` on 127.0.0.1 and yield (base URL, token) once /healthz answers; its log is quoted in the
    error when it does not come up."""
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="emote-reliability-") as tmp:
        port, log_path = free_port(), Path(tmp) / "server.log"
        command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--data-dir", str(Path(tmp) / "data"), "--log-format", "text",
                   *(["--model", str(model)] if model is not None else []), *extra_args]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "EMOTE_TOKEN": token})
        base_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    raise EmoteError(f"emote serve exited with {process.returncode}: {log_path.read_text()[-2000:]}")
                try:
                    healthz(base_url, token, timeout=1.0)
                    break
                except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise EmoteError(f"emote serve did not answer in {STARTUP_TIMEOUT_S:.0f} s: "
                                     f"{log_path.read_text()[-2000:]}")
                time.sleep(0.2)
            yield base_url, token
        finally:
            stop(process)
