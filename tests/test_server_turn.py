"""STUN/TURN configuration against a real coturn on loopback: the server allocates a relay through it, with static
long-term credentials or with coturn's short-lived REST credentials (`use-auth-secret`)."""
from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import time

import httpx
import pytest

from server_fixtures import free_port, running_server
from test_server_rtc import collect, whip

TURNSERVER = shutil.which("turnserver")
pytestmark = pytest.mark.skipif(TURNSERVER is None, reason="coturn is not installed (make test installs it)")

TURN_SECRET = "coturn-shared-secret-for-tests"
TOKEN = "turn-tests-token-0123456789"


def start_coturn(tmp_path, *auth_args: str):
    """coturn on 127.0.0.1 with `auth_args`; returns the process, its port and its relay port range."""
    port = free_port()
    relay = free_port()
    command = [TURNSERVER, "-n", "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1",
               "--listening-port", str(port), "--min-port", str(relay), "--max-port", str(relay + 50),
               *auth_args, "--realm", "emote.test", "--no-tls", "--no-dtls",
               "--no-cli", "--allow-loopback-peers", "--simple-log", "--log-file", str(tmp_path / "turn.log")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:  # coturn also listens on TCP: wait until it accepts connections
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("coturn did not start")
            time.sleep(0.1)
    return process, port, range(relay, relay + 51)


def stop_coturn(process) -> None:
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def turn_url(tmp_path):
    process, port, relay_ports = start_coturn(tmp_path, "--lt-cred-mech", "--user", "alice:turn-secret")
    yield f"turn:alice:turn-secret@127.0.0.1:{port}", relay_ports
    stop_coturn(process)


@pytest.fixture
def rest_turn(tmp_path):
    """coturn with `use-auth-secret`: it accepts `<expiry>:<user>` / base64(HMAC-SHA1(secret, user)) until expiry."""
    process, port, relay_ports = start_coturn(tmp_path, "--use-auth-secret", f"--static-auth-secret={TURN_SECRET}")
    yield port, relay_ports
    stop_coturn(process)


async def relayed_presenter_session(base_url: str, relay_ports: range, headers: dict | None = None) -> None:
    """A WHIP presenter session whose answer carries a relay candidate from coturn, and whose video plays."""
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    video = asyncio.get_running_loop().create_future()
    pc.on("track", lambda track: track.kind == "video" and not video.done() and video.set_result(track))
    _, response = await whip(base_url, pc, mode="presenter", headers=headers)
    relay = [line.split() for line in response.text.splitlines() if "typ relay" in line]
    assert relay, "the answer has no relay candidate: the TURN server was not used"
    # candidate:<foundation> <component> <transport> <priority> <address> <port> typ relay ...
    assert any(c[4] == "127.0.0.1" and int(c[5]) in relay_ports for c in relay), relay
    frames = await collect(await asyncio.wait_for(video, 10), 2.0)
    assert len(frames) > 25
    await pc.close()


async def test_server_offers_relay_candidates_from_the_turn_server(tmp_path, turn_url):
    url, relay_ports = turn_url
    with running_server(tmp_path, "--ice-server", url) as (base_url, _):
        await relayed_presenter_session(base_url, relay_ports)


async def test_rest_credentials_relay_a_session_through_coturn(tmp_path, rest_turn):
    port, relay_ports = rest_turn
    args = ("--token", TOKEN, "--turn-secret", TURN_SECRET, "--turn-url", f"turn:127.0.0.1:{port}", "--turn-ttl", "600")
    with running_server(tmp_path, *args) as (base_url, _):
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=base_url) as client:
            assert (await client.get("/api/config")).json()["ice_servers"] == [], "credentials need the token"
            config = (await client.get("/api/config", headers=headers)).json()
        (server,) = config["ice_servers"]
        assert server["urls"] == f"turn:127.0.0.1:{port}" and config["ice_servers_ttl"] == 600
        expiry, user = re.fullmatch(r"(\d+):(\w+)", server["username"]).groups()
        assert user == "emote" and abs(int(expiry) - (time.time() + 600)) < 30
        assert TURN_SECRET not in str(config)
        # The server's own peer gets fresh credentials for each session from the same secret.
        await relayed_presenter_session(base_url, relay_ports, headers)
        # The browser's credentials work with coturn as well.
        await allocate(port, server["username"], server["credential"])
    assert TURN_SECRET not in (tmp_path / "server.log").read_text()


async def allocate(port: int, username: str, password: str):
    """A TURN allocation on coturn with these credentials (aioice's TURN client); returns the relayed address."""
    from aioice import turn

    transport, _ = await turn.create_turn_endpoint(asyncio.DatagramProtocol, server_addr=("127.0.0.1", port),
                                                   username=username, password=password)
    try:
        return transport.get_extra_info("sockname")
    finally:
        transport.close()


async def test_coturn_refuses_expired_rest_credentials(rest_turn):
    from aioice import stun

    from server.security import turn_rest_credentials

    port, relay_ports = rest_turn
    relayed = await allocate(port, *turn_rest_credentials(TURN_SECRET, ttl=60))
    assert relayed[1] in relay_ports
    expired = turn_rest_credentials(TURN_SECRET, ttl=60, now=time.time() - 120)  # expired a minute ago
    with pytest.raises(stun.TransactionFailed, match="401"):
        await allocate(port, *expired)
    forged = turn_rest_credentials("not-the-secret-at-all", ttl=600)
    with pytest.raises(stun.TransactionFailed, match="401"):
        await allocate(port, *forged)
