"""PortraitRefiner: the autoencoder's decoded frame, sharpened with the portrait's own pixels.

The autoencoder redraws the whole face from a 4-channel latent at 1/8 of the resolution, so what the latent does not
hold (glasses, hair, the lips' exact colour) comes out blurred, and worst on faces unlike the training identities.
Every frame of a session shows the same person, so the refiner reads the portrait as well: an encoder pyramid over
the portrait and its own trip through the autoencoder (their difference is what the autoencoder loses on this face),
computed once per avatar and kept in the `ReferenceCache`, joins a small U-Net decoder at every resolution; the
frame's latent and the portrait's enter at the latent level, the decoded frame at full resolution. Its output is a
correction added to the decoded frame, from a zero-initialised last layer, so a new refiner starts as the
autoencoder's decoder exactly. (Decoding from the latent and the portrait alone, without the decoded frame, learned
to copy the portrait's mouth: lip sync fell to zero, docs/training.md.) It learns on the autoencoder's latents as
they are (`emote train --stage refiner`): the latent space, and with it the backbone, stays as it is.

With `audio_channels` > 0 it also hears each frame's audio (the features the backbone attends to: the frame and its
+-context neighbours), painted into the lip region of the portrait's face box at the two coarsest decoder levels, as
the backbone's AudioLocator paints it into the latent. A mouth's opening barely moves the 4-channel latent
(docs/training.md), so whatever the latent drops of it the backbone cannot pass on; in pixels the refiner can draw it
from the audio directly, as Wav2Lip's decoder does. The painted audio enters through zero-initialised convolutions,
so an audio path grown onto a trained refiner starts as that refiner exactly (`grow.add_refiner_audio`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .config import ModelConfig
from .unet import lip_region_maps


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


def _level(in_channels: int, channels: int, stride: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1), nn.ReLU(),
                         *[ResidualBlock(channels) for _ in range(blocks)])


class PortraitRefiner(ModelMixin, ConfigMixin):
    """block_out_channels: one width per level, from full resolution down to the latent's (len - 1 = the
    autoencoder's number of 2x downsamplings)."""

    AUDIO_LEVELS = 2  # the coarsest levels, where a level's 3x3 convolutions span the whole mouth

    @register_to_config
    def __init__(self, latent_channels: int = 4, block_out_channels: tuple[int, ...] = (16, 24, 32, 32),
                 image_channels: int = 3, audio_channels: int = 0, audio_dim: int = 0):
        super().__init__()
        widths = list(block_out_channels)
        if audio_channels and audio_dim < 1:
            raise ValueError("an audio path needs audio_dim, the size of a frame's flattened audio context")
        self.portrait_levels = nn.ModuleList(
            _level(2 * image_channels if i == 0 else widths[i - 1], w, 1 if i == 0 else 2, 1)
            for i, w in enumerate(widths)
        )
        coarsest = len(widths) - 1

        self.audio_levels = [i for i in range(len(widths)) if audio_channels and coarsest - i < self.AUDIO_LEVELS]

        def decoder_inputs(i: int) -> int:
            if i == coarsest:
                return 2 * latent_channels + widths[i]
            return widths[i + 1] + widths[i] + (image_channels if i == 0 else 0)

        self.decoder_levels = nn.ModuleList(
            _level(decoder_inputs(i), w, 1, 2 if i == coarsest else 1) for i, w in enumerate(widths)
        )
        self.audio_embed = None
        self.audio_inputs = nn.ModuleDict()
        if audio_channels:
            self.audio_embed = nn.Sequential(nn.Linear(audio_dim, audio_channels), nn.SiLU(),
                                             nn.Linear(audio_channels, audio_channels))
            for i in self.audio_levels:  # the painted audio and the lip region's maps, added to the level's first conv
                conv = nn.Conv2d(audio_channels + 3, widths[i], 3, padding=1)
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
                self.audio_inputs[str(i)] = conv
        self.conv_out = nn.Conv2d(widths[0], image_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def portrait_features(self, portrait: torch.Tensor, portrait_decoded: torch.Tensor) -> list[torch.Tensor]:
        """(1, 3, H, W) portrait and its autoencoder reconstruction, in [-1, 1] -> the pyramid, full resolution
        first; computed once per avatar."""
        features, x = [], torch.cat([portrait, portrait_decoded.to(portrait.dtype)], 1)
        for level in self.portrait_levels:
            x = level(x)
            features.append(x)
        return features

    @property
    def hears_audio(self) -> bool:
        return self.audio_embed is not None

    def audio_parameters(self) -> list[nn.Parameter]:
        """The audio path's weights (none without one)."""
        return [] if self.audio_embed is None else [*self.audio_embed.parameters(), *self.audio_inputs.parameters()]

    def forward(self, latents: torch.Tensor, decoded: torch.Tensor, portrait_latent: torch.Tensor,
                portrait_features: list[torch.Tensor], audio: torch.Tensor | None = None,
                face_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C, h, w) latents and (N, 3, H, W) their autoencoder decoding -> the refined frames (unclamped).
        The portrait's latent and features have batch N, or 1 for one portrait behind every frame. A refiner that
        hears audio needs each frame's audio context (N, tokens, D) and the portrait's face mask (N or 1, 1, R, R)."""
        n = latents.shape[0]
        if self.hears_audio and (audio is None or face_mask is None):
            raise ValueError("this refiner hears each frame's audio: pass it and the portrait's face mask")

        def batch(t: torch.Tensor) -> torch.Tensor:
            return t.expand(n, *t.shape[1:]) if t.shape[0] == 1 else t

        if self.hears_audio:
            embedding = self.audio_embed(audio.flatten(1).to(latents.dtype))[..., None, None]  # (N, A, 1, 1)
        x = torch.cat([latents, batch(portrait_latent).to(latents.dtype)], 1)
        for i in reversed(range(len(self.decoder_levels))):
            inputs = [x, batch(portrait_features[i]).to(x.dtype)]
            if i < len(self.decoder_levels) - 1:
                inputs[0] = F.interpolate(x, scale_factor=2, mode="nearest")
            if i == 0:
                inputs.append(decoded.to(x.dtype))
            level = self.decoder_levels[i]
            x = level[0](torch.cat(inputs, 1))
            if str(i) in self.audio_inputs:
                region = batch(lip_region_maps(face_mask.float(), x.shape[-1]).to(x.dtype))  # (N, 3, s, s)
                x = x + self.audio_inputs[str(i)](torch.cat([embedding * region[:, :1], region], 1))
            x = level[1:](x)
        return decoded + self.conv_out(x).to(decoded.dtype)


def portrait_refiner_kwargs(cfg: ModelConfig) -> dict:
    kwargs = dict(latent_channels=cfg.latent_channels, block_out_channels=tuple(cfg.portrait_refiner_channels),
                  audio_channels=cfg.portrait_refiner_audio_channels)
    if cfg.portrait_refiner_audio_channels:  # (a refiner saved before the option has no audio_dim; its default, 0)
        kwargs["audio_dim"] = cfg.audio_tokens_per_frame * cfg.audio_feature_dim
    return kwargs


def build_portrait_refiner(cfg: ModelConfig) -> PortraitRefiner | None:
    """The config's PortraitRefiner (random weights, starting as the identity), or None if the model has none."""
    return PortraitRefiner(**portrait_refiner_kwargs(cfg)) if cfg.portrait_refiner_channels else None
