"""What the test peer sees of its incoming video at the RTP level, by wrapping its aiortc receiver's packet handler
(aiortc has no public hook, and its decoded frames carry no keyframe flag):

- keyframe arrivals (`FrameStats.keyframes`);
- optionally, a browser's keyframe request on a stall. aiortc's receiver waits for every missing packet in sequence
  order and asks for retransmission of the last 128 only, so after a loss longer than that (a 3 s blackout at
  512 px is about 150 packets) it freezes until 512 more packets have come (about 10 s). Browsers (libwebrtc)
  instead give up on the missing packets and send a PLI. With `stall_s`, this tap does the same: when packets
  arrive but no frame has decoded for `stall_s`, it sends a PLI and drops packets until a keyframe starts, then
  restarts aiortc's jitter buffer and NACK state from there. Written against aiortc 1.16 (pinned ~=1.16).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .peer import FrameStats

RECHECK_S = 0.05


def keyframe_start(mime: str, payload: bytes) -> bool:
    """Whether an RTP payload starts a keyframe: VP8 (RFC 7741) the first packet of partition 0 with P = 0; H.264 an
    IDR or SPS NAL unit (single, first fragment of FU-A, or inside STAP-A)."""
    from aiortc.codecs.vpx import VpxPayloadDescriptor

    try:
        if mime == "video/vp8":
            descriptor, data = VpxPayloadDescriptor.parse(payload)
            return bool(descriptor.partition_start and descriptor.partition_id == 0 and data and not data[0] & 1)
        if mime == "video/h264":
            nal = payload[0] & 0x1F
            if nal == 28:  # FU-A
                return bool(payload[1] & 0x80) and payload[1] & 0x1F in (5, 7)
            if nal == 24:  # STAP-A: 2-byte sizes, each followed by a NAL unit
                pos, types = 1, []
                while pos + 2 < len(payload):
                    types.append(payload[pos + 2] & 0x1F)
                    pos += 2 + int.from_bytes(payload[pos : pos + 2], "big")
                return any(t in (5, 7) for t in types)
            return nal in (5, 7)
    except (ValueError, IndexError):
        pass
    return False


def _before(a: int, b: int) -> bool:
    """RTP sequence number `a` comes before `b` (16-bit, wrapping)."""
    return a != b and (b - a) % 65536 < 32768


class VideoTap:
    def __init__(self, transceiver, stats: "FrameStats", stall_s: float | None = None):
        self.receiver = transceiver.receiver
        self.stats = stats
        self.stall_s = stall_s
        self.codecs = {c.payloadType: c for c in getattr(transceiver, "_codecs", [])}
        self.keyframe_requests = 0  # PLIs this tap sent
        self._handle = self.receiver._handle_rtp_packet
        self._recent: collections.deque = collections.deque(maxlen=16)  # keyframe timestamps already counted
        self._origin: int | None = None  # the first packet's RTP timestamp, as aiortc's receiver maps them
        self._last_packet = 0.0
        self._ssrc: int | None = None
        self._waiting_since: float | None = None  # a PLI went out; packets are dropped until a keyframe starts
        self._restart_seq: int | None = None  # older packets (late retransmissions) are dropped after a restart
        self._restarted = 0.0
        self._watchdog: asyncio.Task | None = None
        self.receiver._handle_rtp_packet = self._tapped
        if stall_s is not None:
            self._watchdog = asyncio.create_task(self._watch(), name="video-stall-watchdog")

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog

    async def _tapped(self, packet, arrival_time_ms: int) -> None:
        now = time.monotonic()
        codec, payload, seq = self.codecs.get(packet.payload_type), packet.payload, packet.sequence_number
        rtx = codec is not None and codec.mimeType.lower() == "video/rtx"
        if rtx:
            if len(payload) < 2:
                return await self._handle(packet, arrival_time_ms=arrival_time_ms)  # padding
            codec = self.codecs.get(codec.parameters.get("apt"))
            seq, payload = int.from_bytes(payload[:2], "big"), payload[2:]  # RFC 4588: the original seq, then payload
        else:
            self._ssrc = packet.ssrc
        self._last_packet = now
        if self._origin is None:
            self._origin = packet.timestamp
        key = codec is not None and keyframe_start(codec.mimeType.lower(), payload)
        if key and packet.timestamp not in self._recent:
            from .peer import KeyframeRecord

            self._recent.append(packet.timestamp)
            self.stats.keyframes.append(KeyframeRecord(now, (packet.timestamp - self._origin) % 2**32))
        if self._waiting_since is not None:
            if not key or rtx:  # a retransmitted keyframe is an old one
                return
            self._restart(seq)
        elif self._restart_seq is not None and _before(seq, self._restart_seq):
            return
        await self._handle(packet, arrival_time_ms=arrival_time_ms)

    def _restart(self, seq: int) -> None:
        """Start aiortc's jitter buffer and NACK list afresh at this keyframe's first packet."""
        from aiortc.jitterbuffer import JitterBuffer
        from aiortc.rtcrtpreceiver import NackGenerator

        self.receiver._RTCRtpReceiver__jitter_buffer = JitterBuffer(capacity=512, is_video=True)
        self.receiver._RTCRtpReceiver__nack_generator = NackGenerator()
        self._waiting_since, self._restart_seq, self._restarted = None, seq, time.monotonic()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(RECHECK_S)
            now = time.monotonic()
            last_frame = self.stats.records[-1].arrival if self.stats.records else None
            if last_frame is None or self._ssrc is None or now - self._last_packet > 2 * RECHECK_S:
                continue  # not started yet, or nothing arrives (a blackout): nothing a keyframe would fix
            if self._waiting_since is not None:
                if now - self._waiting_since > 4 * self.stall_s:  # the PLI or the keyframe was lost: ask again
                    await self._request(now)
            elif now - max(last_frame, self._restarted) > self.stall_s:  # a restart gets its own time to decode
                await self._request(now)

    async def _request(self, now: float) -> None:
        self._waiting_since = now
        self.keyframe_requests += 1
        with contextlib.suppress(ConnectionError):
            await self.receiver._send_rtcp_pli(self._ssrc)
