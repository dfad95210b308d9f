"""`emote impair`: live sessions through an impaired network, measured at the receiver.

Each session (a mic session fed looped espeak-ng speech, then a presenter session whose speech is pushed over the
audio WebSocket) runs its ICE through an `ImpairedRelay` on loopback and goes through four phases: clean warm-up;
`loss` random loss with `delay` ± `jitter` on both directions; a blackout (nothing passes either way); clean
recovery. The report (JSON) gives, per session: decoded video fps and the longest freeze while impaired; the time
from the blackout's end to the first decoded frame, to the first frame the server produced after the blackout (the
picture is live again) and to a new keyframe; audio frames after the blackout (presenter); and from the
server's session statistics, frames emitted per second and speech frames reaching the model in each phase (the
uplink: mic).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import subprocess
import tempfile
import time
import wave
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from avatar.errors import EmoteError

from .peer import WhipPeer, open_session
from .relay import CLEAN, Impairment, RelayRoute, strip_candidates
from .report import machine_description

VIDEO_CLOCK = 90_000
TARGET_FPS = 20.0  # decoded while impaired
TARGET_RECOVERY_S = 1.0  # from the blackout's end to a live picture
PUSH_CHUNK_S = 0.2  # presenter speech goes to the server in 200 ms messages, in real time


@dataclass(frozen=True)
class ImpairPlan:
    warmup_s: float = 3.0
    impaired_s: float = 10.0
    blackout_s: float = 3.0
    recovery_s: float = 5.0
    loss: float = 0.05
    delay_s: float = 0.05
    jitter_s: float = 0.02
    seed: int = 0
    modes: tuple[str, ...] = ("mic", "presenter")
    avatar: str = "default"
    stall_pli_s: float | None = 0.25  # the test peer asks for a keyframe after this long without a frame (browsers do)

    def validate(self) -> "ImpairPlan":
        if not 0 <= self.loss < 1:
            raise EmoteError(f"--loss must be in [0, 1), got {self.loss}")
        if self.delay_s < 0 or self.jitter_s < 0 or self.jitter_s > self.delay_s:
            raise EmoteError("--delay-ms and --jitter-ms must not be negative, and the jitter at most the delay")
        phases = (("--warmup", self.warmup_s), ("--seconds", self.impaired_s), ("--recovery", self.recovery_s))
        for option, value in phases:
            if not 0.5 <= value <= 3600:
                raise EmoteError(f"{option} must be between 0.5 and 3600 seconds, got {value:g}")
        if not 0.5 <= self.blackout_s <= 60:
            raise EmoteError(f"--blackout must be between 0.5 and 60 seconds, got {self.blackout_s:g}")
        if self.stall_pli_s is not None and not 0.05 <= self.stall_pli_s <= 10:
            raise EmoteError(f"--stall-pli-ms must be 0 (off) or between 50 and 10000, got {self.stall_pli_s * 1000:g}")
        if not self.modes or any(m not in ("mic", "presenter") for m in self.modes):
            raise EmoteError(f"--mode must be mic, presenter or both, got {','.join(self.modes)}")
        return self

    def impairment(self, seed: int) -> Impairment:
        return Impairment(loss=self.loss, delay=self.delay_s, jitter=self.jitter_s, seed=seed)


def speech_wav(path: Path, seconds: float = 20.0) -> tuple[Path, str]:
    """At least `seconds` of espeak-ng speech, sentences with 0.35 s pauses, as a 16 kHz mono s16 WAV, and where it
    came from. The espeak-ng program runs as a subprocess (fork + exec): the library route (avatar.data.speech)
    forks this process, which can deadlock once other libraries' threads (MediaPipe's, aiortc's) hold locks."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    from avatar.config import AUDIO_SAMPLE_RATE
    from streaming.bench import SENTENCES

    pieces, total = [], 0
    pause = np.zeros(int(0.35 * AUDIO_SAMPLE_RATE), np.int16)
    for k in range(1000):
        sentence = path.with_suffix(f".{k}.wav")
        try:
            subprocess.run(["espeak-ng", "-v", "en-us", "-s", "165", "-w", str(sentence), SENTENCES[k % len(SENTENCES)]],
                           check=True, capture_output=True, timeout=60)
            rate, audio = wavfile.read(sentence)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            raise EmoteError(f"espeak-ng could not speak: {exc}") from None
        finally:
            sentence.unlink(missing_ok=True)
        audio = resample_poly(audio.astype(np.float32), AUDIO_SAMPLE_RATE, rate)
        pieces += [np.clip(audio, -32768, 32767).astype(np.int16), pause]
        total += pieces[-2].size + pause.size
        if total >= seconds * AUDIO_SAMPLE_RATE:
            break
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(AUDIO_SAMPLE_RATE)
        w.writeframes(np.concatenate(pieces).astype("<i2").tobytes())
    return path, "espeak-ng"


async def push_speech(peer: WhipPeer, token: str | None, wav: Path) -> None:
    """Presenter mode: push the speech, looped, in real time over the session's audio WebSocket (not impaired)."""
    import websockets

    with wave.open(str(wav), "rb") as w:
        rate, pcm = w.getframerate(), w.readframes(w.getnframes())
    step = int(rate * PUSH_CHUNK_S) * 2
    url = peer.base_url.replace("http", "ws", 1) + f"{peer.location}/audio?rate={rate}&channels=1"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with websockets.connect(url, additional_headers=headers) as ws:
        start, sent = time.monotonic(), 0
        while True:
            offset = (sent * step) % (len(pcm) - len(pcm) % step)
            await ws.send(pcm[offset : offset + step])
            sent += 1
            await asyncio.sleep(max(0.0, start + sent * PUSH_CHUNK_S - time.monotonic() - PUSH_CHUNK_S))


def _rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


async def _through_relay(peer: WhipPeer, route: RelayRoute) -> dict:
    """The client's DTLS transport counts every media byte it sent and received; the relay counted what passed
    through it. Media that bypassed the relay would make the client's counts the larger."""
    stats = await peer.pc.getStats()
    transport = next((s for s in stats.values() if s.type == "transport"), None)
    up, down = route.relay.counters["up"], route.relay.counters["down"]
    client_rx, client_tx = (transport.bytesReceived, transport.bytesSent) if transport else (None, None)
    return {"client_bytes_received": client_rx, "relay_bytes_delivered": down.bytes_forwarded,
            "client_bytes_sent": client_tx, "relay_bytes_from_client": up.bytes_received,
            "all": transport is not None and 0 < client_rx <= down.bytes_forwarded
                   and 0 < client_tx <= up.bytes_received}


async def impaired_session(base_url: str, token: str | None, mode: str, plan: ImpairPlan, wav: Path) -> dict:
    """One session through the four phases; returns its part of the report."""
    from aiortc.contrib.media import MediaPlayer

    player = MediaPlayer(str(wav), loop=True) if mode == "mic" else None
    route = RelayRoute()
    try:
        peer = await open_session(base_url, mode=mode, avatar=plan.avatar, token=token,
                                  audio_track=player.audio if player else None,
                                  rewrite_offer=strip_candidates, rewrite_answer=route.rewrite_answer,
                                  stall_pli_s=plan.stall_pli_s)
    except BaseException:
        route.close()
        if player is not None:
            player.audio.stop()
        raise
    pusher = asyncio.create_task(push_speech(peer, token, wav)) if mode == "presenter" else None
    snapshots: dict[str, Snapshot] = {}

    async def phase(name: str, seconds: float, up: Impairment | None = None, down: Impairment | None = None) -> None:
        start = time.monotonic()
        if up is not None or down is not None:
            route.relay.impair(up=up, down=down)
        relay = route.relay.snapshot()
        server = (await peer.stats())["counters"]
        snapshots[name] = Snapshot(start, (start + time.monotonic()) / 2, server, relay)
        await asyncio.sleep(max(0.0, start + seconds - time.monotonic()))

    try:
        await peer.video.wait_for(1, 60)
        await phase("warmup", plan.warmup_s)
        await phase("impaired", plan.impaired_s, plan.impairment(2 * plan.seed), plan.impairment(2 * plan.seed + 1))
        # Longer than the phase: switching to clean ends it, and recovery is timed from that switch.
        blackout = Impairment(blackouts=((0.0, plan.blackout_s + 1.0),))
        await phase("blackout", plan.blackout_s, blackout, blackout)
        await phase("recovery", plan.recovery_s, CLEAN, CLEAN)
        await phase("end", 0.0)
        through = await _through_relay(peer, route)
        if pusher is not None and pusher.done():
            pusher.result()  # pushing the presenter's speech failed: say why
    finally:
        if pusher is not None:
            pusher.cancel()
            with contextlib.suppress(BaseException):
                await pusher
        await peer.close()
        route.close()
        if player is not None:
            player.audio.stop()
    return {"mode": mode, **_media_report(peer, snapshots, plan), "phases": _phases(snapshots),
            "through_relay": through}


@dataclass(frozen=True)
class Snapshot:
    when: float  # the phase began (the relay switched)
    server_when: float  # about when the server read its counters (the middle of the request)
    server: dict  # the session's counters, from the server
    relay: dict  # the relay's counters per direction, when the phase began


def _phases(snapshots: dict[str, Snapshot]) -> dict:
    """Per phase: the server's frames emitted per second and speech frames that reached the model (the uplink),
    and what the relay did to each direction (with the RTCP feedback that crossed it)."""
    names = list(snapshots)
    out = {}
    for a, b in zip(names, names[1:]):
        s0, s1 = snapshots[a], snapshots[b]
        emitted = s1.server["frames_emitted"] - s0.server["frames_emitted"]
        out[a] = {"seconds": round(s1.when - s0.when, 2),
                  "frames_emitted_per_s": round(emitted / (s1.server_when - s0.server_when), 1),
                  "speech_frames": s1.server["speech_frames"] - s0.server["speech_frames"],
                  **{direction: {k: v - s0.relay[direction][k] for k, v in counters.items()}
                     for direction, counters in s1.relay.items()}}
    return out


def _media_report(peer: WhipPeer, snapshots: dict[str, Snapshot], plan: ImpairPlan) -> dict:
    t = {name: snapshot.when for name, snapshot in snapshots.items()}
    blackout_end = t["recovery"]
    video, audio = peer.video, peer.audio
    # When the server produced a frame, on this clock: its media time plus the smallest delay seen while clean.
    # `lag` is how much later than that a frame was decoded.
    warm = video.between(t["warmup"], t["impaired"])
    offset = min((r.arrival - r.pts / VIDEO_CLOCK for r in warm), default=None)

    def produced(pts: int) -> float:
        return offset + pts / VIDEO_CLOCK

    def median_lag(start: float, end: float) -> float | None:
        lags = [r.arrival - produced(r.pts) for r in video.between(start, end)]
        return _rounded(float(np.median(lags))) if lags and offset is not None else None

    def since_end(when: float | None) -> float | None:
        return _rounded(None if when is None else when - blackout_end)

    live = next((r for r in video.between(blackout_end) if offset is not None and produced(r.pts) >= blackout_end),
                None)
    fresh_key = next((k for k in video.keyframes if k.arrival >= blackout_end and offset is not None
                      and produced(k.pts) >= blackout_end), None)
    first = video.first_after(blackout_end)
    settled = blackout_end + min(1.0, plan.recovery_s / 2)
    report = {"video": {
        "size": list(video.records[-1].size) if video.records else None,
        "warmup_fps": round(video.fps(t["warmup"], t["impaired"]), 1),
        "impaired_fps": round(video.fps(t["impaired"], t["blackout"]), 1),
        "impaired_longest_freeze_s": _rounded(video.longest_gap(t["impaired"], t["blackout"])),
        "impaired_lag_s": median_lag(t["impaired"], t["blackout"]),
        "blackout_end_to_first_frame_s": since_end(first.arrival if first else None),
        "blackout_end_to_live_frame_s": since_end(live.arrival if live else None),
        "blackout_end_to_new_keyframe_s": since_end(fresh_key.arrival if fresh_key else None),
        "recovered_fps": round(video.fps(settled, t["end"]), 1),
        "recovered_longest_freeze_s": _rounded(video.longest_gap(settled, t["end"])),
        "recovered_lag_s": median_lag(settled, t["end"]),
        "keyframe_requests": peer.video_tap.keyframe_requests if peer.video_tap else 0,
    }}
    if peer.mode == "presenter":
        first_audio = audio.first_after(blackout_end)
        report["audio"] = {
            "warmup_fps": round(audio.fps(t["warmup"], t["impaired"]), 1),
            "impaired_fps": round(audio.fps(t["impaired"], t["blackout"]), 1),
            "impaired_longest_gap_s": _rounded(audio.longest_gap(t["impaired"], t["blackout"])),
            "blackout_end_to_first_frame_s": since_end(first_audio.arrival if first_audio else None),
            "frames_after_blackout": len(audio.between(blackout_end, t["end"])),
            "recovered_fps": round(audio.fps(settled, t["end"]), 1),
        }
    return report


def verdict(session: dict) -> dict:
    video = session["video"]
    live = video["blackout_end_to_live_frame_s"]
    checks = {
        "decoded_fps_while_impaired": video["impaired_fps"] >= TARGET_FPS,
        "recovery_within_1s": live is not None and live <= TARGET_RECOVERY_S,
        "all_traffic_through_relay": session["through_relay"]["all"],
        "no_stall": all(p["frames_emitted_per_s"] >= TARGET_FPS for p in session["phases"].values()),
    }
    if session["mode"] == "presenter":
        checks["audio_after_blackout"] = session["audio"]["recovered_fps"] >= 40
    else:
        checks["speech_reaches_the_model_while_impaired"] = session["phases"]["impaired"]["speech_frames"] > 0
    return checks


async def run_impairment(base_url: str, token: str | None, plan: ImpairPlan) -> dict:
    """The whole run against a server: each mode's session in turn."""
    from .local import healthz

    health = await asyncio.to_thread(healthz, base_url, token)
    with tempfile.TemporaryDirectory(prefix="emote-impair-") as tmp:
        wav, source = await asyncio.to_thread(speech_wav, Path(tmp) / "speech.wav")
        sessions = {}
        for mode in plan.modes:
            sessions[mode] = await impaired_session(base_url, token, mode, plan, wav)
            sessions[mode]["passed"] = verdict(sessions[mode])
    return {
        "machine": machine_description(),
        "date": datetime.date.today().isoformat(),
        "model": health.get("model"),
        "speech": source,
        "plan": {**asdict(plan), "modes": list(plan.modes)},
        "targets": {"decoded_fps_min": TARGET_FPS, "recovery_s_max": TARGET_RECOVERY_S},
        "sessions": sessions,
        "passed": all(all(s["passed"].values()) for s in sessions.values()),
    }


# ---- command line ---------------------------------------------------------------------------------------------------

def run_impair(args: argparse.Namespace) -> int:
    plan = ImpairPlan(warmup_s=args.warmup, impaired_s=args.seconds, blackout_s=args.blackout,
                      recovery_s=args.recovery, loss=args.loss, delay_s=args.delay_ms / 1000,
                      jitter_s=args.jitter_ms / 1000, seed=args.seed, avatar=args.avatar,
                      stall_pli_s=args.stall_pli_ms / 1000 if args.stall_pli_ms else None,
                      modes=("mic", "presenter") if args.mode == "both" else (args.mode,)).validate()
    from .report import run_check

    report = run_check(args, lambda url, token: run_impairment(url, token, plan))
    return 0 if report["passed"] else 1
