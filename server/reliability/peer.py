"""A small WHIP client on aiortc for reliability runs against `emote serve`: open a session, record every decoded
frame, read the server's statistics, then leave politely (DELETE) or vanish.

    peer = await open_session("http://127.0.0.1:8080", mode="presenter", token=None)
    await asyncio.sleep(5)
    peer.video.fps(), peer.video.longest_gap(), len(peer.audio.records)
    (await peer.stats())["counters"]["frames_emitted"]  # GET on the session's Location
    await peer.close()                                    # DELETE, then close the peer connection
    await peer.close(delete=False)                        # vanish: no DELETE; the server must notice by itself

A mic session sends `audio_track` (e.g. `MediaPlayer(wav, loop=True).audio`; the caller stops it), or, without one,
an audio transceiver that sends nothing. In presenter mode the server's audio comes back and is recorded too.
`rewrite_offer` / `rewrite_answer` (SDP text -> SDP text, or an awaitable of it) edit the SDP on its way out and in,
e.g. to route ICE through `server.reliability.relay.ImpairedRelay` (see `relay.RelayRoute`). `stall_pli_s` makes
the peer ask for a keyframe when its picture stalls, as browsers do and aiortc does not (see `rtp_tap`).
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Union

import httpx
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from .rtp_tap import VideoTap

SdpRewrite = Callable[[str], Union[str, Awaitable[str]]]


class WhipError(Exception):
    """The server refused the offer: `status` and its JSON body (`{"error": ..., "message": ...}`) when it sent one."""

    def __init__(self, status: int, body: dict | str, headers: dict[str, str] | None = None):
        self.status, self.body, self.headers = status, body, headers or {}
        code = body.get("error") if isinstance(body, dict) else None
        super().__init__(f"POST /api/sessions answered {status}" + (f" ({code})" if code else ""))


@dataclass(frozen=True)
class FrameRecord:
    arrival: float  # time.monotonic() when the decoded frame came out of the track
    pts: int | None  # on the track's clock: 90 kHz video, 48 kHz audio (aiortc starts each stream at 0)
    size: tuple[int, int]  # video: (width, height); audio: (samples per channel, channels)


@dataclass(frozen=True)
class KeyframeRecord:
    arrival: float  # when the keyframe's first RTP packet arrived (a retransmitted one too)
    pts: int  # its RTP timestamp from the stream's first packet: the decoded frames' pts when they start alike


@dataclass
class FrameStats:
    """Every decoded frame of one received track, and summaries over time windows (monotonic seconds)."""

    kind: str
    records: list[FrameRecord] = field(default_factory=list)
    # Video: the keyframes that arrived (the decoder does not flag keyframes; the RTP payload does).
    keyframes: list[KeyframeRecord] = field(default_factory=list)
    ended: bool = False  # the track ended (the peer connection closed, or the server stopped sending)

    def record(self, frame) -> None:
        size = (frame.width, frame.height) if self.kind == "video" else (frame.samples, len(frame.layout.channels))
        self.records.append(FrameRecord(time.monotonic(), frame.pts, size))

    def between(self, start: float | None = None, end: float | None = None) -> list[FrameRecord]:
        return [r for r in self.records if (start is None or r.arrival >= start) and (end is None or r.arrival < end)]

    def fps(self, start: float | None = None, end: float | None = None) -> float:
        """Frames per second decoded in [start, end) (by default from the first frame to the last)."""
        frames = self.between(start, end)
        if not frames:
            return 0.0
        start = frames[0].arrival if start is None else start
        end = frames[-1].arrival if end is None else end
        return len(frames) / (end - start) if end > start else 0.0

    def longest_gap(self, start: float | None = None, end: float | None = None) -> float:
        """The longest time without a new frame in [start, end), the window's edges included (a freeze)."""
        times = [r.arrival for r in self.between(start, end)]
        edges = ([start] if start is not None else []) + times + ([end] if end is not None else [])
        return max((b - a for a, b in zip(edges, edges[1:])), default=0.0)

    def first_after(self, t: float) -> FrameRecord | None:
        """The first frame decoded at or after `t`."""
        return next((r for r in self.records if r.arrival >= t), None)

    def first_keyframe_after(self, t: float) -> KeyframeRecord | None:
        """The first keyframe that arrived at or after `t` (video only)."""
        return next((k for k in self.keyframes if k.arrival >= t), None)

    async def wait_for(self, count: int, timeout: float) -> None:
        """Until `count` frames have arrived; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while len(self.records) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.records)} of {count} {self.kind} frames in {timeout:.0f} s")
            await asyncio.sleep(0.05)


@dataclass
class WhipPeer:
    """One open session: its connection, where the server keeps it, and what was received."""

    base_url: str
    mode: str
    pc: RTCPeerConnection
    location: str  # /api/sessions/{id}
    headers: dict[str, str]
    video: FrameStats = field(default_factory=lambda: FrameStats("video"))
    audio: FrameStats = field(default_factory=lambda: FrameStats("audio"))
    tracks: dict[str, MediaStreamTrack] = field(default_factory=dict)  # received tracks by kind
    tasks: list[asyncio.Task] = field(default_factory=list)
    video_tap: VideoTap | None = None
    closed: bool = False

    @property
    def session_id(self) -> str:
        return self.location.rstrip("/").rsplit("/", 1)[-1]

    async def stats(self, timeout: float = 10.0) -> dict:
        """The server's live statistics of this session (raises httpx.HTTPStatusError once it is gone)."""
        async with httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout) as client:
            response = await client.get(self.location)
        response.raise_for_status()
        return response.json()

    async def close(self, delete: bool = True, timeout: float = 10.0) -> int | None:
        """DELETE the session (its status code is returned) unless `delete` is False, then close the connection."""
        if self.closed:
            return None
        self.closed = True
        status = None
        if delete:
            with contextlib.suppress(httpx.HTTPError):
                async with httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout) as client:
                    status = (await client.delete(self.location)).status_code
        if self.video_tap is not None:
            await self.video_tap.close()
        await self.pc.close()
        for task in self.tasks:  # closing the connection ends the tracks, which ends the receive loops
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, timeout)
        return status


async def _receive(track: MediaStreamTrack, stats: FrameStats) -> None:
    try:
        while True:
            stats.record(await track.recv())
    except MediaStreamError:
        pass
    finally:
        stats.ended = True


async def _apply(rewrite: SdpRewrite | None, sdp: str) -> str:
    if rewrite is None:
        return sdp
    result = rewrite(sdp)
    return await result if inspect.isawaitable(result) else result


async def open_session(base_url: str, mode: str = "mic", avatar: str = "default", token: str | None = None,
                       audio_track: MediaStreamTrack | None = None, rewrite_offer: SdpRewrite | None = None,
                       rewrite_answer: SdpRewrite | None = None, configuration: RTCConfiguration | None = None,
                       stall_pli_s: float | None = None, timeout: float = 30.0) -> WhipPeer:
    """POST an offer to `{base_url}/api/sessions` and connect. Raises WhipError when the server refuses it.

    Frames are recorded from the moment the answer is applied; `await peer.video.wait_for(1, timeout)` waits for
    the picture. `stall_pli_s`: recover from a stall as a browser does, with a keyframe request (see rtp_tap)."""
    if mode not in ("mic", "presenter"):
        raise ValueError(f"mode must be 'mic' or 'presenter', got {mode!r}")
    base_url = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    pc = RTCPeerConnection(configuration)
    try:
        pc.addTransceiver("video", direction="recvonly")
        if audio_track is not None:
            pc.addTrack(audio_track)
        else:
            pc.addTransceiver("audio", direction="sendonly" if mode == "mic" else "recvonly")
        received: dict[str, MediaStreamTrack] = {}
        pc.on("track", lambda track: received.setdefault(track.kind, track))
        await pc.setLocalDescription(await pc.createOffer())
        offer = await _apply(rewrite_offer, pc.localDescription.sdp)
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout) as client:
            response = await client.post("/api/sessions", params={"mode": mode, "avatar": avatar}, content=offer,
                                         headers={"Content-Type": "application/sdp"})
        if response.status_code != 201:
            try:
                body: dict | str = response.json()
            except ValueError:
                body = response.text
            raise WhipError(response.status_code, body, dict(response.headers))
        peer = WhipPeer(base_url, mode, pc, response.headers["Location"], headers)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(await _apply(rewrite_answer, response.text), "answer"))
        except BaseException:
            await peer.close()  # the server made the session: DELETE it
            raise
    except BaseException:
        await pc.close()
        raise
    for transceiver in pc.getTransceivers():
        if transceiver.kind == "video":
            peer.video_tap = VideoTap(transceiver, peer.video, stall_pli_s)
    # aiortc announces the remote tracks while it applies the answer.
    for kind, track in received.items():
        peer.tracks[kind] = track
        stats = peer.video if kind == "video" else peer.audio
        peer.tasks.append(asyncio.create_task(_receive(track, stats), name=f"whip-{kind}-{peer.session_id[:8]}"))
    return peer
