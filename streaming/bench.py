"""`emote bench --streaming`: N live sessions fed synthesized speech at the real-time rate, end to end.

Speech is espeak-ng (a generated tone if espeak-ng is missing, and the JSON says so), sent the way WebRTC delivers
it: 48 kHz stereo s16 in 20 ms packets. `fps` counts fresh frames (held frames excluded) per second of the
session's output, the minimum over sessions.
"""
from __future__ import annotations

import asyncio
import datetime
import platform
import sys
import time

import numpy as np

from avatar.config import AUDIO_SAMPLE_RATE
from avatar.frame_model import FrameModel

from .config import StreamConfig
from .engine import StreamingEngine

PACKET_SECONDS = 0.02
SENTENCES = (
    "Hello, and welcome. I am your virtual assistant, and I can answer questions about your order.",
    "The weather today will be mostly sunny, with a light breeze from the west in the afternoon.",
    "Please hold on for a moment while I look that up for you. It should only take a second.",
    "Thank you for waiting. Your package left the warehouse this morning and arrives on Friday.",
)


def synthesize_speech(seconds: float, variant: int = 0) -> tuple[np.ndarray, str]:
    """At least `seconds` of 16 kHz speech with short pauses between sentences, and a description of its source."""
    try:
        from avatar.data.speech import EspeakEngine, Voice

        engine = EspeakEngine.get()
        pieces, total = [], 0
        for k in range(1000):
            text = SENTENCES[(k + variant) % len(SENTENCES)]
            audio = engine.synthesize(text, Voice("en-us", rate=165 + 10 * (variant % 3))).audio
            pieces += [audio, np.zeros(int(0.35 * AUDIO_SAMPLE_RATE), np.float32)]
            total += audio.size + int(0.35 * AUDIO_SAMPLE_RATE)
            if total >= seconds * AUDIO_SAMPLE_RATE:
                break
        return np.concatenate(pieces), "espeak-ng"
    except Exception as exc:  # noqa: BLE001 - any failure to load/run espeak-ng falls back to a tone
        t = np.arange(int(seconds * AUDIO_SAMPLE_RATE) + 1) / AUDIO_SAMPLE_RATE
        tone = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
        return tone.astype(np.float32), f"tone (espeak-ng unavailable: {exc})"


def to_webrtc_packets(audio16k: np.ndarray) -> list[bytes]:
    from scipy.signal import resample_poly

    a48 = np.clip(resample_poly(audio16k, 3, 1) * 32767, -32768, 32767).astype(np.int16)
    stereo = np.repeat(a48[:, None], 2, axis=1)
    n = int(48_000 * PACKET_SECONDS)
    return [stereo[i : i + n].tobytes() for i in range(0, len(stereo) - n + 1, n)]


async def bench_streaming(model: FrameModel, sessions: int, seconds: float, config: StreamConfig,
                          seed: int = 0) -> dict:
    engine = StreamingEngine(model, config)
    await engine.start()
    clock = engine.clock
    engine.register_avatar(model.example_avatar())
    speech = [synthesize_speech(seconds, k) for k in range(sessions)]
    packets = [to_webrtc_packets(audio) for audio, _ in speech]
    live = [await engine.open_session("example", seed=seed + k, max_audio_backlog_s=0.5) for k in range(sessions)]
    first_slot_time = max(s.slot_time(0) for s in live)
    start = first_slot_time
    end = start + seconds

    async def feed(session, chunks):
        for i, chunk in enumerate(chunks):
            when = start + i * PACKET_SECONDS
            if when >= end:
                break
            await clock.sleep_until(when)
            session.push_audio(chunk, 48_000, 2)

    emitted: list[list[float]] = [[] for _ in live]

    async def consume(k, session):
        async for frame in session:
            now = clock.now()
            if now >= end:
                break
            if now >= start:
                emitted[k].append(now)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(feed(s, p) for s, p in zip(live, packets)), *(consume(k, s) for k, s in enumerate(live)))
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    metrics = engine.metrics()
    values = np.concatenate([s.audio_to_lip.values() for s in live]) * 1000 if live else np.zeros(0)
    per_session = []
    for s, times in zip(live, emitted):
        c = s.counters
        span = seconds
        fresh = max(0, len(times) - c.held_frames)
        per_session.append({"frames": len(times), "fresh_fps": fresh / span, "held": c.held_frames,
                            "late": c.late_frames, "skipped_windows": c.skipped_windows,
                            "reduced_step_windows": c.reduced_step_windows,
                            "consumer_dropped": c.consumer_dropped_frames, "dropped_audio_s": c.dropped_audio_s,
                            "skipped_silence_s": c.skipped_silence_s})
    total_frames = sum(len(t) for t in emitted)
    batch_ms = metrics.stages_ms["batch"]
    await engine.stop()
    cfg = engine.config
    result = {
        "mode": "streaming",
        "model": model.spec.name,
        "width": model.spec.width,
        "height": model.spec.height,
        "sessions": sessions,
        "seconds": seconds,
        "fps": min(p["fresh_fps"] for p in per_session),
        "output_fps": min(p["frames"] / seconds for p in per_session),
        "audio_to_lip_ms": {
            "p50": float(np.percentile(values, 50)) if values.size else None,
            "p95": float(np.percentile(values, 95)) if values.size else None,
            "max": float(values.max()) if values.size else None,
            "count": int(values.size),
        },
        "dropped_frames": sum(p["held"] + p["consumer_dropped"] for p in per_session),
        "cpu_ms_per_frame": 1000 * cpu_s / max(1, total_frames),
        "cpu_utilisation": cpu_s / wall_s,
        "steps": cfg.steps,
        "steps_used": metrics.steps_used,
        "frames_per_window": cfg.frames_per_window,
        "context_lookahead_frames": cfg.context_lookahead_frames,
        "lead_ms": metrics.lead_ms,
        "stages_ms": {k: {q: v[q] for q in ("p50", "p95")} for k, v in metrics.stages_ms.items()},
        "per_session": per_session,
        "speech_source": speech[0][1] if speech else None,
        "input": "48 kHz stereo s16, 20 ms packets, real-time rate",
        "model_ms_per_frame": (batch_ms["mean"] or 0) * sum(metrics.batch_sizes.values()) / max(1, total_frames),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": datetime.date.today().isoformat(),
    }
    for name in ("strength", "refine"):  # the pixel model's options, where the model has them
        if hasattr(model, name):
            result[name] = getattr(model, name)
    if "torch" in sys.modules:
        result["threads"] = sys.modules["torch"].get_num_threads()
    return result
