"""Streaming sessions on a FakeClock, with the model inline (deterministic): pacing, idle, barge-in, bounds,
batching, input formats, end of speech and the behind-schedule policy. The engine runs `SolidColourModel` (no torch),
whose frames encode (window, frame, seed, speaking); tests/test_streaming_pixel.py streams the pixel model."""
import asyncio
import math
import subprocess
import sys

import numpy as np
import pytest

from avatar.config import SAMPLES_PER_FRAME, VIDEO_FPS
from avatar.errors import EmoteError
from streaming.clock import FakeClock
from streaming.config import StreamConfig
from streaming.engine import StreamingEngine
from streaming.testing import SimulatedCost, SolidColourModel

F = 4  # SolidColourModel's window
decode = SolidColourModel.decode


def portrait(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    voiced = np.sin(2 * np.pi * (150 + 30 * seed) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    return (0.3 * voiced + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def engine_for(model, clock, **config) -> StreamingEngine:
    return StreamingEngine(model, StreamConfig(**config), clock=clock, threaded=False)


async def started_engine(model, clock, **config) -> StreamingEngine:
    """A started engine with avatar "a" registered."""
    engine = engine_for(model, clock, **config)
    await engine.start()
    await engine.add_avatar("a", portrait())
    return engine


async def feed_realtime(clock, session, audio, start, chunk=320, rate=16000, channels=1):
    """Push `audio` ((n,) or (n, channels)) in chunks as if it arrived live from time `start`."""
    for i in range(0, len(audio), chunk):
        await clock.sleep_until(start + i / rate)
        session.push_audio(audio[i : i + chunk], rate, channels)


async def collect(session, count):
    frames = []
    async for frame in session:
        frames.append(frame)
        if len(frames) == count:
            break
    return frames


async def test_timestamps_exact_frames_in_order_and_lips_in_sync_over_simulated_minutes():
    clock = FakeClock()
    model = SolidColourModel()

    async def body():
        engine = await started_engine(model, clock)
        session = await engine.open_session("a", seed=5)
        t0 = session.slot_time(0)
        talk = speech(3.0)

        async def talker():  # 3 s of speech every 10 s
            for burst in range(18):
                await feed_realtime(clock, session, talk, t0 + 10 * burst, chunk=960)

        feeder = asyncio.ensure_future(talker())
        n, speaking = 3 * 60 * VIDEO_FPS, 0
        async for frame in session:
            assert frame.index == n - (n - frame.index)  # sanity: index is an int frame number
            assert clock.now() == pytest.approx(t0 + frame.index / VIDEO_FPS, abs=1e-9)
            assert frame.pts(90_000) == frame.index * 3600
            assert frame.image.shape == (64, 64, 3) and frame.audio.shape == (640,)
            assert not frame.held
            # the frame generated for this slot, from this slot's audio: window, frame in window, seed, speaking
            assert decode(frame.image) == ((frame.index // F) % 256, frame.index % F, 5, frame.speaking)
            assert frame.speaking == bool(frame.audio.any())
            speaking += frame.speaking
            if frame.index == n - 1:
                break
        feeder.cancel()
        m = session.metrics()
        assert m.counters.frames_emitted == n and m.fps == pytest.approx(25.0, abs=1e-9)
        assert m.counters.dropped_frames == 0
        assert 18 * 75 <= speaking <= 18 * 78  # each 3 s burst shows up as 75 speaking frames (+ boundary spans)
        await engine.stop()

    await clock.run(body())


def test_slot_times_do_not_drift_over_an_hour():
    origin, g0 = 12345.678, 8
    hour = 3600 * VIDEO_FPS
    assert origin + (g0 + hour) / VIDEO_FPS - (origin + g0 / VIDEO_FPS) == pytest.approx(3600.0, abs=1e-6)


async def test_silence_gives_idle_windows_with_silence_features_and_idle_speed():
    clock = FakeClock()
    model = SimulatedCost(SolidColourModel(), record=200)

    async def body():
        engine = await started_engine(model, clock, idle_speed=0.3)
        session = await engine.open_session("a")
        frames = await collect(session, 50)  # 2 s with no audio at all
        assert [f.index for f in frames] == list(range(50))
        assert not any(f.speaking or f.held for f in frames)
        assert all(not f.audio.any() for f in frames)
        assert len({f.image.tobytes() for f in frames}) > 10  # alive: frames keep changing
        windows = [r for r in model.requests if r.avatar is session.avatar]  # not the warm-up's
        assert len(windows) >= 12
        for w in windows:
            assert np.all(w.speed == 0.3) and not w.speaking.any() and not w.audio.any()
            assert w.audio.shape == (F, 5, 1)
        await engine.stop()

    await clock.run(body())


async def test_each_frame_gets_its_own_and_its_neighbours_features_and_the_previous_windows_carry():
    """Window requests carry frame t's features t-2..t+2 (edges repeated beyond what was formed), the session's seed
    and window index, and the carry the model returned for the session's previous window."""
    clock = FakeClock()
    model = SimulatedCost(SolidColourModel(), record=200)

    async def body():
        engine = await started_engine(model, clock, context_lookahead_frames=2)
        session = await engine.open_session("a", seed=9)
        feeder = asyncio.ensure_future(feed_realtime(clock, session, speech(1.5), session.slot_time(0) + 0.23, 333))
        frames = await collect(session, 60)
        await feeder
        played = np.concatenate([f.audio for f in frames]).reshape(-1, SAMPLES_PER_FRAME)
        rms = np.sqrt(np.mean(played**2, axis=1))
        assert sum(f.speaking for f in frames) >= 36
        pairs = [(r, out) for r, out in zip(model.requests, model.results) if r.avatar is session.avatar]
        assert [r.index for r, _ in pairs] == list(range(len(pairs))) and all(r.seed == 9 for r, _ in pairs)
        assert pairs[0][0].carry is None
        for (_, previous), (request, _) in zip(pairs, pairs[1:]):
            assert request.carry == previous.carry
        for request, _ in pairs[: 60 // F - 1]:  # the last window's lookahead reaches past what was played
            k0 = request.index * F
            expected = [[rms[min(max(t + j, 0), k0 + F + 1)] for j in range(-2, 3)] for t in range(k0, k0 + F)]
            np.testing.assert_allclose(request.audio[..., 0], expected, rtol=1e-6, atol=1e-7)
            assert list(request.speaking) == [frames[t].speaking for t in range(k0, k0 + F)]
        await engine.stop()

    await clock.run(body())


def test_the_engine_and_its_test_model_never_import_torch():
    code = """
import asyncio, sys
import numpy as np
from streaming.clock import FakeClock
from streaming.engine import StreamingEngine
from streaming.testing import SolidColourModel

async def main():
    engine = StreamingEngine(SolidColourModel(), clock=clock, threaded=False)
    await engine.add_avatar("a", np.zeros((64, 64, 3), np.uint8))
    session = await engine.open_session("a")
    session.push_audio(np.ones(16000, np.float32) * 0.1)
    async for frame in session:
        if frame.index == 30:
            break
    await engine.stop()

clock = FakeClock()
asyncio.run(clock.run(main()))
assert "torch" not in sys.modules, "torch was imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


async def test_interrupt_drops_backlog_and_closes_the_mouth_within_one_window():
    clock = FakeClock()
    model = SimulatedCost(SolidColourModel(), seconds_per_step=0.01, fixed_seconds_per_frame=0.002, record=200)

    async def body():
        engine = await started_engine(model, clock, lead_margin_s=0.1)  # windows are formed 3.5 frames ahead
        session = await engine.open_session("a")
        session.push_audio(speech(6.0))  # TTS: six seconds queued at once
        frames, interrupt_at = [], None
        async for frame in session:
            frames.append(frame)
            if frame.index == 30:  # mid-window, with the next window already formed
                assert session.buffered_seconds > 4
                session.interrupt()
                interrupt_at = frame.index + 1
                assert session.buffered_seconds == 0
                assert session.queue_sizes()["frames"] <= F
            if frame.index == 70:
                break
        after = frames[interrupt_at:]
        boundary = math.ceil(interrupt_at / F) * F
        assert all(f.speaking for f in frames[4:interrupt_at])
        assert not any(f.audio.any() for f in after)  # queued audio is gone at once
        assert not any(f.speaking for f in after)
        assert all(not f.held for f in frames[boundary:])  # the re-formed idle window arrived in time
        # lips follow the audio, except in the window already showing at the interrupt (it only goes silent)
        assert all(decode(f.image)[3] == f.speaking for f in frames[:interrupt_at] + frames[boundary:] if not f.held)
        m = session.metrics().counters
        assert m.interrupts == 1 and m.speech_frames < 40
        # the cancelled window was formed again from the saved state: same index, same carry, now silent
        by_index = {}
        for r in model.requests:
            if r.avatar is session.avatar:
                by_index.setdefault(r.index, []).append(r)
        again = [rs for rs in by_index.values() if len(rs) == 2]
        assert len(again) == 1
        first, second = again[0]
        assert first.carry == second.carry and first.speaking.all() and not second.speaking.any()
        await engine.stop()

    await clock.run(body())


async def test_memory_stays_bounded_over_many_windows_with_and_without_a_reader():
    clock = FakeClock()

    async def body():
        engine = await started_engine(SolidColourModel(), clock, max_buffered_audio_s=5.0)
        read = await engine.open_session("a")
        unread = await engine.open_session("a")  # nobody iterates this one
        unread.push_audio(speech(20.0))  # beyond the 5 s buffer cap
        assert unread.buffered_seconds == pytest.approx(5.0)
        assert unread.metrics().counters.dropped_audio_s == pytest.approx(15.0)
        t0 = read.slot_time(0)
        feeder = asyncio.ensure_future(feed_realtime(clock, read, np.tile(speech(2.0), 30), t0, 640))
        peaks = {}
        async for frame in read:
            for s in (read, unread):
                for k, v in s.queue_sizes().items():
                    peaks[(s is read, k)] = max(peaks.get((s is read, k), 0), v)
            if frame.index == 1500:  # 375 windows
                break
        feeder.cancel()
        for (_, name), peak in peaks.items():
            limit = {"speech_chunks": 400, "speech_samples": 5 * 16000, "stream_samples": 640 * (F + 2),
                     "features": 8, "windows": 3, "slots": 3 * F, "frames": 3 * F, "ends": 2}[name]
            assert peak <= limit, (name, peak)
        assert peaks[(True, "speech_samples")] <= 16000 * 0.3  # live audio does not pile up
        await engine.stop()

    await clock.run(body())


async def test_sessions_share_model_calls_and_each_gets_its_own_frames():
    clock = FakeClock()
    model = SimulatedCost(SolidColourModel(), record=200)

    async def body():
        engine = await started_engine(model, clock)
        sessions = [await engine.open_session("a", seed=s) for s in (1, 2, 3)]
        t0 = sessions[0].slot_time(0)
        for k, session in enumerate(sessions[:2]):
            session.push_audio(speech(0.6, k))
        outputs = await asyncio.gather(*(collect(s, 24) for s in sessions))
        assert any(size == 3 for size, _ in model.calls)
        for seed, frames in zip((1, 2, 3), outputs):
            assert all(decode(f.image)[2] == seed for f in frames if not f.held)
            assert all(decode(f.image)[3] == f.speaking for f in frames if not f.held)
            assert (sum(f.speaking for f in frames) > 10) == (seed != 3)
            assert all(f.index == i for i, f in enumerate(frames)) and sessions[0].slot_time(0) == t0
        await engine.stop()

    await clock.run(body())


async def test_48k_stereo_s16_packets_of_odd_sizes_drive_the_lips():
    clock = FakeClock()

    async def body():
        engine = await started_engine(SolidColourModel(), clock)
        session = await engine.open_session("a", max_audio_backlog_s=0.5)
        mono = speech(2.0)
        from scipy.signal import resample_poly

        s16 = np.clip(resample_poly(mono, 3, 1) * 32767, -32768, 32767).astype(np.int16)
        interleaved = np.repeat(s16[:, None], 2, axis=1).reshape(-1).tobytes()
        t0 = session.slot_time(0)

        async def feed():
            rng, i, t = np.random.default_rng(0), 0, t0
            while i < len(interleaved):
                n = int(rng.integers(3, 7001))  # odd byte counts: split samples and stereo pairs
                await clock.sleep_until(t)
                session.push_audio(interleaved[i : i + n], 48000, 2)
                t += n / 4 / 48000
                i += n

        feeder = asyncio.ensure_future(feed())
        frames = await collect(session, 90)
        await feeder
        speaking = [f for f in frames if f.speaking]
        assert 49 <= len(speaking) <= 53  # 2 s of speech = 50 frames, resampler delay and span edges aside
        played = np.concatenate([f.audio for f in speaking])
        assert np.corrcoef(np.abs(played[:30000]), np.abs(mono[: played[:30000].size]))[0, 1] > -1  # finite
        assert np.abs(played).max() == pytest.approx(np.abs(mono).max(), rel=0.05)
        lat = session.metrics().audio_to_lip_ms
        assert lat["count"] >= 49 and lat["p95"] < 400
        await engine.stop()

    await clock.run(body())


async def test_end_of_speech_flags_the_last_frame_and_playout_completes():
    clock = FakeClock()

    async def body():
        engine = await started_engine(SolidColourModel(), clock)
        session = await engine.open_session("a")
        session.push_audio(speech(1.03))  # 25.75 frames
        session.end_of_speech()
        waiter = asyncio.ensure_future(session.wait_for_playout())
        frames = await collect(session, 40)
        assert waiter.done()
        speaking = [f.index for f in frames if f.speaking]
        assert speaking == list(range(speaking[0], speaking[0] + 26))  # left-aligned tail: no gap, no extra
        ends = [f.index for f in frames if f.end_of_speech]
        assert ends == [speaking[-1]]
        await engine.stop()

    await clock.run(body())


async def test_model_min_steps_holds_frames_instead_of_fewer_steps():
    """A model whose 1-step output is unusable (its spec's min_steps 2): where 1 step would keep pace, the engine
    still runs 2 and holds frames. An explicit stream steps=1 is the user's choice and stays allowed."""
    clock = FakeClock()
    model = SolidColourModel(default_steps=2, min_steps=2, seconds_per_step=0.15)
    assert StreamConfig().resolve(model.spec).min_steps == 2
    assert StreamConfig(steps=1).resolve(model.spec).min_steps == 1
    with pytest.raises(EmoteError, match="min_steps"):
        StreamConfig(min_steps=0).resolve(model.spec)
    with pytest.raises(EmoteError, match="context_lookahead_frames"):
        StreamConfig(context_lookahead_frames=3).resolve(model.spec)

    async def body():
        engine = await started_engine(model, clock)
        session = await engine.open_session("a", max_audio_backlog_s=0.5)
        feeder = asyncio.ensure_future(feed_realtime(clock, session, speech(8.0), session.slot_time(0), 320))
        await collect(session, 120)
        feeder.cancel()
        assert engine.steps_used.get(1, 0) == 0 and engine.steps_used.get(2, 0) > 0
        assert session.metrics().counters.skipped_windows > 0
        await engine.stop()

    await clock.run(body())


@pytest.mark.parametrize("seconds_per_step,expect", [(0.15, "fewer_steps"), (0.3, "skip")])
async def test_behind_schedule_policy_keeps_pace_and_latency_bounded(seconds_per_step, expect):
    clock = FakeClock()

    async def body():
        engine = await started_engine(SolidColourModel(seconds_per_step=seconds_per_step), clock, steps=2, min_steps=1)
        session = await engine.open_session("a", max_audio_backlog_s=0.5)
        t0 = session.slot_time(0)
        feeder = asyncio.ensure_future(feed_realtime(clock, session, speech(8.0), t0, 320))
        frames = await collect(session, 200)
        feeder.cancel()
        for f in frames:  # pacing never slips, whatever the model does
            assert f.index == frames[0].index + frames.index(f)
        m = session.metrics()
        c = m.counters
        if expect == "fewer_steps":
            # 2 steps (0.30 s) cannot keep up with 0.16 s windows; 1 step (0.15 s) can
            assert c.reduced_step_windows > 0 and engine.steps_used.get(1, 0) > engine.steps_used.get(2, 0)
            assert c.skipped_windows == 0
            assert c.held_frames <= 2 * F
        else:
            assert c.skipped_windows > 0 and c.held_frames > 0
            assert c.held_frames < 170  # every other window is still generated, on time
        assert session.queue_sizes()["windows"] <= 3 and c.consumer_dropped_frames == 0
        lead_cap = engine.config.max_lead_windows * engine.window_seconds
        assert m.audio_to_lip_ms["max"] <= 1000 * (lead_cap + 4 / VIDEO_FPS + 0.5 + 0.1)
        await engine.stop()

    await clock.run(body())


async def test_slow_reader_skips_ahead_instead_of_queueing():
    clock = FakeClock()

    async def body():
        engine = await started_engine(SolidColourModel(), clock, max_consumer_lag_frames=3)
        session = await engine.open_session("a")
        first = await collect(session, 1)
        await clock.sleep_until(session.slot_time(0) + 2.0)  # the reader stalls for 2 s
        nxt = await collect(session, 1)
        assert nxt[0].index >= 49
        assert session.metrics().counters.consumer_dropped_frames >= 45
        assert session.queue_sizes()["frames"] <= 3 * F
        await engine.stop()

    await clock.run(body())


async def test_avatar_is_prepared_once_and_shared():
    clock = FakeClock()
    calls = []

    class Counting(SolidColourModel):
        def prepare_avatar(self, avatar_id, portrait, cache_dir=None):
            calls.append(avatar_id)
            return super().prepare_avatar(avatar_id, portrait, cache_dir)

    async def body():
        engine = engine_for(Counting(), clock)
        await engine.start()
        warm = len(calls)
        a = await engine.add_avatar("a", portrait())
        b = await engine.add_avatar("a", portrait())
        s1 = await engine.open_session("a")
        s2 = await engine.open_session("a")
        assert a is b and len(calls) == warm + 1
        assert s1.avatar is s2.avatar is a
        await engine.stop()

    await clock.run(body())


async def test_live_input_catches_up_in_pauses_after_a_network_hiccup():
    clock = FakeClock()

    async def body():
        engine = await started_engine(SolidColourModel(), clock)
        session = await engine.open_session("a", max_audio_backlog_s=0.5)
        talk = np.concatenate([speech(1.0), np.zeros(8000, np.float32)])  # 1 s of speech, 0.5 s pushed silence
        stream = np.tile(talk, 4)
        t0 = session.slot_time(0) + 0.013
        packet = 320

        async def feed():
            for i in range(0, stream.size, packet):
                when = t0 + i / 16000
                if 1.6 <= i / 16000 < 1.9:  # packets of 1.6-1.9 s arrive 300 ms late, in one burst
                    when = t0 + 1.9
                await clock.sleep_until(when)
                session.push_audio(stream[i : i + packet])

        feeder = asyncio.ensure_future(feed())
        async for frame in session:
            if frame.index >= 175:
                break
        await feeder
        lat = session.audio_to_lip.values()
        first_utterance, last_utterance = np.median(list(lat)[:20]), np.median(list(lat)[-20:])
        assert max(lat) > first_utterance + 0.1  # the hiccup did delay the lips...
        assert last_utterance <= first_utterance + 0.041  # ...but the pauses brought latency back
        assert session.metrics().counters.skipped_silence_s > 0.1
        assert session.metrics().counters.dropped_audio_s == 0  # no speech was thrown away
        await engine.stop()

    await clock.run(body())


async def test_a_failing_model_call_skips_its_window_and_the_engine_keeps_going():
    clock = FakeClock()

    class FailsOnce(SolidColourModel):
        failed = False

        def generate(self, requests, steps):
            if not FailsOnce.failed and requests[0].index == 5:
                FailsOnce.failed = True
                raise RuntimeError("expected input tensors on one device")
            return super().generate(requests, steps)

    async def body():
        engine = await started_engine(FailsOnce(), clock)
        session = await engine.open_session("a")
        frames = await collect(session, 60)
        assert FailsOnce.failed and engine.model_errors == 1
        assert all(not f.held for f in frames[-20:]), "fresh frames keep coming after the failure"
        assert engine.metrics().model_errors == 1
        await engine.stop()

    await clock.run(body())
