"""A user-space impaired network: an asyncio UDP relay on loopback that drops, delays (and so reorders) and blacks
out datagrams between a WebRTC client and the server, on a seeded schedule per direction. For kernels without netem.

    relay = ImpairedRelay(("192.0.2.2", 51234))        # the server's ICE candidate
    await relay.start()                                 # relay.address: where the client sends instead
    relay.impair(up=Impairment(loss=0.05, delay=0.05, jitter=0.02, seed=1), down=Impairment(...))
    relay.counters["down"].forwarded, relay.counters["down"].dropped
    relay.close()

"up" is client -> server (the microphone), "down" server -> client (the picture). Each client address (one per
local ICE candidate) gets its own server-facing socket, as a NAT would give it. `RelayRoute` puts a relay into a
WHIP exchange: the offer loses its candidates and the answer's are replaced by the relay's address, so ICE can only
go through it (the server learns the client as a peer-reflexive candidate: the relay's server-facing socket).
"""
from __future__ import annotations

import asyncio
import ipaddress
import random
import re
import time
from dataclasses import asdict, dataclass, field

Address = tuple[str, int]
DIRECTIONS = ("up", "down")


@dataclass(frozen=True)
class Impairment:
    """What one direction suffers. Each datagram is lost with probability `loss`, else delayed by a uniform
    `delay` ± `jitter` seconds (delays that overlap reorder datagrams). Inside a blackout every datagram is dropped;
    blackouts are (start, duration) in seconds from when the impairment was applied."""

    loss: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    blackouts: tuple[tuple[float, float], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss must be a probability, got {self.loss}")
        if self.delay < 0 or self.jitter < 0:
            raise ValueError("delay and jitter must not be negative")
        if any(duration < 0 for _, duration in self.blackouts):
            raise ValueError("a blackout's duration must not be negative")

    def in_blackout(self, elapsed: float) -> bool:
        return any(start <= elapsed < start + duration for start, duration in self.blackouts)


CLEAN = Impairment()


@dataclass
class Counters:
    received: int = 0
    bytes_received: int = 0
    forwarded: int = 0
    dropped: int = 0  # random loss
    blacked_out: int = 0
    reordered: int = 0  # forwarded ahead of a datagram that arrived before it
    bytes_forwarded: int = 0
    # RTCP feedback that arrived (before loss), by the first packet of each (S)RTCP datagram, whose header is clear
    nacks: int = 0
    plis: int = 0
    firs: int = 0

    def note_feedback(self, data: bytes) -> None:
        # RFC 5761: RTP and RTCP share the port; RTCP packet types are 192-223. RTPFB (205) FMT 1 is a NACK,
        # PSFB (206) FMT 1 a PLI and FMT 4 a FIR.
        if len(data) < 8 or data[0] >> 6 != 2 or not 192 <= data[1] <= 223:
            return
        fmt = data[0] & 0x1F
        if data[1] == 205 and fmt == 1:
            self.nacks += 1
        elif data[1] == 206 and fmt == 1:
            self.plis += 1
        elif data[1] == 206 and fmt == 4:
            self.firs += 1


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, on_datagram):
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.on_datagram(data, addr[:2])

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable after the peer closed
        pass


@dataclass
class _Direction:
    impairment: Impairment = CLEAN
    since: float = field(default_factory=time.monotonic)
    rng: random.Random = field(default_factory=random.Random)
    last_due: float = 0.0
    counters: Counters = field(default_factory=Counters)


class ImpairedRelay:
    """Forwards datagrams between the clients that send to `address` and one server address, impaired per
    direction. Bind it on loopback (aioice pairs a 127.0.0.1 remote candidate with any local IPv4 candidate)."""

    def __init__(self, server: Address, up: Impairment = CLEAN, down: Impairment = CLEAN, host: str = "127.0.0.1"):
        self.server = (server[0], int(server[1]))
        self.host = host
        self._directions = {"up": _Direction(), "down": _Direction()}
        self.impair(up=up, down=down)
        self._listener: _Endpoint | None = None
        self._upstream: dict[Address, _Endpoint] = {}  # client address -> its server-facing socket
        self._pending: set[asyncio.TimerHandle] = set()
        self._starting: dict[Address, asyncio.Task] = {}
        self.closed = False

    @property
    def address(self) -> Address:
        """Where clients send: the listening socket's (host, port)."""
        assert self._listener is not None and self._listener.transport is not None, "start() first"
        return self._listener.transport.get_extra_info("sockname")[:2]

    @property
    def counters(self) -> dict[str, Counters]:
        return {name: d.counters for name, d in self._directions.items()}

    def snapshot(self) -> dict[str, dict[str, int]]:
        """The counters now, per direction, as plain dicts."""
        return {name: asdict(d.counters) for name, d in self._directions.items()}

    @property
    def clients(self) -> list[Address]:
        return list(self._upstream)

    async def start(self) -> "ImpairedRelay":
        loop = asyncio.get_running_loop()
        _, self._listener = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self._from_client), local_addr=(self.host, 0))
        return self

    def impair(self, up: Impairment | None = None, down: Impairment | None = None) -> None:
        """Switch a direction's impairment now; its blackouts count from now and its random stream restarts
        from its seed (a different stream per direction)."""
        for name, impairment in (("up", up), ("down", down)):
            if impairment is not None:
                direction = self._directions[name]
                direction.impairment, direction.since = impairment, time.monotonic()
                direction.rng = random.Random(f"{impairment.seed}-{name}")

    def close(self) -> None:
        self.closed = True
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()
        for task in self._starting.values():
            task.cancel()
        for endpoint in [self._listener, *self._upstream.values()]:
            if endpoint is not None and endpoint.transport is not None:
                endpoint.transport.close()
        self._upstream.clear()

    async def __aenter__(self) -> "ImpairedRelay":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        self.close()

    # ---- forwarding ---------------------------------------------------------------------------------------------

    def _from_client(self, data: bytes, client: Address) -> None:
        upstream = self._upstream.get(client)
        if upstream is not None:
            self._forward("up", data, upstream, self.server)
        elif not self.closed:
            # The first datagram from a new client address opens its server-facing socket; it and any that arrive
            # meanwhile are forwarded once the socket exists (binding takes one loop turn).
            waiting = self._starting.get(client)
            if waiting is None:
                waiting = self._starting[client] = asyncio.ensure_future(self._open_upstream(client))
            waiting.add_done_callback(
                lambda task: task.cancelled() or task.exception() or self._from_client(data, client))

    async def _open_upstream(self, client: Address) -> None:
        # A socket bound to 127.0.0.1 reaches only loopback; a server on an interface address (this host's own
        # ones are still delivered over lo) or on another host needs the wildcard.
        host = self.host if ipaddress.ip_address(self.server[0]).is_loopback else "0.0.0.0"
        loop = asyncio.get_running_loop()
        _, endpoint = await loop.create_datagram_endpoint(
            lambda: _Endpoint(lambda data, source: self._from_server(data, source, client)), local_addr=(host, 0))
        if self.closed:
            endpoint.transport.close()
            return
        self._upstream[client] = endpoint
        self._starting.pop(client, None)

    def _from_server(self, data: bytes, source: Address, client: Address) -> None:
        if source == self.server and self._listener is not None:
            self._forward("down", data, self._listener, client)

    def _forward(self, name: str, data: bytes, endpoint: _Endpoint, to: Address) -> None:
        direction = self._directions[name]
        impairment, counters = direction.impairment, direction.counters
        counters.received += 1
        counters.bytes_received += len(data)
        counters.note_feedback(data)
        now = time.monotonic()
        if impairment.in_blackout(now - direction.since):
            counters.blacked_out += 1
            return
        # Both draws happen for every datagram, so one direction's schedule does not depend on which were lost.
        lost = direction.rng.random() < impairment.loss
        delay = max(0.0, impairment.delay + impairment.jitter * (2 * direction.rng.random() - 1))
        if lost:
            counters.dropped += 1
            return
        due = now + delay
        if due < direction.last_due:
            counters.reordered += 1
        direction.last_due = max(direction.last_due, due)
        if delay <= 0:
            self._send(endpoint, data, to, counters)
            return
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._pending.discard(handle)
            self._send(endpoint, data, to, counters)

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._pending.add(handle)

    def _send(self, endpoint: _Endpoint, data: bytes, to: Address, counters: Counters) -> None:
        if endpoint.transport is None or endpoint.transport.is_closing():
            return
        endpoint.transport.sendto(data, to)
        counters.forwarded += 1
        counters.bytes_forwarded += len(data)


# ---- routing a WHIP session through a relay -------------------------------------------------------------------------

_CANDIDATE = re.compile(r"^a=candidate:(\S+) (\d+) (\S+) (\d+) (\S+) (\d+) typ (\S+)(.*)$")


def strip_candidates(sdp: str) -> str:
    """The offer without its ICE candidates (and without end-of-candidates, so the server keeps waiting for the
    client's checks instead of failing ICE at once): the server learns the client's address only from the relay."""
    lines = [line for line in sdp.splitlines() if not line.startswith(("a=candidate:", "a=end-of-candidates"))]
    return "\r\n".join(lines) + "\r\n"


def server_candidate(sdp: str) -> Address:
    """The highest-priority IPv4 UDP candidate of an answer: where a relay must forward to."""
    best: tuple[int, Address] | None = None
    for line in sdp.splitlines():
        match = _CANDIDATE.match(line.strip())
        if match and match.group(3).lower() == "udp" and ":" not in match.group(5):
            priority, address = int(match.group(4)), (match.group(5), int(match.group(6)))
            if best is None or priority > best[0]:
                best = (priority, address)
    if best is None:
        raise ValueError("the answer has no IPv4 UDP candidate")
    return best[1]


def point_candidates_at(sdp: str, address: Address) -> str:
    """The answer with one host candidate per media section, at `address` (the relay), instead of its own."""
    out, placed = [], False
    for line in sdp.splitlines():
        if line.startswith("m="):
            placed = False
        match = _CANDIDATE.match(line.strip())
        if match:
            if not placed:
                foundation, component, _, priority = match.group(1, 2, 3, 4)
                out.append(f"a=candidate:{foundation} {component} udp {priority} {address[0]} {address[1]} typ host")
                placed = True
            continue
        out.append(line)
    return "\r\n".join(out) + "\r\n"


@dataclass
class RelayRoute:
    """Routes one WHIP session through an `ImpairedRelay`: pass `strip_candidates` as the peer's `rewrite_offer`
    and `route.rewrite_answer` as its `rewrite_answer`; `route.relay` exists once the answer is in."""

    up: Impairment = CLEAN
    down: Impairment = CLEAN
    host: str = "127.0.0.1"
    relay: ImpairedRelay | None = None

    async def rewrite_answer(self, sdp: str) -> str:
        self.relay = await ImpairedRelay(server_candidate(sdp), self.up, self.down, self.host).start()
        return point_candidates_at(sdp, self.relay.address)

    def close(self) -> None:
        if self.relay is not None:
            self.relay.close()
