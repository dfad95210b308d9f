"""Model growth: add layers to a trained model so that training continues from it instead of from scratch.

Spatial attention (ReferenceNet self-attention into the backbone, audio cross-attention) can be added at UNet levels
that have none: a new SpatialTransformer's output projection is zero-initialised and sits on a residual, so the grown
model computes exactly what the trained one did until training moves it. So can the backbone's audio locator
(`ModelConfig.audio_locator_channels`), whose output convolution is zero-initialised, and a PortraitRefiner
(`ModelConfig.portrait_refiner_channels`), whose correction starts at zero (the `refiner` stage adds one), and the
refiner's audio path (`ModelConfig.portrait_refiner_audio_channels`), whose input convolutions start at zero.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .errors import EmoteError
from .pipeline import AvatarPipeline
from .refiner import build_portrait_refiner
from .unet import EmoBackbone, ReferenceNet, backbone_kwargs, reference_net_kwargs


def grow_attention(pipe: AvatarPipeline, levels: Iterable[int], seed: int = 0) -> AvatarPipeline:
    """`pipe` with spatial attention added at UNet `levels` (0 = the full latent resolution) of both the ReferenceNet
    and the backbone; the new blocks' weights come from `seed`, everything else from `pipe`."""
    attention = list(pipe.config.attention_levels)
    for level in sorted(set(levels)):
        if not 0 <= level < len(attention):
            raise EmoteError(f"cannot grow attention at level {level}: the model has levels 0-{len(attention) - 1}")
        if attention[level]:
            raise EmoteError(f"level {level} already has spatial attention")
        attention[level] = True
    return _grown(pipe, pipe.config.replace(attention_levels=tuple(attention)), seed, ".spatial.")


def grow_audio_locator(pipe: AvatarPipeline, channels: int, seed: int = 0) -> AvatarPipeline:
    """`pipe` with an audio locator of `channels` channels added to its backbone (new weights from `seed`)."""
    if pipe.config.audio_locator_channels:
        raise EmoteError(f"the model already has an audio locator ({pipe.config.audio_locator_channels} channels)")
    if channels < 1:
        raise EmoteError(f"an audio locator needs at least 1 channel, got {channels}")
    return _grown(pipe, pipe.config.replace(audio_locator_channels=channels), seed, "audio_locator.")


def _grown(pipe: AvatarPipeline, cfg, seed: int, new_names: str) -> AvatarPipeline:
    """`pipe` rebuilt to `cfg`, every trained weight kept; the only new weights are those whose names contain
    `new_names`, drawn from `seed`. The ReferenceNet is rebuilt only if `cfg` changes its layout."""
    cfg = cfg.validate()
    grow_reference = reference_net_kwargs(cfg) != reference_net_kwargs(pipe.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reference_net = ReferenceNet(**reference_net_kwargs(cfg)) if grow_reference else pipe.reference_net
        backbone = EmoBackbone(**backbone_kwargs(cfg))
    for grown, trained in ((reference_net, pipe.reference_net), (backbone, pipe.backbone)):
        if grown is trained:
            continue
        missing, unexpected = grown.load_state_dict(trained.state_dict(), strict=False)
        if unexpected or not all(new_names in name for name in missing):
            raise EmoteError(f"growing the model changed more than its new {new_names.strip('.')} weights")
    return AvatarPipeline(cfg, pipe.vae, reference_net, backbone, pipe.audio_encoder, pipe.scheduler,
                          device=pipe.device, dtype=pipe.dtype, trained=pipe.trained,
                          portrait_refiner=pipe.portrait_refiner)


def default_refiner_channels(levels: int) -> tuple[int, ...]:
    """16, 24, 32, then 32 for every further autoencoder level."""
    return tuple(min(16 + 8 * i, 32) for i in range(levels))


def add_portrait_refiner(pipe: AvatarPipeline, channels: tuple[int, ...] | None = None,
                          seed: int = 0) -> AvatarPipeline:
    """`pipe` with a new PortraitRefiner of these widths (weights from `seed`); every other weight is `pipe`'s."""
    if pipe.portrait_refiner is not None:
        raise EmoteError("the model has a portrait refiner already")
    channels = channels or default_refiner_channels(len(pipe.config.vae_block_out_channels))
    return _with_new_refiner(pipe, pipe.config.replace(portrait_refiner_channels=tuple(channels)), seed)


def add_refiner_audio(pipe: AvatarPipeline, channels: int, seed: int = 0) -> AvatarPipeline:
    """`pipe` with an audio path of `channels` channels added to its PortraitRefiner (new weights from `seed`): its
    input convolutions start at zero, so it refines exactly as before until training moves them."""
    if pipe.portrait_refiner is None:
        raise EmoteError("the model has no portrait refiner to add audio to: train one with --stage refiner")
    if pipe.config.portrait_refiner_audio_channels:
        raise EmoteError(f"the portrait refiner already hears audio "
                         f"({pipe.config.portrait_refiner_audio_channels} channels)")
    if channels < 1:
        raise EmoteError(f"a refiner's audio path needs at least 1 channel, got {channels}")
    grown = _with_new_refiner(pipe, pipe.config.replace(portrait_refiner_audio_channels=channels), seed)
    missing, unexpected = grown.portrait_refiner.load_state_dict(pipe.portrait_refiner.state_dict(), strict=False)
    if unexpected or not all(name.startswith(("audio_embed.", "audio_inputs.")) for name in missing):
        raise EmoteError("growing the refiner's audio path changed more than its new weights")
    return grown


def _with_new_refiner(pipe: AvatarPipeline, cfg, seed: int) -> AvatarPipeline:
    """`pipe` with `cfg` and a new PortraitRefiner built to it (weights from `seed`); every other network is
    `pipe`'s."""
    cfg = cfg.validate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        refiner = build_portrait_refiner(cfg)
    return AvatarPipeline(cfg, pipe.vae, pipe.reference_net, pipe.backbone, pipe.audio_encoder, pipe.scheduler,
                          device=pipe.device, dtype=pipe.dtype, trained=pipe.trained, portrait_refiner=refiner)
