"""Pluggable latent autoencoders: diffusers AutoencoderTiny (TAESD layout) or AutoencoderKL.

Images are float tensors in [-1, 1], (N, 3, H, W). Latents are already scaled for the diffusion model.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.models.modeling_utils import ModelMixin

from .config import ModelConfig

VAE_CLASSES = {"tiny": AutoencoderTiny, "kl": AutoencoderKL}


def vae_kwargs(cfg: ModelConfig) -> dict:
    """The diffusers autoencoder config derived from a ModelConfig."""
    levels = len(cfg.vae_block_out_channels)
    if cfg.vae_type == "tiny":
        # DecoderTiny keeps one width through all levels, so the TAESD layout needs equal channel counts.
        if len(set(cfg.vae_block_out_channels)) != 1:
            raise ValueError("AutoencoderTiny needs equal vae_block_out_channels at every level")
        n = cfg.vae_blocks_per_level
        encoder_width = cfg.vae_encoder_channels or cfg.vae_block_out_channels[0]
        encoder_blocks = cfg.vae_encoder_blocks_per_level or n
        return dict(
            encoder_block_out_channels=(encoder_width,) * levels,
            decoder_block_out_channels=tuple(cfg.vae_block_out_channels),
            num_encoder_blocks=(1,) + (encoder_blocks,) * (levels - 1),
            num_decoder_blocks=(n,) * (levels - 1) + (1,),
            latent_channels=cfg.latent_channels,
        )
    return dict(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.vae_block_out_channels),
        layers_per_block=cfg.vae_blocks_per_level,
        latent_channels=cfg.latent_channels,
        sample_size=cfg.resolution,
    )


def build_vae(cfg: ModelConfig) -> ModelMixin:
    return VAE_CLASSES[cfg.vae_type](**vae_kwargs(cfg))


def encode(vae: ModelMixin, images: torch.Tensor) -> torch.Tensor:
    """Deterministic encoding (the posterior mean for KL), scaled for diffusion."""
    if isinstance(vae, AutoencoderTiny):
        return vae.encode(images).latents
    return vae.encode(images).latent_dist.mode() * vae.config.scaling_factor


def decode(vae: ModelMixin, latents: torch.Tensor) -> torch.Tensor:
    if isinstance(vae, AutoencoderTiny):
        return vae.decode(latents).sample.clamp(-1, 1)
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8 on the CPU."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def from_uint8(frames: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return frames.permute(0, 3, 1, 2).float() / 127.5 - 1
