"""Model growth: add layers to a trained model so that training continues from it instead of from scratch.

Spatial attention (ReferenceNet self-attention into the backbone, audio cross-attention) can be added at UNet levels
that have none: a new SpatialTransformer's output projection is zero-initialised and sits on a residual, so the grown
model computes exactly what the trained one did until training moves it.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .errors import EmoteError
from .pipeline import AvatarPipeline
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
    cfg = pipe.config.replace(attention_levels=tuple(attention)).validate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reference_net = ReferenceNet(**reference_net_kwargs(cfg))
        backbone = EmoBackbone(**backbone_kwargs(cfg))
    for grown, trained in ((reference_net, pipe.reference_net), (backbone, pipe.backbone)):
        missing, unexpected = grown.load_state_dict(trained.state_dict(), strict=False)
        if unexpected or not all(".spatial." in name for name in missing):
            raise EmoteError("growing attention changed more than the new attention blocks")
    return AvatarPipeline(cfg, pipe.vae, reference_net, backbone, pipe.audio_encoder, pipe.scheduler,
                          device=pipe.device, dtype=pipe.dtype, trained=pipe.trained)
