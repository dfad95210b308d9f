"""Model presets: one serializable config is the single source of truth for every size in the model.

Component configs (UNet channels, VAE blocks, audio encoder) are all derived from a `ModelConfig`, and the
checkpoint's `model_index.json` stores it. Loading checks each component's own `config.json` against it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EmoteError

VIDEO_FPS = 25
AUDIO_SAMPLE_RATE = 16_000
SAMPLES_PER_FRAME = AUDIO_SAMPLE_RATE // VIDEO_FPS  # 640
WARM_STARTS = ("previous", "portrait")  # ModelConfig.warm_start
NOISES = ("independent", "shared")  # ModelConfig.noise


@dataclass(frozen=True)
class ModelConfig:
    preset: str
    resolution: int  # square output frames, pixels

    # Autoencoder: "tiny" = diffusers AutoencoderTiny (TAESD layout, our own small weights), "kl" = AutoencoderKL.
    vae_type: str = "tiny"
    vae_block_out_channels: tuple[int, ...] = (32, 32, 32, 32)  # len - 1 = number of 2x downsamplings
    vae_blocks_per_level: int = 1
    latent_channels: int = 4
    # AutoencoderTiny only: a wider/deeper encoder than the decoder (0 = the decoder's). The encoder runs once per
    # portrait when serving (motion frames stay latents), the decoder once per frame, so width costs only in training.
    vae_encoder_channels: int = 0
    vae_encoder_blocks_per_level: int = 0
    # A PortraitRefiner (avatar/refiner.py) sharpens every decoded frame with the portrait's own pixels; its widths
    # from full resolution down to the latent's, one per VAE level (empty: none). The latents and the autoencoder are
    # unchanged by it, and the stages other than refiner and warm-refiner train on the autoencoder's frames alone.
    portrait_refiner_channels: tuple[int, ...] = ()
    # The refiner's audio path (channels; 0: none): it then hears each frame's audio context as well.
    portrait_refiner_audio_channels: int = 0

    # Denoising backbone and ReferenceNet share this layout.
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_levels: tuple[bool, ...] = (True, True)
    attention_heads: int = 2  # per spatial attention layer, at every level (SD1.5 uses 8)
    norm_num_groups: int = 8
    temporal_heads: int = 2

    # Audio: "mel" = causal log-mel encoder trained from scratch, "wav2vec2" = transformers Wav2Vec2Model.
    audio_encoder: str = "mel"
    audio_feature_dim: int = 64
    audio_context_frames: int = 2  # EMO's m=2: each frame attends to audio of frames t-2..t+2
    audio_cross_attention_dim: int = 64
    mel_bins: int = 40
    mel_hidden_channels: int = 64
    mel_layers: int = 3
    mel_lookahead: int = 2  # mel hops (10 ms each) of future audio each video frame may see
    wav2vec2_layers: tuple[int, ...] = ()  # hidden-state indices concatenated per frame
    # Audio locator (0 = none): the frame's audio features, embedded to this many channels, painted into the lip
    # region of the face box and added at the full latent resolution, where the mouth is drawn (avatar/unet.py).
    audio_locator_channels: int = 0

    # Speed layers: head-rotation speed (deg/frame) -> tanh buckets, windowed, MLP, cross-attended by temporal layers.
    speed_bucket_centers: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
    speed_bucket_radius: float = 0.5
    speed_context_frames: int = 2
    speed_embed_dim: int = 32
    default_speed: float = 0.5

    # Sliding windows.
    frames_per_window: int = 8
    motion_frames: int = 2

    # Diffusion.
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    sampler: str = "lcm"  # "lcm" for the distilled student, "ddim" for the teacher
    default_steps: int = 2
    # The fewest steps whose output is still usable (a short distillation can leave 1 step as noise); the streaming
    # engine's behind-schedule policy holds frames rather than go below it.
    min_steps: int = 1
    # Warm start (diffusers' img2img strength): each window starts from its previous frame's latent (the reference's
    # for a clip's first window) noised to this fraction of the schedule, instead of from pure noise (1.0). The
    # previous frame already holds the identity, so a few steps only have to redraw what moves.
    strength: float = 1.0
    # What a warm start noises: "previous", the newest frame before the window (the portrait for a clip's first
    # window), or "portrait", the portrait for every window, which anchors each window to the identity (no drift)
    # while the motion frames carry the continuity.
    warm_start: str = "previous"
    # The noise a window's first step starts from: "independent", drawn for every frame of every window, or "shared",
    # one noise image for every frame of a session (drawn from its first window's seed), so that what changes from
    # frame to frame is what the audio and the motion frames change (docs/model.md: it took the shipped student's
    # flicker from 2.6 to 0.8). Later steps' re-noising comes from the same seed, so with shared noise it is the same
    # for every window too (it still differs between a window's frames).
    noise: str = "independent"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    @property
    def audio_tokens_per_frame(self) -> int:
        return 2 * self.audio_context_frames + 1

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "ModelConfig":
        problems = []
        if self.resolution % self.vae_scale_factor:
            problems.append(f"resolution {self.resolution} is not a multiple of the VAE factor {self.vae_scale_factor}")
        levels = len(self.block_out_channels)
        if len(self.attention_levels) != levels:
            problems.append("attention_levels must have one entry per block_out_channels level")
        if self.latent_size % (2 ** (levels - 1)):
            problems.append(f"latent size {self.latent_size} cannot be halved {levels - 1} times")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups or ch % self.attention_heads or ch % self.temporal_heads:
                problems.append(f"channel count {ch} must divide by norm groups and head counts")
        if self.vae_type not in ("tiny", "kl"):
            problems.append(f"unknown vae_type {self.vae_type!r}")
        if self.vae_encoder_channels < 0 or self.vae_encoder_blocks_per_level < 0:
            problems.append("vae_encoder_channels and vae_encoder_blocks_per_level must be >= 0 (0 = the decoder's)")
        elif self.vae_type != "tiny" and (self.vae_encoder_channels or self.vae_encoder_blocks_per_level):
            problems.append("vae_encoder_channels and vae_encoder_blocks_per_level apply to the tiny autoencoder only")
        if self.portrait_refiner_channels and (
            len(self.portrait_refiner_channels) != len(self.vae_block_out_channels)
            or min(self.portrait_refiner_channels) < 1
        ):
            problems.append("portrait_refiner_channels needs one positive width per VAE level, or none")
        if self.portrait_refiner_audio_channels < 0 or (
            self.portrait_refiner_audio_channels and not self.portrait_refiner_channels
        ):
            problems.append("portrait_refiner_audio_channels must be >= 0, and needs portrait_refiner_channels")
        if self.audio_encoder not in ("mel", "wav2vec2"):
            problems.append(f"unknown audio_encoder {self.audio_encoder!r}")
        if self.sampler not in ("lcm", "ddim"):
            problems.append(f"unknown sampler {self.sampler!r}")
        if self.frames_per_window < 1 or self.motion_frames < 1:
            problems.append("frames_per_window and motion_frames must be at least 1")
        if not 1 <= self.min_steps <= self.default_steps:
            problems.append("need 1 <= min_steps <= default_steps")
        if not 0 < self.strength <= 1:
            problems.append(f"strength must be in (0, 1], got {self.strength}")
        if not 0 <= self.audio_locator_channels <= 1024:
            problems.append(f"audio_locator_channels must be in 0-1024, got {self.audio_locator_channels}")
        if self.warm_start not in WARM_STARTS:
            problems.append(f"warm_start must be one of {', '.join(WARM_STARTS)}, got {self.warm_start!r}")
        if self.noise not in NOISES:
            problems.append(f"noise must be one of {', '.join(NOISES)}, got {self.noise!r}")
        if problems:
            raise EmoteError(f"invalid model config ({self.preset}): " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise EmoteError(f"unknown model config keys: {', '.join(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        try:
            return cls(**values).validate()
        except TypeError as exc:  # a value of the wrong type, e.g. a string where a number belongs
            raise EmoteError(f"invalid model config: {exc}") from None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


PRESETS: dict[str, ModelConfig] = {
    # Unit tests: well under 1M parameters, milliseconds per window on a CPU.
    "tiny": ModelConfig(
        preset="tiny",
        resolution=32,
        vae_block_out_channels=(8, 8, 8),
        block_out_channels=(16, 32),
        attention_levels=(False, True),
        attention_heads=2,
        norm_num_groups=4,
        temporal_heads=2,
        audio_feature_dim=16,
        audio_cross_attention_dim=16,
        mel_bins=20,
        mel_hidden_channels=16,
        mel_layers=2,
        speed_bucket_centers=(0.0, 0.5, 1.0, 2.0),
        speed_embed_dim=8,
        frames_per_window=4,
        motion_frames=2,
    ),
    # The shipped CPU model: sized with `emote bench` to run in real time on a 2-core CPU at 128x128.
    "default": ModelConfig(
        preset="default",
        resolution=128,
        vae_block_out_channels=(12, 12, 12, 12),
        block_out_channels=(64, 96, 128),
        attention_levels=(False, True, True),
        attention_heads=4,
        norm_num_groups=16,
        temporal_heads=4,
        audio_feature_dim=96,
        audio_cross_attention_dim=96,
        mel_bins=40,
        mel_hidden_channels=96,
        mel_layers=4,
        audio_locator_channels=32,
        # 3-frame windows (120 ms of audio) keep the streaming audio-to-lip latency under 300 ms on a 2-core CPU
        # (measured: docs/benchmarks.md); training uses the same window, so served and trained windows match.
        frames_per_window=3,
        motion_frames=2,
    ),
    # Stable-Diffusion-1.5-sized backbone at 512x512 with an 8x KL VAE, for GPUs and checkpoints trained elsewhere.
    "sd15": ModelConfig(
        preset="sd15",
        resolution=512,
        vae_type="kl",
        vae_block_out_channels=(128, 256, 512, 512),
        vae_blocks_per_level=2,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_levels=(True, True, True, False),
        attention_heads=8,
        norm_num_groups=32,
        temporal_heads=8,
        audio_encoder="wav2vec2",
        audio_feature_dim=768 * 5,
        audio_cross_attention_dim=768,
        wav2vec2_layers=(4, 6, 8, 10, 12),
        speed_embed_dim=128,
        frames_per_window=12,
        motion_frames=4,
        sampler="lcm",
        default_steps=2,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name].validate()
    except KeyError:
        raise EmoteError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})") from None

