"""Shapes and behaviour of each model component, tiny preset."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar.audio import MelAudioEncoder, mel_encoder_kwargs, window_features
from avatar.config import PRESETS, SAMPLES_PER_FRAME, ModelConfig, get_preset
from avatar.errors import EmoteError
from avatar.pipeline import WindowInput
from avatar.unet import BackboneConditions


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tiny_preset_is_well_under_a_million_parameters(tiny_pipe):
    total = sum(count(m) for m in (tiny_pipe.vae, tiny_pipe.reference_net, tiny_pipe.backbone, tiny_pipe.audio_encoder))
    assert total < 1_000_000


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_round_trip_through_json(name):
    cfg = get_preset(name)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.resolution % cfg.vae_scale_factor == 0


def test_invalid_config_names_the_problem():
    with pytest.raises(EmoteError, match="multiple of the VAE factor"):
        get_preset("tiny").replace(resolution=30).validate()
    with pytest.raises(EmoteError, match="min_steps"):
        get_preset("tiny").replace(min_steps=3).validate()  # above default_steps
    with pytest.raises(EmoteError, match="unknown model config keys: bogus"):
        ModelConfig.from_dict({**get_preset("tiny").to_dict(), "bogus": 1})


def test_vae_round_trip_shapes(tiny_pipe):
    from avatar import vae

    cfg = tiny_pipe.config
    images = torch.rand(3, 3, cfg.resolution, cfg.resolution) * 2 - 1
    latents = vae.encode(tiny_pipe.vae, images)
    assert latents.shape == (3, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    decoded = vae.decode(tiny_pipe.vae, latents)
    assert decoded.shape == images.shape
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_wider_encoder_than_decoder_saves_and_loads(tmp_path, portrait):
    """vae_encoder_channels / vae_encoder_blocks_per_level widen only the encoder; the latent space's shape and the
    decoder stay, and the model directory round-trips."""
    from avatar.pipeline import AvatarPipeline

    cfg = get_preset("tiny").replace(vae_encoder_channels=24, vae_encoder_blocks_per_level=2)
    pipe = AvatarPipeline.from_config(cfg, seed=0)
    narrow = AvatarPipeline.from_config("tiny", seed=0)
    assert pipe.vae.config.encoder_block_out_channels == (24, 24, 24)
    assert pipe.vae.config.num_encoder_blocks == (1, 2, 2)
    assert count(pipe.vae.encoder) > 4 * count(narrow.vae.encoder)
    assert count(pipe.vae.decoder) == count(narrow.vae.decoder)
    pipe.save_pretrained(tmp_path / "wide")
    loaded = AvatarPipeline.from_pretrained(tmp_path / "wide")
    assert loaded.config == cfg
    assert all(torch.equal(a, b) for a, b in zip(loaded.vae.state_dict().values(), pipe.vae.state_dict().values()))
    assert len(list(loaded.render(portrait, np.zeros(SAMPLES_PER_FRAME * 4, np.float32)))) == 4


def test_encoder_width_is_checked():
    with pytest.raises(EmoteError, match="tiny autoencoder only"):
        get_preset("sd15").replace(vae_encoder_channels=64).validate()
    with pytest.raises(EmoteError, match=">= 0"):
        get_preset("tiny").replace(vae_encoder_blocks_per_level=-1).validate()


def test_reference_net_records_bank_and_slot_outputs(tiny_pipe, portrait):
    cache = tiny_pipe.prepare_reference(portrait)
    cfg = tiny_pipe.config
    slots = len(cache.motion)
    levels = len(cfg.block_out_channels)
    assert slots == levels * cfg.layers_per_block + 1 + levels * (cfg.layers_per_block + 1)
    assert len(cache.bank) == slots
    # The first (highest-resolution) level of the tiny preset has no spatial attention, the second has.
    assert cache.bank[0] is None and cache.bank[1] is not None
    assert cache.bank[1].shape == (1, (cfg.latent_size // 2) ** 2, cfg.block_out_channels[1])
    assert cache.motion[0].shape == (1, cfg.block_out_channels[0], cfg.latent_size, cfg.latent_size)


def test_backbone_output_shape_and_zero_init_temporal_layers(tiny_pipe, portrait):
    cfg = tiny_pipe.config
    cache = tiny_pipe.prepare_reference(portrait)
    b, f = 2, cfg.frames_per_window
    noisy = torch.randn(b, f, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    cond = BackboneConditions(
        reference_bank=[None if t is None else t.expand(b, -1, -1) for t in cache.bank],
        motion=[t.expand(b * cfg.motion_frames, -1, -1, -1) for t in cache.motion],
        audio=torch.randn(b, f, cfg.audio_tokens_per_frame, cfg.audio_feature_dim),
        speed=torch.rand(b, f),
        face_mask=cache.face_mask.expand(b, -1, -1, -1),
    )
    out = tiny_pipe.backbone(noisy, torch.tensor(500), cond)
    assert out.shape == noisy.shape
    assert torch.isfinite(out).all()


def test_reference_bank_changes_the_output(tiny_pipe, portrait):
    """The bank is attended: dropping it (as classifier-free guidance does) changes the prediction."""
    cfg = tiny_pipe.config
    cache = tiny_pipe.prepare_reference(portrait)
    for module in tiny_pipe.backbone.modules():  # zero-initialised output projections would hide the path
        if isinstance(module, torch.nn.Linear) and module.weight.abs().sum() == 0:
            torch.nn.init.normal_(module.weight, std=0.02)
    try:
        noisy = torch.randn(1, cfg.frames_per_window, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        cond = BackboneConditions(cache.bank, None, torch.randn(1, cfg.frames_per_window, 5, cfg.audio_feature_dim),
                                  torch.zeros(1, cfg.frames_per_window), cache.face_mask)
        with_ref = tiny_pipe.backbone(noisy, torch.tensor(10), cond)
        cond.reference_bank = None
        without = tiny_pipe.backbone(noisy, torch.tensor(10), cond)
        assert not torch.allclose(with_ref, without)
    finally:
        fresh = type(tiny_pipe).from_config("tiny", seed=0)
        tiny_pipe.backbone.load_state_dict(fresh.backbone.state_dict())


def test_speed_and_audio_parameter_groups_cover_every_parameter(tiny_pipe):
    groups = tiny_pipe.backbone.parameter_groups()
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(tiny_pipe.backbone.parameters()))
    assert all(groups.values())
    names = {id(p): n for n, p in tiny_pipe.backbone.named_parameters()}
    audio = [names[id(p)] for p in groups["audio"]]
    temporal = [names[id(p)] for p in groups["temporal"]]
    assert all(".spatial.attn2." in n or ".spatial.norm2." in n or n.startswith("audio_projection.") for n in audio)
    assert all(".temporal." in n for n in temporal)
    assert not any(".resnet." in n for n in audio + temporal), "ResNet norms are spatial layers"


def test_mel_encoder_is_causal_within_its_lookahead():
    cfg = get_preset("tiny")
    enc = MelAudioEncoder(**mel_encoder_kwargs(cfg)).eval()
    wave = torch.randn(1, SAMPLES_PER_FRAME * 20) * 0.1
    changed = wave.clone()
    changed[:, SAMPLES_PER_FRAME * 12 :] = torch.randn(1, SAMPLES_PER_FRAME * 8)
    with torch.no_grad():
        a, b = enc.encode(wave), enc.encode(changed)
    assert a.shape == (1, 20, cfg.audio_feature_dim)
    # Frames ending at least `lookahead` before the change are untouched; the frame whose lookahead sees it is not.
    last_safe = (SAMPLES_PER_FRAME * 12 - enc.lookahead_samples) // SAMPLES_PER_FRAME
    assert torch.equal(a[:, :last_safe], b[:, :last_safe])
    assert not torch.allclose(a[:, 11], b[:, 11])


def test_audio_windows_hold_plus_minus_two_frames():
    features = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1)
    windows = window_features(features, 2)[0, :, :, 0]
    assert windows.shape == (6, 5)
    assert windows[3].tolist() == [1, 2, 3, 4, 5]
    assert windows[0].tolist() == [0, 0, 0, 1, 2]  # edges repeat


def test_wav2vec2_encoder_from_local_directory(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from avatar.audio import Wav2Vec2AudioEncoder

    config = Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        conv_dim=(16, 16, 16, 16, 16, 16, 16), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        do_stable_layer_norm=True, feat_extract_norm="layer",
    )
    torch.manual_seed(0)
    Wav2Vec2Model(config).save_pretrained(tmp_path / "w2v")
    enc = Wav2Vec2AudioEncoder.from_pretrained(tmp_path / "w2v", layers=(1, 2))
    assert enc.feature_dim == 32
    wave = torch.randn(1, SAMPLES_PER_FRAME * 30) * 0.1
    with torch.no_grad():
        features = enc.encode(wave)
    assert features.shape == (1, 30, 32)
    # Chunked encoding (for long audio) keeps the frame count and stays close to one-shot encoding.
    enc.chunk, enc.context = SAMPLES_PER_FRAME * 10, SAMPLES_PER_FRAME * 5
    with torch.no_grad():
        chunked = enc.encode(wave)
    assert chunked.shape == features.shape
    assert torch.isfinite(chunked).all()


def test_window_batch_must_share_frame_count(tiny_pipe, portrait):
    cache = tiny_pipe.prepare_reference(portrait)
    cfg = tiny_pipe.config
    a = WindowInput(cache, torch.zeros(4, 5, cfg.audio_feature_dim), torch.zeros(4), None, 0)
    b = WindowInput(cache, torch.zeros(3, 5, cfg.audio_feature_dim), torch.zeros(3), None, 0)
    with pytest.raises(ValueError, match="same number of frames"):
        tiny_pipe.denoise_windows([a, b])


def test_sd15_preset_shapes_on_the_meta_device():
    """The SD1.5-sized preset, built without allocating memory: parameter counts and shapes through every part."""
    from avatar.unet import EmoBackbone, ReferenceNet, backbone_kwargs, reference_net_kwargs
    from avatar.vae import build_vae

    cfg = get_preset("sd15")
    with torch.device("meta"):
        backbone, reference_net, vae = EmoBackbone(**backbone_kwargs(cfg)), ReferenceNet(**reference_net_kwargs(cfg)), build_vae(cfg)
        assert 80e6 < count(vae) < 90e6  # SD's KL VAE is 83.7M
        assert 700e6 < count(reference_net) < count(backbone)
        images = torch.empty(1, 3, 512, 512)
        latent = vae.encode(images).latent_dist.mode()
        assert latent.shape == (1, 4, 64, 64)
        features = reference_net(latent)
        f, m = cfg.frames_per_window, cfg.motion_frames
        cond = BackboneConditions(
            reference_bank=features.bank,
            motion=[t.expand(m, -1, -1, -1) for t in features.outputs],
            audio=torch.empty(1, f, cfg.audio_tokens_per_frame, cfg.audio_feature_dim),
            speed=torch.zeros(1, f),
            face_mask=torch.empty(1, 1, 512, 512),
        )
        out = backbone(torch.empty(1, f, 4, 64, 64), torch.tensor(10), cond)
        assert out.shape == (1, f, 4, 64, 64)
        assert vae.decode(out[0]).sample.shape == (f, 3, 512, 512)
