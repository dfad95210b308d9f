"""Attention paths of the EMO backbone, as diffusers attention processors and small transformer modules.

- `SharedContextAttnProcessor`: attention whose extra keys/values come from a context shared by a group of query
  rows. Spatial self-attention uses it to append the ReferenceNet bank (one portrait, many frames); the temporal
  layers use it to attend to the speed embedding (one speed sequence, many pixels). Keys/values of the shared context
  are projected once per group instead of once per row.
- `SpatialTransformer`: self-attention extended by the reference bank, then audio cross-attention, then MLP.
- `TemporalTransformer`: AnimateDiff-style self-attention across frames (motion frames prepended), then speed
  cross-attention, then MLP.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn


class SharedContextAttnProcessor:
    """Scaled-dot-product attention with keys/values `[own tokens (optional), shared context]`.

    `context` has shape (G, N, C) and is shared by consecutive groups of `hidden_states` rows: row i uses context
    row i // (rows / G). With `include_self=False` it is plain cross-attention to the shared context.
    """

    def __init__(self, include_self: bool = True):
        self.include_self = include_self

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rows, length, _ = hidden_states.shape
        heads = attn.heads
        query = attn.to_q(hidden_states)
        head_dim = query.shape[-1] // heads

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], -1, heads, head_dim).transpose(1, 2)

        keys, values = [], []
        if self.include_self or context is None:
            keys.append(split_heads(attn.to_k(hidden_states)))
            values.append(split_heads(attn.to_v(hidden_states)))
        if context is not None:
            groups = context.shape[0]
            if rows % groups:
                raise ValueError(f"{rows} query rows cannot be split into {groups} context groups")
            per_group = rows // groups
            ctx_k = split_heads(attn.to_k(context))
            ctx_v = split_heads(attn.to_v(context))
            keys.append(ctx_k.repeat_interleave(per_group, dim=0))
            values.append(ctx_v.repeat_interleave(per_group, dim=0))
        key = keys[0] if len(keys) == 1 else torch.cat(keys, dim=2)
        value = values[0] if len(values) == 1 else torch.cat(values, dim=2)

        out = F.scaled_dot_product_attention(split_heads(query), key, value)
        out = out.transpose(1, 2).reshape(rows, length, heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out))


def _zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class SpatialTransformer(nn.Module):
    """Per-frame transformer over pixels: reference-extended self-attention, audio cross-attention, MLP.

    The ReferenceNet builds it with `audio_dim=None` and reads `norm1` outputs into its bank; the backbone appends
    that bank to its own keys/values.
    """

    def __init__(self, channels: int, heads: int, norm_groups: int, audio_dim: int | None):
        super().__init__()
        self.norm_in = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.attn1 = Attention(channels, heads=heads, dim_head=channels // heads, processor=SharedContextAttnProcessor())
        self.norm2 = nn.LayerNorm(channels) if audio_dim else None
        self.attn2 = (
            Attention(channels, cross_attention_dim=audio_dim, heads=heads, dim_head=channels // heads)
            if audio_dim
            else None
        )
        self.norm3 = nn.LayerNorm(channels)
        self.ff = FeedForward(channels, mult=2, activation_fn="geglu")
        self.proj_out = _zero_module(nn.Linear(channels, channels))

    def forward(
        self,
        hidden: torch.Tensor,
        reference: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        bank_out: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """hidden (B, C, H, W); reference (G, N, C) shared by B/G frames each; audio (B, T, D) tokens per frame."""
        b, c, h, w = hidden.shape
        x = self.proj_in(self.norm_in(hidden).flatten(2).transpose(1, 2))
        normed = self.norm1(x)
        if bank_out is not None:
            bank_out.append(normed)
        x = x + self.attn1(normed, context=reference)
        if self.attn2 is not None and audio is not None:
            x = x + self.attn2(self.norm2(x), encoder_hidden_states=audio)
        x = x + self.ff(self.norm3(x))
        x = self.proj_out(x)
        return hidden + x.transpose(1, 2).reshape(b, c, h, w)


def sinusoidal_positions(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freqs = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10_000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * freqs)
    table[:, 1::2] = torch.cos(position * freqs[: dim // 2])
    return table.to(dtype)


class TemporalTransformer(nn.Module):
    """Self-attention across frames at each pixel, with motion-frame features prepended on the frame axis, then
    cross-attention to the speed embedding of the window. Zero-initialised output, so a new layer starts as identity.
    """

    def __init__(self, channels: int, heads: int, norm_groups: int, speed_dim: int):
        super().__init__()
        self.norm_in = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.attn1 = Attention(channels, heads=heads, dim_head=channels // heads)
        self.norm_speed = nn.LayerNorm(channels)
        self.speed_attn = Attention(
            channels,
            cross_attention_dim=speed_dim,
            heads=heads,
            dim_head=channels // heads,
            processor=SharedContextAttnProcessor(include_self=False),
        )
        self.norm3 = nn.LayerNorm(channels)
        self.ff = FeedForward(channels, mult=2, activation_fn="geglu")
        self.proj_out = _zero_module(nn.Linear(channels, channels))

    def _tokens(self, hidden: torch.Tensor, batch: int) -> torch.Tensor:
        """(B*F, C, H, W) -> (B*H*W, F, C)."""
        bf, c, h, w = hidden.shape
        x = self.proj_in(self.norm_in(hidden).flatten(2).transpose(1, 2))  # (B*F, HW, C)
        return x.view(batch, bf // batch, h * w, c).permute(0, 2, 1, 3).reshape(batch * h * w, bf // batch, c)

    def forward(
        self,
        hidden: torch.Tensor,
        num_frames: int,
        motion: torch.Tensor | None = None,
        speed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden (B*F, C, H, W); motion (B*M, C, H, W) from the ReferenceNet; speed (B, F, S) embeddings."""
        bf, c, h, w = hidden.shape
        batch = bf // num_frames
        x = self._tokens(hidden, batch)
        if motion is not None:
            x = torch.cat([self._tokens(motion, batch), x], dim=1)
        length = x.shape[1]
        x = x + sinusoidal_positions(length, c, x.device, x.dtype)
        x = x + self.attn1(self.norm1(x))
        x = x[:, length - num_frames :]
        if speed is not None:
            x = x + self.speed_attn(self.norm_speed(x), context=speed)
        x = x + self.ff(self.norm3(x))
        x = self.proj_out(x)
        x = x.view(batch, h * w, num_frames, c).permute(0, 2, 3, 1).reshape(bf, c, h, w)
        return hidden + x
