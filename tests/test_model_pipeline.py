"""AvatarPipeline: windows, determinism, reference cache, checkpoints (tiny preset, CPU)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from avatar.config import AUDIO_SAMPLE_RATE, get_preset
from avatar.errors import CheckpointError, EmoteError
from avatar.pipeline import AvatarPipeline, WindowInput, window_seed
from avatar.reference import ReferenceCache
from avatar.schedulers import build_scheduler, fresh_scheduler
from conftest import make_audible, speech_like, with_portrait_refiner


def render(pipe, portrait, seconds=1.0, **kwargs):
    return np.stack(list(pipe.render(portrait, speech_like(seconds), **kwargs)))


@pytest.mark.parametrize("seconds", [0.04, 0.3, 0.32, 0.36, 1.0, 2.02])
def test_frame_count_is_duration_times_25_across_window_boundaries(tiny_pipe, portrait, seconds):
    audio = speech_like(seconds)
    frames = list(tiny_pipe.render(portrait, audio))
    assert len(frames) == round(len(audio) * 25 / AUDIO_SAMPLE_RATE)
    assert all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in frames)


def test_other_sample_rates_are_resampled(tiny_pipe, portrait):
    audio_48k = np.interp(np.arange(48_000) / 3, np.arange(16_000), speech_like(1.0)).astype(np.float32)
    assert len(list(tiny_pipe.render(portrait, audio_48k, sample_rate=48_000))) == 25


def test_same_seed_same_frames_other_seed_other_frames(tiny_pipe, portrait):
    a = render(tiny_pipe, portrait, seed=7)
    b = render(tiny_pipe, portrait, seed=7)
    c = render(tiny_pipe, portrait, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_cached_reference_gives_identical_output(tiny_pipe, portrait, tmp_path):
    fresh = render(tiny_pipe, portrait, seed=3)
    cache = tiny_pipe.prepare_reference(portrait)
    cache.save(tmp_path / "ref.safetensors")
    loaded = ReferenceCache.load(tmp_path / "ref.safetensors", expected_model_id=tiny_pipe.model_id)
    reused = render(tiny_pipe, portrait, seed=3, reference=cache)
    from_disk = render(tiny_pipe, np.zeros_like(portrait), seed=3, reference=loaded)  # portrait ignored
    assert np.array_equal(fresh, reused)
    assert np.array_equal(fresh, from_disk)


def test_reference_cache_rejects_another_models_cache(tiny_pipe, portrait, tmp_path):
    cache = tiny_pipe.prepare_reference(portrait)
    cache.save(tmp_path / "ref.safetensors")
    other = AvatarPipeline.from_config("tiny", seed=1)
    with pytest.raises(EmoteError, match="another model"):
        ReferenceCache.load(tmp_path / "ref.safetensors", expected_model_id=other.model_id)
    (tmp_path / "bad.safetensors").write_bytes(b"not a cache")
    with pytest.raises(EmoteError, match="cannot read reference cache"):
        ReferenceCache.load(tmp_path / "bad.safetensors")


def test_reference_cache_moves_between_devices_and_dtypes(tiny_pipe, portrait):
    cache = tiny_pipe.prepare_reference(portrait)
    half = cache.to(dtype=torch.bfloat16)
    assert half.latent.dtype == torch.bfloat16 and half.bank[1].dtype == torch.bfloat16
    assert cache.latent.dtype == torch.float32  # the original is untouched
    assert half.nbytes * 2 == cache.nbytes


def test_motion_frames_carry_the_previous_window(tiny_pipe, portrait):
    """Window 2 depends on window 1's last frames: changing them changes window 2."""
    cfg = tiny_pipe.config
    cache = tiny_pipe.prepare_reference(portrait)
    for module in tiny_pipe.backbone.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.abs().sum() == 0:
            torch.nn.init.normal_(module.weight, std=0.05)
    try:
        audio = tiny_pipe.audio_windows(tiny_pipe.encode_audio(speech_like(0.16)))
        motion = torch.randn(cfg.motion_frames, cfg.latent_channels, cfg.latent_size, cfg.latent_size)

        def window(m):
            w = WindowInput(cache, audio, torch.zeros(cfg.frames_per_window), m, window_seed(0, 1))
            return tiny_pipe.denoise_windows([w])

        assert torch.equal(window(motion), window(motion.clone()))
        assert not torch.allclose(window(motion), window(motion + 1))
    finally:
        tiny_pipe.backbone.load_state_dict(AvatarPipeline.from_config("tiny", seed=0).backbone.state_dict())


def test_guidance_runs_three_backbone_passes_per_step(tiny_pipe, portrait):
    calls = []
    hook = tiny_pipe.backbone.register_forward_hook(lambda module, args, output: calls.append(args[2]))
    try:
        render(tiny_pipe, portrait, seconds=0.16, seed=1, steps=2)  # one 4-frame window
        assert len(calls) == 2, "unguided (the student): one pass per step"
        calls.clear()
        render(tiny_pipe, portrait, seconds=0.16, seed=1, steps=2, guidance_scale=3.0)
    finally:
        hook.remove()
    assert len(calls) == 6, "guided (the teacher): conditional, audio dropped, both dropped"
    assert sum(c.reference_bank is None for c in calls) == 2
    assert sum(bool((c.audio == 0).all()) for c in calls) == 4


def test_audio_guidance_alone_runs_two_passes_and_amplifies_what_the_audio_changes(portrait):
    pipe = make_audible(AvatarPipeline.from_config("tiny", seed=0))
    cache = pipe.prepare_reference(portrait)
    audio = pipe.audio_windows(pipe.encode_audio(speech_like(0.16)))

    def sample(audio_scale: float, silent: bool = False) -> torch.Tensor:
        window = WindowInput(cache, torch.zeros_like(audio) if silent else audio, torch.zeros(4), None, 0)
        return pipe.denoise_windows([window], steps=1, sampler="ddim", audio_guidance_scale=audio_scale)

    calls = []
    hook = pipe.backbone.register_forward_hook(lambda module, args, output: calls.append(args[2]))
    try:
        guided = sample(3.0)
    finally:
        hook.remove()
    assert len(calls) == 2 and all(c.reference_bank is not None for c in calls)
    assert sum(bool((c.audio == 0).all()) for c in calls) == 1
    heard, silent = sample(1.0), sample(1.0, silent=True)  # one DDIM step from noise: affine in the model's output
    assert not torch.allclose(heard, silent)
    torch.testing.assert_close(guided, silent + 3.0 * (heard - silent), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler, steps, strength, expected", [
    ("lcm", 1, 0.5, [499]),
    ("lcm", 2, 0.5, [499, 299]),
    ("lcm", 2, 1.0, [999, 499]),
    ("ddim", 2, 0.5, [499, 249]),
    ("ddim", 1, 0.7, [699]),
    ("ddim", 3, 0.7, [699, 499, 299]),
    ("ddim", 4, 1.0, [999, 749, 499, 249]),
])
def test_strength_starts_the_schedule_later_with_the_same_step_count(sampler, steps, strength, expected):
    cfg = get_preset("tiny")
    scheduler = fresh_scheduler(build_scheduler(cfg, sampler, lcm_grid=10), steps, strength=strength)
    assert scheduler.timesteps.tolist() == expected


def test_ddim_warm_start_keeps_the_many_step_spacing():
    scheduler = fresh_scheduler(build_scheduler(get_preset("tiny"), "ddim"), 25, strength=0.5)
    timesteps = scheduler.timesteps.tolist()
    assert len(timesteps) == 25 and timesteps[0] == 499 and timesteps[-1] >= 0
    # DDIMScheduler.step takes the previous timestep as t - T // num_inference_steps: the gap must be that
    assert {a - b for a, b in zip(timesteps, timesteps[1:])} == {1000 // scheduler.num_inference_steps}


@pytest.mark.parametrize("steps, strength, message", [
    (1, 0.0, r"strength must be in \(0, 1\]"),
    (1, 1.5, r"strength must be in \(0, 1\]"),
    (3, 0.25, "at most 2 steps"),  # a 10-point LCM grid keeps 2 points below t = 250
])
def test_bad_strength_is_a_clear_error(steps, strength, message):
    with pytest.raises(EmoteError, match=message):
        fresh_scheduler(build_scheduler(get_preset("tiny"), "lcm", lcm_grid=10), steps, strength=strength)


def test_warm_start_begins_at_the_previous_frame_or_the_portrait(tiny_pipe, portrait):
    """A low strength stays near the window's last motion frame (the reference for a first window), or near the
    reference for every window with warm_start "portrait"; from pure noise the same window lands elsewhere."""
    cfg = tiny_pipe.config
    shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    latents = torch.randn(cfg.motion_frames + 1, *shape, generator=torch.Generator().manual_seed(3))
    motion = latents[1:]
    # the random tiny VAE's latents are near zero: give the reference one of unit scale, like a trained VAE's
    cache = dataclasses.replace(tiny_pipe.prepare_reference(portrait), latent=latents[:1])
    audio = tiny_pipe.audio_windows(tiny_pipe.encode_audio(speech_like(0.16)))

    anchored = AvatarPipeline(cfg.replace(warm_start="portrait"), tiny_pipe.vae, tiny_pipe.reference_net,
                              tiny_pipe.backbone, tiny_pipe.audio_encoder, tiny_pipe.scheduler)

    def distance(pipe, motion_latents, start, strength):
        w = WindowInput(cache, audio, torch.zeros(cfg.frames_per_window), motion_latents, window_seed(0, 1))
        out = pipe.denoise_windows([w], steps=1, strength=strength)[0]
        return (out - start.expand_as(out)).norm() / start.expand_as(out).norm()

    cases = [(tiny_pipe, motion, motion[-1:]), (tiny_pipe, None, cache.latent), (anchored, motion, cache.latent),
             (anchored, None, cache.latent)]
    for pipe, motion_latents, start in cases:
        near, cold = distance(pipe, motion_latents, start, 0.02), distance(pipe, motion_latents, start, 1.0)
        assert near < 0.25 < 1.0 < cold, (pipe.config.warm_start, near, cold)
    with pytest.raises(EmoteError, match="warm_start"):
        cfg.replace(warm_start="noise").validate()


def test_warm_start_batches_first_and_later_windows_like_alone(tiny_pipe, portrait):
    cfg = tiny_pipe.config
    cache = tiny_pipe.prepare_reference(portrait)
    audio = tiny_pipe.audio_windows(tiny_pipe.encode_audio(speech_like(0.16)))
    motion = torch.randn(cfg.motion_frames, cfg.latent_channels, cfg.latent_size, cfg.latent_size, dtype=torch.float64)
    first = WindowInput(cache, audio, torch.zeros(cfg.frames_per_window), None, window_seed(0, 0))
    later = WindowInput(cache, audio, torch.zeros(cfg.frames_per_window), motion, window_seed(1, 5))
    both = tiny_pipe.denoise_windows([first, later], steps=1, strength=0.5)
    assert torch.allclose(both[0], tiny_pipe.denoise_windows([first], steps=1, strength=0.5)[0], atol=1e-5)
    assert torch.allclose(both[1], tiny_pipe.denoise_windows([later], steps=1, strength=0.5)[0], atol=1e-5)


def test_model_strength_is_the_default_and_validated(tiny_pipe, portrait):
    warm = AvatarPipeline(tiny_pipe.config.replace(strength=0.3), tiny_pipe.vae, tiny_pipe.reference_net,
                          tiny_pipe.backbone, tiny_pipe.audio_encoder, tiny_pipe.scheduler)
    assert np.array_equal(render(warm, portrait, seconds=0.2), render(tiny_pipe, portrait, seconds=0.2, strength=0.3))
    assert not np.array_equal(render(warm, portrait, seconds=0.2), render(tiny_pipe, portrait, seconds=0.2))
    with pytest.raises(EmoteError, match="strength"):
        tiny_pipe.config.replace(strength=0.0).validate()
    with pytest.raises(EmoteError, match="invalid model config"):
        type(tiny_pipe.config).from_dict({**tiny_pipe.config.to_dict(), "strength": "half"})
    with pytest.raises(EmoteError, match="at most 1 steps"):  # 2 default steps cannot fit a 10-point grid below 0.15
        AvatarPipeline(tiny_pipe.config.replace(strength=0.15), tiny_pipe.vae, tiny_pipe.reference_net,
                       tiny_pipe.backbone, tiny_pipe.audio_encoder, build_scheduler(tiny_pipe.config, lcm_grid=10))


def test_shared_noise_starts_every_frame_of_a_render_from_the_same_noise(tiny_pipe, portrait):
    """ModelConfig.noise "shared": one noise image for every frame of every window (from the render's seed), so that
    only the conditions change between frames; "independent" draws it per frame."""
    def first_step_inputs(noise: str, seed: int = 0) -> list[torch.Tensor]:
        pipe = AvatarPipeline(tiny_pipe.config.replace(noise=noise), tiny_pipe.vae, tiny_pipe.reference_net,
                              tiny_pipe.backbone, tiny_pipe.audio_encoder, tiny_pipe.scheduler)
        inputs = []
        hook = pipe.backbone.register_forward_pre_hook(lambda module, args: inputs.append(args[0][0].clone()))
        try:
            render(pipe, portrait, seconds=0.48, steps=1, strength=1.0, seed=seed)  # 3 windows, from pure noise
        finally:
            hook.remove()
        return inputs

    shared, independent = first_step_inputs("shared"), first_step_inputs("independent")
    assert len(shared) == len(independent) == 3
    assert all(torch.equal(window[k], shared[0][0]) for window in shared for k in range(len(window)))
    assert not torch.equal(independent[0][0], independent[0][1])
    assert not torch.equal(independent[0][0], independent[1][0])
    assert not torch.equal(first_step_inputs("shared", seed=1)[0][0], shared[0][0])  # the seed still matters
    with pytest.raises(EmoteError, match="noise must be one of"):
        tiny_pipe.config.replace(noise="pink").validate()


def test_teacher_sampler_ddim_many_steps(tiny_pipe, portrait):
    cache = tiny_pipe.prepare_reference(portrait)
    audio = tiny_pipe.audio_windows(tiny_pipe.encode_audio(speech_like(0.16)))
    w = WindowInput(cache, audio, torch.zeros(4), None, 0)
    out = tiny_pipe.denoise_windows([w], steps=25, sampler="ddim", guidance_scale=2.0)
    assert out.shape == (1, 4, 4, 8, 8) and torch.isfinite(out).all()


def test_long_audio_streams_window_by_window(tiny_pipe, portrait):
    """A 3-minute render is lazy: each window is sampled only when its frames are pulled, so memory is one window.

    The sampler is replaced by a counter returning zero latents (the real sampler is covered above): this test is
    about the windowing of 4500 frames, and stays fast.
    """
    cfg = tiny_pipe.config
    calls = []

    def counting_sampler(windows, **kwargs):
        calls.append(len(windows))
        return torch.zeros(len(windows), cfg.frames_per_window, cfg.latent_channels, cfg.latent_size, cfg.latent_size)

    tiny_pipe.denoise_windows = counting_sampler
    try:
        frames = tiny_pipe.render(portrait, np.zeros(AUDIO_SAMPLE_RATE * 180, np.float32))
        first = [next(frames) for _ in range(cfg.frames_per_window)]
        assert len(calls) == 1
        rest = sum(1 for _ in frames)
    finally:
        del tiny_pipe.denoise_windows
    assert len(first) + rest == 180 * 25
    assert len(calls) == 180 * 25 // cfg.frames_per_window


def test_save_load_round_trip_is_bit_exact(tiny_pipe, tiny_model_dir, portrait):
    loaded = AvatarPipeline.from_pretrained(tiny_model_dir)
    for name in ("vae", "reference_net", "backbone", "audio_encoder"):
        a, b = getattr(tiny_pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.config == tiny_pipe.config
    assert loaded.model_id == tiny_pipe.model_id
    assert np.array_equal(render(tiny_pipe, portrait, seed=5), render(loaded, portrait, seed=5))


@pytest.fixture(scope="module")
def portrait_refiner_pipe(tiny_pipe):
    return with_portrait_refiner(tiny_pipe, seed=5)


def test_a_new_portrait_refiner_starts_as_the_autoencoders_decoder(tiny_pipe, portrait):
    from avatar.grow import add_portrait_refiner

    refined = add_portrait_refiner(tiny_pipe, seed=5)
    assert np.array_equal(render(refined, portrait, seed=5), render(tiny_pipe, portrait, seed=5))


def test_portrait_refiner_decodes_with_each_frames_own_portrait(portrait_refiner_pipe, tiny_pipe, portrait):
    pipe = portrait_refiner_pipe
    mine, other = pipe.prepare_reference(portrait), pipe.prepare_reference(255 - portrait)
    assert [f.shape[1] for f in mine.refiner] == list(pipe.config.portrait_refiner_channels)
    latents = torch.randn(2, *mine.latent.shape[1:], generator=torch.Generator().manual_seed(0))
    with_mine, with_other = pipe.decode(latents, mine), pipe.decode(latents, other)
    assert np.abs(with_mine.astype(int) - with_other.astype(int)).mean() > 0.1  # it reads the portrait
    mixed = pipe.decode(latents, [mine, other])  # two sessions in one batch
    assert np.abs(mixed[0].astype(int) - with_mine[0]).max() <= 1
    assert np.abs(mixed[1].astype(int) - with_other[1]).max() <= 1
    with pytest.raises(ValueError, match="one reference per latent"):
        pipe.decode(latents, [mine, other, mine])
    with pytest.raises(ValueError, match="pass its ReferenceCache"):
        pipe.decode(latents)
    assert np.array_equal(pipe.decode(latents, refine=False), tiny_pipe.decode(latents))
    with pytest.raises(EmoteError, match="no portrait-refiner features"):  # a cache from a model without one
        pipe.decode(latents, tiny_pipe.prepare_reference(portrait))


def test_portrait_refiner_model_saves_loads_and_caches_exactly(portrait_refiner_pipe, tiny_pipe, portrait, tmp_path):
    pipe = portrait_refiner_pipe
    pipe.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "portrait_refiner" / "config.json").is_file()
    loaded = AvatarPipeline.from_pretrained(tmp_path / "model")
    assert loaded.config.portrait_refiner_channels == pipe.config.portrait_refiner_channels
    assert loaded.model_id == pipe.model_id != tiny_pipe.model_id
    # a cache holds the refiner's features, so its weights are part of the id
    assert with_portrait_refiner(tiny_pipe, seed=6).model_id != pipe.model_id
    frames = render(pipe, portrait, seed=5)
    assert not np.array_equal(frames, render(tiny_pipe, portrait, seed=5))
    assert np.array_equal(frames, render(loaded, portrait, seed=5))
    pipe.prepare_reference(portrait).save(tmp_path / "ref.safetensors")
    cached = ReferenceCache.load(tmp_path / "ref.safetensors", expected_model_id=loaded.model_id)
    assert np.array_equal(frames, render(loaded, np.zeros_like(portrait), seed=5, reference=cached))
    shutil.rmtree(tmp_path / "model" / "portrait_refiner")
    with pytest.raises(CheckpointError, match="portrait_refiner"):
        AvatarPipeline.from_pretrained(tmp_path / "model")


def test_portrait_refiner_widths_are_validated(tiny_pipe):
    cfg = tiny_pipe.config
    with pytest.raises(EmoteError, match="one positive width per VAE level"):
        cfg.replace(portrait_refiner_channels=(8, 8)).validate()
    with pytest.raises(EmoteError, match="one positive width per VAE level"):
        cfg.replace(portrait_refiner_channels=(8, 0, 8)).validate()
    with pytest.raises(EmoteError, match="portrait refiner is needed"):
        AvatarPipeline(cfg.replace(portrait_refiner_channels=(8, 8, 8)), tiny_pipe.vae, tiny_pipe.reference_net,
                       tiny_pipe.backbone, tiny_pipe.audio_encoder, tiny_pipe.scheduler)


def test_refiner_audio_path_starts_as_the_refiner_then_hears_each_frames_audio(portrait_refiner_pipe, portrait,
                                                                               tmp_path):
    from avatar.grow import add_refiner_audio
    from conftest import speech_like

    pipe = portrait_refiner_pipe
    grown = add_refiner_audio(pipe, 4, seed=1)
    assert grown.config.portrait_refiner_audio_channels == 4
    assert np.array_equal(render(grown, portrait, seed=5), render(pipe, portrait, seed=5))  # zero input weights
    heard = add_refiner_audio(pipe, 4, seed=1)
    with torch.no_grad():  # as training moves them
        generator = torch.Generator().manual_seed(0)
        for conv in heard.portrait_refiner.audio_inputs.values():
            conv.weight.copy_(0.5 * torch.randn(conv.weight.shape, generator=generator))
    assert heard.model_id not in (pipe.model_id, grown.model_id)
    reference = heard.prepare_reference(portrait)
    contexts = heard.audio_windows(heard.encode_audio(speech_like(0.4)))
    latents = torch.randn(len(contexts), *reference.latent.shape[1:], generator=torch.Generator().manual_seed(0))
    speech, silence = heard.decode(latents, reference, audio=contexts), heard.decode(latents, reference,
                                                                                    audio=torch.zeros_like(contexts))
    assert np.abs(speech.astype(int) - silence.astype(int)).max() >= 3  # (around the lips only)
    one = heard.decode(latents[3:4], reference, audio=contexts[3:4])  # each frame hears its own audio only
    assert np.abs(one[0].astype(int) - speech[3]).max() <= 1
    with pytest.raises(ValueError, match="audio context per latent"):
        heard.decode(latents, reference)
    with pytest.raises(ValueError, match="audio context per latent"):
        heard.decode(latents, reference, audio=contexts[:2])
    assert np.array_equal(pipe.decode(latents, pipe.prepare_reference(portrait), audio=contexts),
                          pipe.decode(latents, pipe.prepare_reference(portrait)))  # a refiner without audio ignores it
    heard.save_pretrained(tmp_path / "heard")
    loaded = AvatarPipeline.from_pretrained(tmp_path / "heard")
    assert loaded.model_id == heard.model_id
    assert np.array_equal(render(loaded, portrait, seed=5), render(heard, portrait, seed=5))
    index = json.loads((tmp_path / "heard" / "model_index.json").read_text())
    index["model"]["portrait_refiner_audio_channels"] = 0  # an index that disagrees with the refiner's config
    (tmp_path / "heard" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="audio_channels"):
        AvatarPipeline.from_pretrained(tmp_path / "heard")
    with pytest.raises(EmoteError, match="already hears audio"):
        add_refiner_audio(heard, 4)
    with pytest.raises(EmoteError, match="no portrait refiner"):
        add_refiner_audio(AvatarPipeline.from_config("tiny", seed=0), 4)
    with pytest.raises(EmoteError, match="needs portrait_refiner_channels"):
        pipe.config.replace(portrait_refiner_channels=(), portrait_refiner_audio_channels=4).validate()


def test_checkpoint_directory_layout(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["components"]["backbone"] == "EmoBackbone"
    for component in ("vae", "reference_net", "backbone", "audio_encoder"):
        assert (tiny_model_dir / component / "config.json").is_file()
        assert (tiny_model_dir / component / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_model_dir / "scheduler" / "scheduler_config.json").is_file()
    assert not list(tiny_model_dir.parent.glob(".tiny*")), "no temporary directories left behind"


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_missing_weights_file_is_named(model_copy):
    (model_copy / "backbone" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"backbone/diffusion_pytorch_model\.safetensors is missing"):
        AvatarPipeline.from_pretrained(model_copy)


def test_missing_index_and_directory_are_named(model_copy, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        AvatarPipeline.from_pretrained(tmp_path / "nope")
    (model_copy / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        AvatarPipeline.from_pretrained(model_copy)


def test_mismatched_component_config_is_named(model_copy):
    path = model_copy / "backbone" / "config.json"
    config = json.loads(path.read_text())
    config["block_out_channels"] = [16, 48]
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"backbone/config\.json: block_out_channels"):
        AvatarPipeline.from_pretrained(model_copy)


def test_a_model_saved_before_a_config_key_existed_loads(model_copy):
    """A checkpoint written before `audio_locator_channels` existed has it in neither JSON: it loads as 0 (none)."""
    for path, section in ((model_copy / "model_index.json", "model"), (model_copy / "backbone" / "config.json", None)):
        data = json.loads(path.read_text())
        (data[section] if section else data).pop("audio_locator_channels")
        path.write_text(json.dumps(data))
    loaded = AvatarPipeline.from_pretrained(model_copy)
    assert loaded.config.audio_locator_channels == 0 and loaded.backbone.audio_locator is None


def test_weights_from_another_model_are_named(model_copy, tmp_path):
    bigger = AvatarPipeline.from_config(AvatarPipeline.from_pretrained(model_copy).config.replace(block_out_channels=(16, 48)))
    bigger.save_pretrained(tmp_path / "bigger")
    shutil.copy(tmp_path / "bigger" / "backbone" / "diffusion_pytorch_model.safetensors", model_copy / "backbone")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors does not match .*wrong shape"):
        AvatarPipeline.from_pretrained(model_copy)


def test_corrupt_weights_file_is_named(model_copy):
    (model_copy / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match=r"vae/diffusion_pytorch_model\.safetensors is unreadable"):
        AvatarPipeline.from_pretrained(model_copy)


def test_wav2vec2_model_saves_loads_and_renders(tmp_path, portrait):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from avatar.audio import Wav2Vec2AudioEncoder
    from avatar.config import get_preset

    w2v_config = Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    )
    cfg = get_preset("tiny").replace(audio_encoder="wav2vec2", wav2vec2_layers=(1, 2), audio_feature_dim=32)
    torch.manual_seed(0)
    components = AvatarPipeline._build_components(cfg.replace(audio_encoder="mel"))
    components["audio_encoder"] = Wav2Vec2AudioEncoder(Wav2Vec2Model(w2v_config).eval(), (1, 2))
    pipe = AvatarPipeline(cfg, **components)
    pipe.save_pretrained(tmp_path / "w2v-model")
    loaded = AvatarPipeline.from_pretrained(tmp_path / "w2v-model")
    assert isinstance(loaded.audio_encoder, Wav2Vec2AudioEncoder) and loaded.audio_encoder.layers == (1, 2)
    a, b = render(pipe, portrait, seconds=0.5, seed=2), render(loaded, portrait, seconds=0.5, seed=2)
    assert a.shape == (12, 32, 32, 3) and np.array_equal(a, b)


def test_wav2vec2_preset_gets_random_weights_only_when_asked(portrait):
    from avatar.audio import Wav2Vec2AudioEncoder
    from avatar.config import get_preset

    cfg = get_preset("tiny").replace(audio_encoder="wav2vec2", wav2vec2_layers=(1, 2), audio_feature_dim=32)
    with pytest.raises(EmoteError, match="needs the mel audio encoder"):
        AvatarPipeline.from_config(cfg)
    pipe = AvatarPipeline.from_config(cfg, random_wav2vec2=True)  # what `emote bench --preset sd15` times
    assert isinstance(pipe.audio_encoder, Wav2Vec2AudioEncoder) and pipe.audio_encoder.feature_dim == 32
    assert render(pipe, portrait, seconds=0.5, seed=2).shape == (12, 32, 32, 3)


def test_untrained_default_warns(monkeypatch, tmp_path):
    import avatar.pipeline as pipeline_module
    from avatar.pipeline import UntrainedModelWarning

    monkeypatch.setattr(pipeline_module, "BUNDLED_MODEL_DIR", tmp_path / "none")
    with pytest.warns(UntrainedModelWarning):
        pipe = AvatarPipeline.from_pretrained(None)
    assert pipe.config.preset == "default" and not pipe.trained


def test_cuda_request_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(EmoteError, match="no CUDA GPU"):
        AvatarPipeline.from_config("tiny", device="cuda")
