"""`MotionBackbone`: a small transformer that denoises a window of facial motion frames from audio.

Tokens on the frame axis: M previous motion frames (clean, for continuity; a learned "missing" embedding at a
session's start) and F noisy frames; the condition (noise level + reference embedding) is added to every token.
Each noisy frame also gets its audio context (frames t-m..t+m, flattened and projected by an MLP that runs once per
window, not per step, or a learned null vector when the audio is dropped for guidance) and its speaking flag. The
network predicts the clean motion x0 in normalised units (flow matching with x_t = (1 - t) x0 + t noise; the
velocity follows from x0).
"""
from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * 1000.0 * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class MotionBackbone(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, motion_dim: int = 12, feature_dim: int = 164, context_frames: int = 2, reference_dim: int = 8,
                 width: int = 96, layers: int = 4, heads: int = 4, motion_frames: int = 4, max_frames: int = 16,
                 audio_hidden: int = 256, audio_depth: int = 2, guidance: float = 1.0, pose_leak: float = 0.0,
                 pose_cutoff_hz: float = 0.0, mouth_noise: float = 1.0):
        # Sampler settings (avatar.motion.generate.MotionGenerator), not used by the network: guidance, the
        # classifier-free guidance scale (1 for a distilled student, which has its teacher's guidance folded in);
        # pose_leak, how much of the carried head pose is pulled back toward rest per window; pose_cutoff_hz, the
        # natural frequency of the slow controller that holds the mean head pose at rest (0: off); mouth_noise, the
        # scale of the mouth fields' starting noise (1: as trained).
        super().__init__()
        context = 2 * context_frames + 1
        self.motion_in = nn.Linear(motion_dim, width)
        self.previous_in = nn.Linear(motion_dim, width)
        self.previous_missing = nn.Parameter(torch.zeros(width))
        audio_layers: list[nn.Module] = [nn.Linear(context * feature_dim, audio_hidden), nn.GELU()]
        for _ in range(audio_depth - 1):
            audio_layers += [nn.Linear(audio_hidden, audio_hidden), nn.GELU()]
        self.audio_in = nn.Sequential(*audio_layers, nn.Linear(audio_hidden, width))
        self.audio_null = nn.Parameter(torch.zeros(width))
        self.speaking = nn.Embedding(2, width)
        self.time_in = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.reference_in = nn.Linear(reference_dim, width)
        self.position = nn.Parameter(torch.randn(motion_frames + max_frames, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, motion_dim)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, audio: torch.Tensor, reference: torch.Tensor,
                previous: torch.Tensor | None, speaking: torch.Tensor,
                audio_keep: torch.Tensor | None = None, previous_keep: torch.Tensor | None = None) -> torch.Tensor:
        """noisy (B, F, D) normalised; t (B,) in [0, 1]; audio (B, F, 2m+1, FEATURE_DIM); reference (B, R);
        previous (B, M, D) normalised or None; speaking (B, F) bool; audio_keep / previous_keep (B,) bool masks
        (False drops that input for the sample). Returns the predicted clean motion x0 (B, F, D), normalised."""
        batch, frames, _ = noisy.shape
        motion_frames = self.config.motion_frames
        cond = self.time_in(timestep_embedding(t, self.config.width)) + self.reference_in(reference)
        sound = self.audio_in(audio.reshape(batch, frames, -1))
        if audio_keep is not None:
            sound = torch.where(audio_keep[:, None, None], sound, self.audio_null)
        x = self.motion_in(noisy) + sound + self.speaking(speaking.long())
        if previous is None:
            prev = self.previous_missing.expand(batch, motion_frames, -1)
        else:
            prev = self.previous_in(previous)
            if previous_keep is not None:
                prev = torch.where(previous_keep[:, None, None], prev, self.previous_missing)
        tokens = torch.cat([prev, x], dim=1)
        tokens = tokens + self.position[: tokens.shape[1]] + cond[:, None]
        hidden = self.blocks(tokens)
        return self.out(self.norm_out(hidden[:, motion_frames:]))
