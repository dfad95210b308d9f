"""The impairing UDP relay with plain UDP sockets on loopback: seeded loss, bounded delay, reordering, blackouts, both
directions, clean close; and the SDP rewriting that routes a real aiortc session through it."""
from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest
from aiortc import RTCPeerConnection

from server.reliability.relay import (Impairment, ImpairedRelay, point_candidates_at, server_candidate,
                                      strip_candidates)


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def drain(sock: socket.socket) -> list[tuple[float, bytes, tuple]]:
    """(arrival, payload, source) of every datagram waiting on `sock`."""
    out = []
    while True:
        try:
            data, source = sock.recvfrom(2048)
        except BlockingIOError:
            return out
        out.append((time.monotonic(), data, source))


async def send_numbered(sock: socket.socket, to, count: int, interval: float) -> list[float]:
    """Datagrams 0..count-1 (sequence number and send time), `interval` apart; returns the send times."""
    sent = []
    for i in range(count):
        now = time.monotonic()
        sock.sendto(struct.pack("!Id", i, now), to)
        sent.append(now)
        await asyncio.sleep(interval)  # asyncio reads one datagram per loop turn: back to back would overflow
    return sent


async def collect(sock: socket.socket, until: float, got: list | None = None) -> list[tuple[float, bytes, tuple]]:
    """Datagrams arriving on `sock` until `until` (into `got`, when given, so a cancelled collection keeps them)."""
    got = [] if got is None else got
    while time.monotonic() < until:
        got += drain(sock)
        await asyncio.sleep(0.002)
    return got + drain(sock)


async def through_relay(impairment: Impairment, count: int, interval: float, settle: float = 0.3):
    """Datagrams from a client socket through a relay to a server socket: (arrivals, up counters, send times relative
    to when the impairment was applied)."""
    server = udp_socket()
    client = udp_socket()
    applied = time.monotonic()
    relay = await ImpairedRelay(server.getsockname(), up=impairment).start()
    try:
        got: list = []
        receiving = asyncio.create_task(collect(server, time.monotonic() + 3600, got))
        sent = await send_numbered(client, relay.address, count, interval)
        await asyncio.sleep(impairment.delay + impairment.jitter + settle)
        receiving.cancel()
        got += drain(server)
        return got, relay.counters["up"], [t - applied for t in sent]
    finally:
        relay.close()
        server.close()
        client.close()


async def test_seeded_loss_is_about_the_rate_asked_and_repeatable():
    runs = []
    for _ in range(2):
        got, counters, _ = await through_relay(Impairment(loss=0.05, seed=7), 1000, 0.0005)
        runs.append({struct.unpack("!Id", data)[0] for _, data, _ in got})
        assert counters.received == 1000 and counters.forwarded + counters.dropped == 1000
        assert counters.forwarded == len(got)
    assert 0.03 <= 1 - len(runs[0]) / 1000 <= 0.07, f"{1000 - len(runs[0])} of 1000 lost"
    assert runs[0] == runs[1], "the same seed loses the same datagrams"
    other, _, _ = await through_relay(Impairment(loss=0.05, seed=8), 1000, 0.0005)
    assert {struct.unpack("!Id", d)[0] for _, d, _ in other} != runs[0]


async def test_delay_stays_within_its_bounds_and_reorders():
    got, counters, _ = await through_relay(Impairment(delay=0.05, jitter=0.02, seed=1), 200, 0.004)
    assert len(got) == 200 and counters.dropped == 0
    delays = [arrival - struct.unpack("!Id", data)[1] for arrival, data, _ in got]
    assert min(delays) >= 0.03 - 0.001, min(delays)
    # Never early; late only by the event loop's hiccups (2 busy cores), so the upper bound holds for most.
    assert sorted(delays)[int(0.8 * len(delays))] <= 0.07 + 0.015, sorted(delays)[-40:]
    assert sum(d > 0.06 for d in delays) > 20 and sum(d < 0.04 for d in delays) > 20, "spread over ± 20 ms"
    order = [struct.unpack("!Id", data)[0] for _, data, _ in got]
    assert order != sorted(order) and counters.reordered > 10, "4 ms apart with ± 20 ms jitter: some overtake"


async def test_a_blackout_drops_everything_inside_it_and_nothing_outside():
    got, counters, sent = await through_relay(Impairment(blackouts=((0.3, 0.4),)), 100, 0.01)
    arrived = {struct.unpack("!Id", data)[0] for _, data, _ in got}
    inside = {i for i, t in enumerate(sent) if 0.32 <= t <= 0.68}  # margins: the relay took its clock just after
    outside = {i for i, t in enumerate(sent) if t <= 0.28 or t >= 0.72}
    assert len(inside) > 20 and len(outside) > 40
    assert not inside & arrived and outside <= arrived, sorted(set(range(100)) - arrived)
    assert counters.blacked_out == 100 - len(arrived) and counters.dropped == 0


async def test_both_directions_and_each_client_gets_its_own_server_side_address():
    server, first, second = udp_socket(), udp_socket(), udp_socket()
    relay = await ImpairedRelay(server.getsockname(), down=Impairment(delay=0.01)).start()
    try:
        first.sendto(b"from first", relay.address)
        second.sendto(b"from second", relay.address)
        got = await collect(server, time.monotonic() + 0.3)
        sources = {data: source for _, data, source in got}
        assert set(sources) == {b"from first", b"from second"}
        assert sources[b"from first"] != sources[b"from second"], "one server-facing socket per client"
        assert sources[b"from first"][0] == "127.0.0.1"
        for data, source in sources.items():
            server.sendto(b"reply to " + data, source)
        stranger = udp_socket()
        stranger.sendto(b"from a stranger", sources[b"from first"])  # not the server: never forwarded to a client
        replies = {name: [d for _, d, _ in await collect(sock, time.monotonic() + 0.3)]
                   for name, sock in (("first", first), ("second", second))}
        assert replies == {"first": [b"reply to from first"], "second": [b"reply to from second"]}
        assert relay.counters["down"].forwarded == 2 and relay.counters["up"].forwarded == 2
        stranger.close()
    finally:
        relay.close()
    for sock in (server, first, second):
        sock.close()


async def test_close_cancels_datagrams_still_in_flight():
    server, client = udp_socket(), udp_socket()
    relay = await ImpairedRelay(server.getsockname(), up=Impairment(delay=0.2)).start()
    client.sendto(b"late", relay.address)
    await asyncio.sleep(0.05)
    relay.close()
    assert not await collect(server, time.monotonic() + 0.4)
    server.close()
    client.close()


def test_impairments_are_checked():
    with pytest.raises(ValueError):
        Impairment(loss=1.5)
    with pytest.raises(ValueError):
        Impairment(delay=-0.1)
    blackout = Impairment(blackouts=((1.0, 2.0),))
    assert blackout.in_blackout(2.5) and not blackout.in_blackout(3.0) and not blackout.in_blackout(0.9)


async def test_sdp_rewrites_leave_the_relay_as_the_only_way_in():
    offerer, answerer = RTCPeerConnection(), RTCPeerConnection()
    try:
        offerer.addTransceiver("video", direction="recvonly")
        offerer.addTransceiver("audio", direction="recvonly")
        await offerer.setLocalDescription(await offerer.createOffer())
        offer = offerer.localDescription.sdp
        assert "a=candidate:" in offer
        stripped = strip_candidates(offer)
        assert "a=candidate:" not in stripped and "a=end-of-candidates" not in stripped
        assert stripped.count("m=") == offer.count("m=") and "a=fingerprint" in stripped

        from aiortc import RTCSessionDescription

        await answerer.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await answerer.setLocalDescription(await answerer.createAnswer())
        answer = answerer.localDescription.sdp
        host, port = server_candidate(answer)
        assert f" {host} {port} typ host" in answer
        routed = point_candidates_at(answer, ("127.0.0.1", 40000))
        candidates = [line for line in routed.splitlines() if line.startswith("a=candidate:")]
        assert len(candidates) == routed.count("m=") and all(" 127.0.0.1 40000 typ host" in c for c in candidates)
        with pytest.raises(ValueError):
            server_candidate(stripped)
    finally:
        await offerer.close()
        await answerer.close()
