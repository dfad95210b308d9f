"""STUN/TURN configuration against a real coturn on loopback: the server allocates a relay through it."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from server_fixtures import free_port, running_server
from test_server_rtc import collect, whip

TURNSERVER = shutil.which("turnserver")
pytestmark = pytest.mark.skipif(TURNSERVER is None, reason="coturn is not installed (make test installs it)")


@pytest.fixture
def turn_url(tmp_path):
    port = free_port()
    relay = free_port()
    command = [TURNSERVER, "-n", "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1",
               "--listening-port", str(port), "--min-port", str(relay), "--max-port", str(relay + 50),
               "--lt-cred-mech", "--user", "alice:turn-secret", "--realm", "emote.test", "--no-tls", "--no-dtls",
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
    yield f"turn:alice:turn-secret@127.0.0.1:{port}", range(relay, relay + 51)
    process.terminate()
    process.wait(timeout=10)


async def test_server_offers_relay_candidates_from_the_turn_server(tmp_path, turn_url):
    import asyncio

    from aiortc import RTCPeerConnection

    url, relay_ports = turn_url
    with running_server(tmp_path, "--ice-server", url) as (base_url, _):
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        video = asyncio.get_running_loop().create_future()
        pc.on("track", lambda track: track.kind == "video" and not video.done() and video.set_result(track))
        _, response = await whip(base_url, pc, mode="presenter")
        relay = [line.split() for line in response.text.splitlines() if "typ relay" in line]
        assert relay, "the answer has no relay candidate: the TURN server was not used"
        # candidate:<foundation> <component> <transport> <priority> <address> <port> typ relay ...
        assert any(c[4] == "127.0.0.1" and int(c[5]) in relay_ports for c in relay), relay
        frames = await collect(await asyncio.wait_for(video, 10), 2.0)
        assert len(frames) > 25
        await pc.close()
