"""Streaming sessions on a FakeClock, with the model inline (deterministic): pacing, idle, barge-in, bounds,
batching, input formats, end of speech and the behind-schedule policy."""
import asyncio
import functools
import math

import numpy as np
import pytest
import torch

from avatar.config import VIDEO_FPS
from avatar.errors import EmoteError
from avatar.pipeline import AvatarPipeline
from streaming.clock import FakeClock
from streaming.config import StreamConfig
from streaming.engine import StreamingEngine
from streaming.testing import SimulatedPipeline, StubPipeline

F = 4  # the tiny preset's window


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's ops are too small to gain from threads; on a busy 2-core machine they lose ~10x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.cache
def tiny() -> AvatarPipeline:
    return AvatarPipeline.from_config("tiny", seed=0, trained=False)


def portrait(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    voiced = np.sin(2 * np.pi * (150 + 30 * seed) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    return (0.3 * voiced + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def engine_for(pipe, clock, **config) -> StreamingEngine:
    return StreamingEngine(pipe, StreamConfig(**config), clock=clock, threaded=False)


async def started_engine(pipe, clock, **config) -> StreamingEngine:
    """A started engine with avatar "a" registered."""
    engine = engine_for(pipe, clock, **config)
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


async def test_timestamps_exact_and_frame_count_over_simulated_minutes():
    clock = FakeClock()
    pipe = StubPipeline(tiny())

    async def body():
        engine = await started_engine(pipe, clock)
        session = await engine.open_session("a")
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
            assert frame.image.shape == (32, 32, 3) and frame.audio.shape == (640,)
            assert not frame.held
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


async def test_silence_gives_idle_frames_with_silence_features_and_idle_speed():
    clock = FakeClock()
    pipe = SimulatedPipeline(tiny(), record=200)

    async def body():
        engine = await started_engine(pipe, clock, idle_speed=0.3)
        session = await engine.open_session("a")
        frames = await collect(session, 50)  # 2 s with no audio at all
        assert [f.index for f in frames] == list(range(50))
        assert not any(f.speaking or f.held for f in frames)
        assert all(not f.audio.any() for f in frames)
        assert len({f.image.tobytes() for f in frames}) > 10  # alive: frames keep changing
        windows = [w for w in pipe.windows if w.reference is session.avatar.reference]  # not the warm-up's
        assert len(windows) >= 12
        silence = tiny().audio_windows(tiny().encode_audio(np.zeros(16000 * 3, np.float32)))
        for w in windows:
            assert torch.all(w.speed == 0.3)
        # after the encoder's receptive field, silence features are the steady offline silence features
        torch.testing.assert_close(windows[-1].audio, silence[40 : 40 + F], rtol=0, atol=0)
        await engine.stop()

    await clock.run(body())


async def test_session_features_equal_offline_features_of_its_stream():
    """With the full ±2 context waited for, each window's audio input is the offline encoding of what the session
    played (its output audio), bit for bit."""
    clock = FakeClock()
    pipe = SimulatedPipeline(tiny(), record=200)

    async def body():
        engine = await started_engine(pipe, clock, context_lookahead_frames=2)
        session = await engine.open_session("a")
        feeder = asyncio.ensure_future(feed_realtime(clock, session, speech(1.5), session.slot_time(0) + 0.23, 333))
        frames = await collect(session, 60)
        await feeder
        played = np.concatenate([f.audio for f in frames])
        assert sum(f.speaking for f in frames) >= 36
        offline = tiny().audio_windows(tiny().encode_audio(played))
        windows = [w for w in pipe.windows if w.reference is session.avatar.reference][: 60 // F - 1]  # the last window's lookahead reaches past what was played
        for i, w in enumerate(windows):
            assert torch.equal(w.audio, offline[i * F : (i + 1) * F]), i
        await engine.stop()

    await clock.run(body())


async def test_interrupt_drops_backlog_and_closes_the_mouth_within_one_window():
    clock = FakeClock()
    pipe = SimulatedPipeline(tiny(), seconds_per_step=0.01, decode_seconds_per_frame=0.002)

    async def body():
        engine = await started_engine(pipe, clock)
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
        m = session.metrics().counters
        assert m.interrupts == 1 and m.speech_frames < 40
        await engine.stop()

    await clock.run(body())


async def test_memory_stays_bounded_over_many_windows_with_and_without_a_reader():
    clock = FakeClock()
    pipe = StubPipeline(tiny())

    async def body():
        engine = await started_engine(pipe, clock, max_buffered_audio_s=5.0)
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


async def _run_sessions(seeds: list[int], pipe_record: SimulatedPipeline, clock: FakeClock, n_frames: int = 24,
                        **config):
    engine = engine_for(pipe_record, clock, **config)
    await engine.start()
    for s in seeds:
        await engine.add_avatar(f"a{s}", portrait(s))
    sessions = [await engine.open_session(f"a{s}", seed=s) for s in seeds]
    t0 = sessions[0].slot_time(0)
    feeders = [asyncio.ensure_future(feed_realtime(clock, sess, speech(1.0, s), t0 + 0.05, 480))
               for s, sess in zip(seeds, sessions)]
    outputs = await asyncio.gather(*(collect(sess, n_frames) for sess in sessions))
    for f in feeders:
        await f
    await engine.stop()
    return {s: out for s, out in zip(seeds, outputs)}


@functools.cache
def tiny_with_portrait_refiner() -> AvatarPipeline:
    from conftest import with_portrait_refiner

    return with_portrait_refiner(tiny(), seed=3)


@functools.cache
def tiny_with_refiner_that_hears() -> AvatarPipeline:
    from avatar.grow import add_refiner_audio

    heard = add_refiner_audio(tiny_with_portrait_refiner(), 4, seed=3)
    with torch.no_grad():  # as training moves its zero-initialised input weights
        generator = torch.Generator().manual_seed(0)
        for conv in heard.portrait_refiner.audio_inputs.values():
            conv.weight.copy_(0.5 * torch.randn(conv.weight.shape, generator=generator))
    return heard


@pytest.mark.parametrize("model", [tiny, tiny_with_portrait_refiner, tiny_with_refiner_that_hears])
async def test_two_sessions_batched_equal_each_alone(model):
    """Also with a PortraitRefiner (`StreamConfig.refine`): each frame of a batch is refined with its own session's
    portrait, and, with a refiner that hears audio, its own audio."""
    results, recorders = {}, {}
    for label, seeds in (("a", [1]), ("b", [2]), ("ab", [1, 2])):
        clock = FakeClock()
        recorders[label] = SimulatedPipeline(model(), record=100)
        refine = model is not tiny
        results[label] = await clock.run(_run_sessions(seeds, recorders[label], clock, refine=refine))
    assert any(size == 2 for size, _ in recorders["ab"].calls)  # they really shared backbone calls
    for seed, alone in ((1, results["a"][1]), (2, results["b"][2])):
        together = results["ab"][seed]
        assert sum(f.speaking for f in together) > 10
        for x, y in zip(alone, together):
            assert x.index == y.index and np.array_equal(x.audio, y.audio)
            # float rounding of a batch-of-2 matmul may differ from batch-of-1 in the last bit: allow 1/255
            assert np.abs(x.image.astype(int) - y.image.astype(int)).max() <= 1
    alone_latents = {seed: l for r in (recorders["a"], recorders["b"]) for seed, l in r.latents}
    for seed, latents in recorders["ab"].latents:
        torch.testing.assert_close(latents, alone_latents[seed], rtol=1e-5, atol=1e-5)


async def test_live_sessions_skip_the_portrait_refiner_unless_configured():
    frames = {}
    for label, model, config in (("plain", tiny, {}), ("skipped", tiny_with_portrait_refiner, {}),
                                 ("refined", tiny_with_portrait_refiner, {"refine": True})):
        clock = FakeClock()
        out = await clock.run(_run_sessions([1], SimulatedPipeline(model(), record=100), clock, **config))
        frames[label] = np.stack([f.image for f in out[1]])
    assert np.array_equal(frames["plain"], frames["skipped"])
    assert not np.array_equal(frames["plain"], frames["refined"])
    with pytest.raises(EmoteError, match="refine needs a model with a portrait refiner"):
        StreamConfig(refine=True).resolve(tiny().config)


async def test_a_shared_noise_model_draws_every_window_of_a_session_from_its_first_windows_seed():
    from avatar.pipeline import window_seed

    base = tiny()
    shared = AvatarPipeline(base.config.replace(noise="shared"), base.vae, base.reference_net, base.backbone,
                            base.audio_encoder, base.scheduler)
    clock = FakeClock()
    recorder = StubPipeline(shared, record=100)
    await clock.run(_run_sessions([1, 2], recorder, clock))
    seeds = [w.seed for w in recorder.windows if w.seed != 0]  # seed 0: the engine's calibration at start
    assert len(seeds) > 4 and set(seeds) == {window_seed(1, 0), window_seed(2, 0)}


async def test_48k_stereo_s16_packets_of_odd_sizes_drive_the_lips():
    clock = FakeClock()
    pipe = StubPipeline(tiny())

    async def body():
        engine = await started_engine(pipe, clock)
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
    pipe = StubPipeline(tiny())

    async def body():
        engine = await started_engine(pipe, clock)
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
    """A model whose 1-step output is unusable (model config min_steps 2): where 1 step would keep pace, the engine
    still runs 2 and holds frames. An explicit stream steps=1 is the user's choice and stays allowed."""
    clock = FakeClock()
    inner = tiny()
    inner.config = inner.config.replace(min_steps=2)
    pipe = StubPipeline(inner, seconds_per_step=0.15)
    assert StreamConfig().resolve(inner.config).min_steps == 2
    assert StreamConfig(steps=1).resolve(inner.config).min_steps == 1
    with pytest.raises(EmoteError, match="min_steps"):
        StreamConfig(min_steps=0).resolve(inner.config)

    async def body():
        engine = await started_engine(pipe, clock)
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
    pipe = StubPipeline(tiny(), seconds_per_step=seconds_per_step)

    async def body():
        engine = await started_engine(pipe, clock, steps=2, min_steps=1)
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
    pipe = StubPipeline(tiny())

    async def body():
        engine = await started_engine(pipe, clock, max_consumer_lag_frames=3)
        session = await engine.open_session("a")
        first = await collect(session, 1)
        await clock.sleep_until(session.slot_time(0) + 2.0)  # the reader stalls for 2 s
        nxt = await collect(session, 1)
        assert nxt[0].index >= 49
        assert session.metrics().counters.consumer_dropped_frames >= 45
        assert session.queue_sizes()["frames"] <= 3 * F
        await engine.stop()

    await clock.run(body())


async def test_avatar_reference_is_computed_once_and_shared():
    clock = FakeClock()
    calls = []
    base = tiny()

    class Counting(SimulatedPipeline):
        def prepare_reference(self, image, face_box=None):
            calls.append(1)
            return base.prepare_reference(image, face_box)

    async def body():
        engine = engine_for(Counting(base), clock)
        await engine.start()
        warm = len(calls)
        a = await engine.add_avatar("a", portrait())
        b = await engine.add_avatar("a", portrait())
        s1 = await engine.open_session("a")
        s2 = await engine.open_session("a")
        assert a is b and len(calls) == warm + 1
        assert s1.avatar.reference is s2.avatar.reference
        await engine.stop()

    await clock.run(body())


async def test_live_input_catches_up_in_pauses_after_a_network_hiccup():
    clock = FakeClock()
    pipe = StubPipeline(tiny())

    async def body():
        engine = await started_engine(pipe, clock)
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
        lat = session.audio_to_lip._values
        first_utterance, last_utterance = np.median(list(lat)[:20]), np.median(list(lat)[-20:])
        assert max(lat) > first_utterance + 0.1  # the hiccup did delay the lips...
        assert last_utterance <= first_utterance + 0.041  # ...but the pauses brought latency back
        assert session.metrics().counters.skipped_silence_s > 0.1
        assert session.metrics().counters.dropped_audio_s == 0  # no speech was thrown away
        await engine.stop()

    await clock.run(body())


async def test_a_failing_model_call_skips_its_window_and_the_engine_keeps_going():
    clock = FakeClock()

    class FailsOnce(StubPipeline):
        failed = False

        def denoise_windows(self, windows, steps=None, **kwargs):
            if not FailsOnce.failed and windows[0].seed % 7 == 3:
                FailsOnce.failed = True
                raise RuntimeError("expected input tensors on one device")
            return super().denoise_windows(windows, steps, **kwargs)

    async def body():
        engine = await started_engine(FailsOnce(tiny()), clock)
        session = await engine.open_session("a")
        frames = await collect(session, 60)
        assert FailsOnce.failed and engine.model_errors == 1
        assert all(not f.held for f in frames[-20:]), "fresh frames keep coming after the failure"
        assert engine.metrics().model_errors == 1
        await engine.stop()

    await clock.run(body())


async def test_stream_strength_defaults_to_the_models_and_reaches_the_model_call():
    clock = FakeClock()
    inner = tiny()
    inner.config = inner.config.replace(strength=0.4)
    assert StreamConfig().resolve(inner.config).strength == 0.4
    assert StreamConfig(strength=1.0).resolve(inner.config).strength == 1.0
    with pytest.raises(EmoteError, match="strength"):
        StreamConfig(strength=0.0).resolve(inner.config)
    seen = []

    class Recording(StubPipeline):
        def denoise_windows(self, windows, steps=None, **kwargs):
            seen.append(kwargs.get("strength"))
            return super().denoise_windows(windows, steps, **kwargs)

    async def body():
        engine = await started_engine(Recording(inner), clock, strength=0.7)
        session = await engine.open_session("a")
        session.push_audio(speech(0.5))
        await collect(session, 10)
        await engine.stop()

    await clock.run(body())
    assert seen and set(seen) == {0.7}
