"""Peer sessions: one RTCPeerConnection wired to one streaming session, with limits, timeouts and teardown that
frees everything the session held."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from avatar.errors import EmoteError

from .avatars import AvatarStore
from .memory import release_session_memory
from .rtc import AvatarAudioTrack, AvatarVideoTrack, consume_audio, discard, pump_output
from .settings import Settings

logger = logging.getLogger("emote.sessions")

MODES = ("mic", "presenter")
LIVE_BACKLOG_S = 0.3
RELEASE_DELAY_S = 0.5  # after a session closes, before its memory is collected
PEER_SILENCE_S = 10.0  # no RTCP receiver report for this long: the peer is gone (tab closed, network lost)


class ServerFull(Exception):
    pass


class SessionNotFound(KeyError):
    pass


@dataclass
class PeerSession:
    id: str
    mode: str
    avatar_id: str
    pc: RTCPeerConnection
    stream: object  # streaming.Session
    video: AvatarVideoTrack
    audio: AvatarAudioTrack | None
    created: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    tasks: list[asyncio.Task] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str | None = None
    on_closed: Callable[["PeerSession"], None] | None = None

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def push_audio(self, pcm, sample_rate: int, channels: int) -> None:
        self.touch()
        self.stream.push_audio(pcm, sample_rate, channels)

    def interrupt(self) -> None:
        self.touch()
        self.stream.interrupt()
        if self.audio is not None:
            self.audio.clear()

    def end_of_speech(self) -> None:
        self.touch()
        self.stream.end_of_speech()

    def stats(self) -> dict:
        snapshot = self.stream.metrics().to_dict()
        return {
            "session": self.id,
            "mode": self.mode,
            "avatar": self.avatar_id,
            "age_s": round(time.monotonic() - self.created, 1),
            "video_queue_dropped": self.video.dropped,
            **snapshot,
        }


class SessionManager:
    def __init__(self, settings: Settings, engine, avatars: AvatarStore):
        self.settings = settings
        self.engine = engine
        self.avatars = avatars
        self.sessions: dict[str, PeerSession] = {}
        self._pending = 0  # sessions being negotiated count towards the limit
        self._watchdog: asyncio.Task | None = None
        self._release: asyncio.Task | None = None
        self.total_created = 0
        self.total_closed: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, session_id: str) -> PeerSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise SessionNotFound(session_id) from None

    def start(self) -> None:
        self._watchdog = asyncio.create_task(self._watch(), name="session-watchdog")

    async def create(self, offer_sdp: str, avatar_id: str, mode: str, on_closed: Callable[[PeerSession], None] | None = None) -> tuple[PeerSession, str]:
        """Negotiate a new session from an SDP offer; returns it with the answer SDP."""
        if mode not in MODES:
            raise EmoteError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if len(self.sessions) + self._pending >= self.settings.max_sessions:
            raise ServerFull()
        offer = parse_offer(offer_sdp, mode)
        self._pending += 1  # before any await: concurrent offers must not overshoot the limit
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self.settings.rtc_ice_servers))
        session: PeerSession | None = None
        try:
            avatar = await self.avatars.streaming_avatar(avatar_id)
            session_id = secrets.token_hex(16)
            self.engine.register_avatar(avatar)
            # A live microphone must not build a backlog (latency); pushed TTS may arrive faster than real time.
            options = {"max_audio_backlog_s": LIVE_BACKLOG_S} if mode == "mic" else {}
            stream = await self.engine.open_session(avatar_id, session_id=session_id, **options)
            video = AvatarVideoTrack()
            audio = AvatarAudioTrack() if mode == "presenter" else None
            session = PeerSession(session_id, mode, avatar_id, pc, stream, video, audio, on_closed=on_closed)
            self._wire(session)
            try:
                await pc.setRemoteDescription(offer)
                pc.addTrack(video)  # aiortc reuses the offer's video transceiver
                if audio is not None:
                    pc.addTrack(audio)
                await pc.setLocalDescription(await pc.createAnswer())
            except (ValueError, AttributeError, KeyError, IndexError, TypeError, AssertionError) as exc:
                raise EmoteError(f"the SDP offer could not be negotiated: {exc}") from exc
            self.sessions[session.id] = session
            self.total_created += 1
            session.tasks.append(asyncio.create_task(pump_output(stream, video, audio), name=f"pump-{session.id}"))
            session.tasks.append(asyncio.create_task(self._keyframes(session), name=f"keyframes-{session.id}"))
            session.tasks.append(asyncio.create_task(self._liveness(session), name=f"liveness-{session.id}"))
            logger.info(f"session {session.id} opened ({mode}, avatar {avatar_id})", extra={"session": session.id, "mode": mode, "avatar": avatar_id})
            return session, pc.localDescription.sdp
        except BaseException:
            if session is not None:
                await self._teardown(session, "negotiation failed")
            else:
                await pc.close()
            raise
        finally:
            self._pending -= 1

    def _wire(self, session: PeerSession) -> None:
        pc = session.pc

        @pc.on("track")
        def on_track(track) -> None:
            if track.kind == "audio" and session.mode == "mic":
                task = consume_audio(track, session.push_audio)
            else:  # a presenter viewer's microphone, or any camera: read and drop
                task = discard(track)
            session.tasks.append(asyncio.create_task(task, name=f"in-{track.kind}-{session.id}"))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.close(session.id, f"peer connection {pc.connectionState}")


    async def _keyframes(self, session: PeerSession) -> None:
        """A keyframe every few seconds, so a lost one freezes the picture only briefly. aiortc's encoders keep a
        GOP of 3000 frames; `_send_keyframe` is the hook its own PLI/FIR handling uses."""
        while True:
            await asyncio.sleep(self.settings.keyframe_interval)
            for transceiver in session.pc.getTransceivers():
                if transceiver.sender.track is session.video:
                    transceiver.sender._send_keyframe()

    async def _liveness(self, session: PeerSession) -> None:
        """aiortc sees a vanished peer only when ICE consent fails (~30 s). Receivers send RTCP reports about
        every second; their absence for PEER_SILENCE_S ends the session sooner."""
        sender = next(t.sender for t in session.pc.getTransceivers() if t.sender.track is session.video)
        last_stamp, last_report = None, time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            stats = await sender.getStats()
            stamps = [s.timestamp for s in stats.values() if s.type == "remote-inbound-rtp"]
            if stamps and max(stamps) != last_stamp:
                last_stamp, last_report = max(stamps), time.monotonic()
            if time.monotonic() - last_report > PEER_SILENCE_S:
                asyncio.get_running_loop().create_task(self.close(session.id, "peer vanished (no RTCP)"))
                return

    async def close(self, session_id: str, reason: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            await self._teardown(session, reason)

    async def _teardown(self, session: PeerSession, reason: str) -> None:
        if session.closed.is_set():
            return
        session.close_reason = reason
        session.closed.set()
        self.sessions.pop(session.id, None)
        self.total_closed[reason.split(" ")[0]] = self.total_closed.get(reason.split(" ")[0], 0) + 1
        current = asyncio.current_task()
        for task in session.tasks:
            if task is not current:
                task.cancel()
        with contextlib.suppress(Exception):
            await session.stream.close()
        session.video.stop()
        if session.audio is not None:
            session.audio.stop()
        with contextlib.suppress(Exception):
            await session.pc.close()
        for task in session.tasks:
            if task is not current:
                with contextlib.suppress(BaseException):
                    await task
        session.tasks.clear()
        if session.on_closed is not None:
            session.on_closed(session)
        self._schedule_release()
        logger.info(f"session {session.id} closed: {reason}", extra={"session": session.id, "reason": reason})

    def _schedule_release(self) -> None:
        """Once the closing request has dropped its references, and once for a burst of closes: free what the
        sessions left (their aiortc objects sit in reference cycles) and hand the pages back (server/memory.py)."""
        if self._release is None or self._release.done():
            self._release = asyncio.get_running_loop().create_task(self._release_later(), name="release-memory")

    async def _release_later(self) -> None:
        await asyncio.sleep(RELEASE_DELAY_S)
        await release_session_memory()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if now - session.created > self.settings.max_duration:
                    await self.close(session.id, "max-duration reached")
                elif now - session.last_activity > self.settings.idle_timeout:
                    await self.close(session.id, "idle timeout")

    async def close_all(self, reason: str = "server shutdown") -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(BaseException):
                await self._watchdog
        for session_id in list(self.sessions):
            await self.close(session_id, reason)
        if self._release is not None:
            self._release.cancel()
            with contextlib.suppress(BaseException):
                await self._release


async def add_remote_candidate(pc: RTCPeerConnection, candidate: dict | None) -> None:
    """A trickled browser candidate (`RTCIceCandidate.toJSON()`), or None for end-of-candidates. aiortc gathers its
    own candidates up front (they are all in the answer), but it can take the browser's late ones."""
    from aiortc.sdp import candidate_from_sdp

    if candidate is None or not candidate.get("candidate"):
        await pc.addIceCandidate(None)
        return
    line = candidate["candidate"]
    if not isinstance(line, str) or len(line) > 1024:
        raise EmoteError("`candidate` must be an SDP candidate line")
    try:
        parsed = candidate_from_sdp(line.split(":", 1)[1] if line.startswith("candidate:") else line)
    except (AssertionError, ValueError, IndexError) as exc:
        raise EmoteError(f"malformed ICE candidate: {exc or line[:80]}") from None
    mid, index = candidate.get("sdpMid"), candidate.get("sdpMLineIndex")
    parsed.sdpMid = mid if isinstance(mid, str) else None
    parsed.sdpMLineIndex = index if isinstance(index, int) else None
    try:
        await pc.addIceCandidate(parsed)
    except ValueError as exc:
        raise EmoteError(str(exc)) from None


def parse_offer(sdp: str, mode: str) -> RTCSessionDescription:
    """Check the offer before aiortc sees it: it must receive our video (and, in presenter mode, our audio)."""
    from aiortc import sdp as aiortc_sdp

    if not sdp or not sdp.strip():
        raise EmoteError("the SDP offer is empty")
    if len(sdp) > 64 * 1024:
        raise EmoteError("the SDP offer is too large")
    if not sdp.lstrip().startswith("v=0") or "m=" not in sdp:
        raise EmoteError("the SDP offer is malformed (no v=0 line or no media section)")
    try:
        parsed = aiortc_sdp.SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises a variety of errors on garbage
        raise EmoteError(f"the SDP offer is malformed: {exc}") from None
    if any(m.port != 0 and not (m.dtls and m.dtls.fingerprints) for m in parsed.media):
        raise EmoteError("the SDP offer has a media section without a DTLS fingerprint (a=fingerprint)")
    receives = {m.kind for m in parsed.media if m.direction in ("recvonly", "sendrecv")}
    if "video" not in receives:
        raise EmoteError("the offer must receive video: add a recvonly (or sendrecv) video transceiver")
    if mode == "presenter" and "audio" not in receives:
        raise EmoteError("a presenter session sends audio: add a recvonly (or sendrecv) audio transceiver")
    if mode == "mic" and not any(m.kind == "audio" and m.direction in ("sendonly", "sendrecv") for m in parsed.media):
        raise EmoteError("a mic session needs the microphone: the offer must send an audio track")
    return RTCSessionDescription(sdp=sdp, type="offer")
