"""The pixel EMO pipeline streams through `PixelFrameModel` (tiny random models, FakeClock, model inline): features
equal offline encoding, batching across sessions, the portrait refiner option, shared noise, warm-start strength."""
import asyncio
import functools

import numpy as np
import pytest
import torch

from avatar.errors import EmoteError
from avatar.pipeline import AvatarPipeline, window_seed
from avatar.pixel_model import PixelFrameModel
from streaming.clock import FakeClock
from streaming.config import StreamConfig
from streaming.engine import StreamingEngine
from streaming.testing import SimulatedCost

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


def portrait(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    voiced = np.sin(2 * np.pi * (150 + 30 * seed) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    return (0.3 * voiced + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


async def feed_realtime(clock, session, audio, start, chunk=320):
    for i in range(0, len(audio), chunk):
        await clock.sleep_until(start + i / 16000)
        session.push_audio(audio[i : i + chunk])


async def collect(session, count):
    frames = []
    async for frame in session:
        frames.append(frame)
        if len(frames) == count:
            break
    return frames


async def _run_sessions(seeds: list[int], model, clock: FakeClock, n_frames: int = 24, **config):
    engine = StreamingEngine(model, StreamConfig(**config), clock=clock, threaded=False)
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


async def test_session_features_equal_offline_features_of_its_stream():
    """With the full ±2 context waited for, each window's audio input is the offline encoding of what the session
    played (its output audio), bit for bit."""
    clock = FakeClock()
    model = SimulatedCost(PixelFrameModel(tiny()), record=200)

    async def body():
        engine = StreamingEngine(model, StreamConfig(context_lookahead_frames=2), clock=clock, threaded=False)
        await engine.add_avatar("a", portrait())
        session = await engine.open_session("a")
        feeder = asyncio.ensure_future(feed_realtime(clock, session, speech(1.5), session.slot_time(0) + 0.23, 333))
        frames = await collect(session, 60)
        await feeder
        played = np.concatenate([f.audio for f in frames])
        assert sum(f.speaking for f in frames) >= 36
        assert frames[-1].image.shape == (32, 32, 3)
        offline = tiny().audio_windows(tiny().encode_audio(played))
        # the last window's lookahead reaches past what was played
        requests = [r for r in model.requests if r.avatar is session.avatar][: 60 // F - 1]
        for i, r in enumerate(requests):
            assert torch.equal(torch.from_numpy(r.audio), offline[i * F : (i + 1) * F]), i
        await engine.stop()

    await clock.run(body())


@pytest.mark.parametrize("pipeline", [tiny, tiny_with_portrait_refiner, tiny_with_refiner_that_hears])
async def test_two_sessions_batched_equal_each_alone(pipeline):
    """Also with a PortraitRefiner (`refine=True`): each frame of a batch is refined with its own session's
    portrait, and, with a refiner that hears audio, its own audio. The carry (motion latents) matches too."""
    results, recorders = {}, {}
    for label, seeds in (("a", [1]), ("b", [2]), ("ab", [1, 2])):
        clock = FakeClock()
        recorders[label] = SimulatedCost(PixelFrameModel(pipeline(), refine=pipeline is not tiny), record=100)
        results[label] = await clock.run(_run_sessions(seeds, recorders[label], clock))
    assert any(size == 2 for size, _ in recorders["ab"].calls)  # they really shared model calls
    for seed, alone in ((1, results["a"][1]), (2, results["b"][2])):
        together = results["ab"][seed]
        assert sum(f.speaking for f in together) > 10
        for x, y in zip(alone, together):
            assert x.index == y.index and np.array_equal(x.audio, y.audio)
            # float rounding of a batch-of-2 matmul may differ from batch-of-1 in the last bit: allow 1/255
            assert np.abs(x.image.astype(int) - y.image.astype(int)).max() <= 1

    def carries(recorder):
        return {(r.seed, r.index): out.carry for r, out in zip(recorder.requests, recorder.results)
                if r.avatar.avatar_id != "example"}

    alone = {**carries(recorders["a"]), **carries(recorders["b"])}
    together = carries(recorders["ab"])
    assert len(together) >= 10 and set(together) <= set(alone)
    for key, carry in together.items():
        assert carry.shape[0] == tiny().config.motion_frames
        torch.testing.assert_close(carry, alone[key], rtol=1e-5, atol=1e-5)


async def test_live_sessions_skip_the_portrait_refiner_unless_configured():
    frames = {}
    for label, pipeline, options in (("plain", tiny, {}), ("skipped", tiny_with_portrait_refiner, {}),
                                     ("refined", tiny_with_portrait_refiner, {"refine": True})):
        clock = FakeClock()
        model = SimulatedCost(PixelFrameModel(pipeline(), **options), record=100)
        out = await clock.run(_run_sessions([1], model, clock))
        frames[label] = np.stack([f.image for f in out[1]])
    assert np.array_equal(frames["plain"], frames["skipped"])
    assert not np.array_equal(frames["plain"], frames["refined"])
    with pytest.raises(EmoteError, match="refine needs a model with a portrait refiner"):
        PixelFrameModel(tiny(), refine=True)


def recording_denoise(pipeline: AvatarPipeline, seen: list) -> AvatarPipeline:
    """`pipeline` whose denoise_windows records (window seeds, strength) of every call."""
    inner = pipeline.denoise_windows

    def denoise_windows(windows, steps=None, **kwargs):
        seen.append(([w.seed for w in windows], kwargs.get("strength")))
        return inner(windows, steps=steps, **kwargs)

    pipeline.denoise_windows = denoise_windows
    return pipeline


async def test_a_shared_noise_model_draws_every_window_of_a_session_from_its_first_windows_seed():
    base, seen = tiny(), []
    shared = AvatarPipeline(base.config.replace(noise="shared"), base.vae, base.reference_net, base.backbone,
                            base.audio_encoder, base.scheduler)
    clock = FakeClock()
    await clock.run(_run_sessions([1, 2], SimulatedCost(PixelFrameModel(recording_denoise(shared, seen))), clock))
    seeds = [s for call, _ in seen for s in call if s != 0]  # seed 0: the engine's calibration at start
    assert len(seeds) > 4 and set(seeds) == {window_seed(1, 0), window_seed(2, 0)}


async def test_strength_defaults_to_the_models_and_reaches_the_model_call():
    base, seen = tiny(), []
    inner = AvatarPipeline(base.config.replace(strength=0.4), base.vae, base.reference_net, base.backbone,
                           base.audio_encoder, base.scheduler)
    assert PixelFrameModel(inner).strength == 0.4
    assert PixelFrameModel(inner, strength=1.0).strength == 1.0
    with pytest.raises(EmoteError, match="strength"):
        PixelFrameModel(inner, strength=0.0)
    clock = FakeClock()
    model = SimulatedCost(PixelFrameModel(recording_denoise(inner, seen), strength=0.7))
    await clock.run(_run_sessions([1], model, clock, n_frames=10))
    assert seen and {strength for _, strength in seen} == {0.7}
    assert {s for call, _ in seen for s in call} > {window_seed(1, 0), window_seed(1, 1)}
