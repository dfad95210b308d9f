"""`emote soak`: one presenter session with continuous speech for a long run. A backend pushes looped espeak-ng
sentences (with pauses) in real time over the session's audio WebSocket, and the test peer receives the video and
that audio back over WebRTC. Every interval it samples:

- the server's memory (its process tree's RSS and PSS, from `/metrics`);
- the frame rate: fresh frames the server made (emitted minus held or dropped slots) and frames the peer decoded;
- audio-to-lip latency and the input queue (buffered audio), where clock drift would show as a creep;
- the A/V offset at the receiver: the median of arrival time minus media time (RTP timestamp over its clock rate)
  of the audio minus that of the video. Each stream's RTP timestamps start at a random value, so the offset is
  compared with its own start: the drift between the first and the last interval is what counts.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from avatar.errors import EmoteError

from .churn import ServerProbe
from .impair import push_speech, speech_wav
from .peer import FrameStats, WhipPeer, open_session

VIDEO_CLOCK, AUDIO_CLOCK = 90_000, 48_000
TARGET_RSS_CHANGE = 0.05  # flat within 5 % after the first 2 minutes
TARGET_FRESH_FPS = 24.5
TARGET_AV_DRIFT_MS = 40.0
SETTLE_S = 120.0  # the memory baseline is read this long after the start (warm-up of caches and allocators)


@dataclass(frozen=True)
class SoakPlan:
    minutes: float = 30.0
    interval: float = 60.0  # seconds between samples
    avatar: str = "default"
    speech_seconds: float = 60.0  # the length of the looped speech

    def validate(self) -> "SoakPlan":
        if self.minutes <= 0 or self.interval <= 0 or self.interval > self.minutes * 60:
            raise EmoteError("--minutes must be positive and --interval between 0 and the run's length")
        return self


def media_offset(stats: FrameStats, clock: int, start: float, end: float) -> float | None:
    """Median of arrival time minus media time (seconds) of the frames that arrived in [start, end)."""
    frames = [r for r in stats.between(start, end) if r.pts is not None]
    if not frames:
        return None
    return float(np.median([r.arrival - r.pts / clock for r in frames]))


def fresh_frames(counters: dict) -> int:
    """Frames the model made and the viewer saw: every slot but the held (repeated) and the skipped ones."""
    return counters["frames_emitted"] - counters["held_frames"] - counters.get("consumer_dropped_frames", 0)


async def _sample(probe: ServerProbe, peer: WhipPeer, started: float, last: dict | None) -> dict:
    now = time.monotonic()
    stats = await peer.stats()
    counters, latency = stats["counters"], stats.get("audio_to_lip_ms") or {}
    sample = {"t_s": round(now - started, 1), "memory_mb": await probe.memory_mb(),
              "fresh_frames": fresh_frames(counters), "frames_emitted": counters["frames_emitted"],
              "speech_frames": counters["speech_frames"],
              "audio_to_lip_ms": {q: latency.get(q) and round(latency[q], 1) for q in ("p50", "p95")},
              "buffered_audio_s": round(stats.get("buffered_audio_s", 0.0), 3),
              "pending_frames": stats.get("pending_frames"), "_at": now}
    if last is not None:
        span = now - last["_at"]
        sample["fresh_fps"] = round((sample["fresh_frames"] - last["fresh_frames"]) / span, 2)
        sample["decoded_fps"] = round(peer.video.fps(last["_at"], now), 2)
        audio = media_offset(peer.audio, AUDIO_CLOCK, last["_at"], now)
        video = media_offset(peer.video, VIDEO_CLOCK, last["_at"], now)
        sample["av_offset_ms"] = None if audio is None or video is None else round((audio - video) * 1000, 1)
    return sample


def summarise(samples: list[dict], plan: SoakPlan) -> dict:
    """The figures the targets are about, from the samples (the first one has no rates: it starts the clock)."""
    rated = samples[1:]
    settled = [s for s in samples if s["t_s"] >= min(SETTLE_S, samples[-1]["t_s"])]
    rss = [s["memory_mb"]["rss"] for s in settled]
    offsets = [s["av_offset_ms"] for s in rated if s.get("av_offset_ms") is not None]
    change = (max(abs(r - rss[0]) for r in rss) / rss[0]) if rss else None
    drift = round(offsets[-1] - offsets[0], 1) if len(offsets) >= 2 else None
    summary = {
        "seconds": samples[-1]["t_s"],
        "rss_mb": {"settled": rss[0] if rss else None, "end": rss[-1] if rss else None,
                   "max_change_pct": None if change is None else round(100 * change, 2)},
        "fresh_fps_min": min((s["fresh_fps"] for s in rated), default=None),
        "decoded_fps_min": min((s["decoded_fps"] for s in rated), default=None),
        "av_offset_ms": {"start": offsets[0] if offsets else None, "end": offsets[-1] if offsets else None,
                         "drift": drift},
        "audio_to_lip_p50_ms": {"start": rated[0]["audio_to_lip_ms"]["p50"] if rated else None,
                                "end": rated[-1]["audio_to_lip_ms"]["p50"] if rated else None},
        "buffered_audio_s": {"start": rated[0]["buffered_audio_s"] if rated else None,
                             "end": rated[-1]["buffered_audio_s"] if rated else None},
    }
    summary["met"] = {
        "rss_flat_within_5pct": change is not None and change <= TARGET_RSS_CHANGE,
        "fresh_fps_at_least_24_5": summary["fresh_fps_min"] is not None and summary["fresh_fps_min"] >= TARGET_FRESH_FPS,
        "av_drift_within_40ms": drift is not None and abs(drift) <= TARGET_AV_DRIFT_MS,
    }
    return summary


async def run_soak(base_url: str, token: str | None, plan: SoakPlan, log=print) -> dict:
    """One presenter session for `plan.minutes` with speech pushed in real time; returns the report."""
    plan = plan.validate()
    probe = ServerProbe(base_url, token)
    samples: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="emote-soak-") as tmp:
        wav, source = await asyncio.to_thread(speech_wav, Path(tmp) / "speech.wav", plan.speech_seconds)
        peer = await open_session(base_url, mode="presenter", avatar=plan.avatar, token=token)
        pusher = asyncio.create_task(push_speech(peer, token, wav))
        try:
            await peer.video.wait_for(1, timeout=30.0)
            started = time.monotonic()
            samples.append(await _sample(probe, peer, started, None))
            while samples[-1]["t_s"] < plan.minutes * 60 - 1e-6:
                await asyncio.sleep(max(0.0, started + len(samples) * plan.interval - time.monotonic()))
                if pusher.done():
                    pusher.result()  # raises what ended the speech early
                    raise EmoteError("the speech pusher stopped")
                samples.append(await _sample(probe, peer, started, samples[-1]))
                last = samples[-1]
                log(f"soak: {last['t_s']:.0f} s, RSS {last['memory_mb']['rss']:.0f} MB, fresh {last['fresh_fps']} fps, "
                    f"decoded {last['decoded_fps']} fps, A/V {last['av_offset_ms']} ms, "
                    f"lip p50 {last['audio_to_lip_ms']['p50']} ms, queue {last['buffered_audio_s']} s")
        finally:
            pusher.cancel()
            with contextlib.suppress(BaseException):
                await pusher
            await peer.close()
            await probe.close()
    for sample in samples:
        sample.pop("_at")
    return {"plan": asdict(plan), "speech": source, "summary": summarise(samples, plan), "samples": samples,
            "targets": {"rss_change_max_pct": 100 * TARGET_RSS_CHANGE, "fresh_fps_min": TARGET_FRESH_FPS,
                        "av_drift_max_ms": TARGET_AV_DRIFT_MS}}


def run_soak_command(args: argparse.Namespace) -> int:
    from .report import log_line, run_check

    plan = SoakPlan(minutes=args.minutes, interval=args.interval, avatar=args.avatar).validate()
    server_args = ("--max-duration", str(plan.minutes * 60 + 600))
    report = run_check(args, lambda url, token: run_soak(url, token, plan, log_line), server_args)
    return 0 if all(report["summary"]["met"].values()) else 1
