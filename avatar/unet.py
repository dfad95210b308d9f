"""ReferenceNet and the denoising backbone, built from diffusers blocks on one shared layout.

Both networks are a sequence of *slots* (a ResnetBlock2D, optionally followed by a SpatialTransformer) arranged as
an SD-style UNet. Slot i of the ReferenceNet lines up with slot i of the backbone, which is how the backbone finds
its reference bank entry (spatial self-attention) and its motion-frame features (temporal attention) for that slot.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from .attention import SpatialTransformer, TemporalTransformer

# Where the mouth lies inside the face box (x0, y0, x1, y1), as fractions of its width and height; it covers the
# corpus's mouths at any opening (measured on rendered identities: y 0.67-0.94, x 0.29-0.71).
LIP_REGION_IN_FACE = (0.25, 0.62, 0.75, 0.97)


def lip_region(face_box: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(..., 4) normalised face boxes -> the edges x0, y0, x1, y1 (each (...)) of their lip regions."""
    x0, y0, x1, y1 = face_box.unbind(-1)
    fx0, fy0, fx1, fy1 = LIP_REGION_IN_FACE
    w, h = x1 - x0, y1 - y0
    return x0 + fx0 * w, y0 + fy0 * h, x0 + fx1 * w, y0 + fy1 * h


@dataclass
class SlotFeatures:
    """What the ReferenceNet records, per slot: the bank (self-attention inputs) and the slot outputs."""

    bank: list[torch.Tensor | None]  # (B, HW, C) where the slot has spatial attention, else None
    outputs: list[torch.Tensor]  # (B, C, H, W) hidden state after the slot


@dataclass
class BackboneConditions:
    """Everything besides the noisy latent and timestep that the backbone attends to, for B windows of F frames."""

    reference_bank: list[torch.Tensor | None] | None  # per slot (B, N, C); None drops the reference (CFG)
    motion: list[torch.Tensor] | None  # per slot (B*M, C, H, W) ReferenceNet outputs of the motion frames
    audio: torch.Tensor  # (B, F, tokens, audio_feature_dim) windowed audio features
    speed: torch.Tensor  # (B, F) head-rotation speed, deg/frame
    face_mask: torch.Tensor  # (B, 1, H_img, W_img) in [0, 1]


class UNetSlot(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        groups: int,
        heads: int,
        spatial_attention: bool,
        audio_dim: int | None,
        temporal: bool,
        temporal_heads: int,
        speed_dim: int,
    ):
        super().__init__()
        self.resnet = ResnetBlock2D(
            in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels, groups=groups
        )
        self.spatial = SpatialTransformer(out_channels, heads, groups, audio_dim) if spatial_attention else None
        self.temporal = TemporalTransformer(out_channels, temporal_heads, groups, speed_dim) if temporal else None


class _SlotRunner:
    """Carries the per-call context through the slots, in order."""

    def __init__(self, temb, num_frames=1, bank=None, motion=None, audio=None, speed=None, record=None):
        self.temb = temb
        self.num_frames = num_frames
        self.bank = bank
        self.motion = motion
        self.audio = audio
        self.speed = speed
        self.record = record
        self.index = 0

    def __call__(self, slot: UNetSlot, hidden: torch.Tensor) -> torch.Tensor:
        i = self.index
        self.index += 1
        hidden = slot.resnet(hidden, self.temb)
        if slot.spatial is not None:
            reference = self.bank[i] if self.bank is not None else None
            bank_out = [] if self.record is not None else None
            hidden = slot.spatial(hidden, reference=reference, audio=self.audio, bank_out=bank_out)
            if self.record is not None:
                self.record.bank.append(bank_out[0])
        elif self.record is not None:
            self.record.bank.append(None)
        if self.record is not None:
            self.record.outputs.append(hidden)
        if slot.temporal is not None:
            motion = self.motion[i] if self.motion is not None else None
            hidden = slot.temporal(hidden, self.num_frames, motion=motion, speed=self.speed)
        return hidden


class _UNetBody(nn.Module):
    """conv_in, down levels, mid, up levels (SD-style skip connections); no conv_out."""

    def __init__(self, cfg: dict, temporal: bool, audio_dim: int | None):
        super().__init__()
        channels = list(cfg["block_out_channels"])
        attention = list(cfg["attention_levels"])
        groups = cfg["norm_num_groups"]
        temb_dim = channels[0] * 4
        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)
        self.conv_in = nn.Conv2d(cfg["latent_channels"], channels[0], 3, padding=1)

        def slot(cin: int, cout: int, attn: bool) -> UNetSlot:
            return UNetSlot(
                cin, cout, temb_dim, groups, cfg["attention_heads"], attn, audio_dim, temporal,
                cfg.get("temporal_heads", 1), cfg.get("speed_embed_dim", 1),
            )

        self.down = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skip_channels = [channels[0]]
        cin = channels[0]
        for level, cout in enumerate(channels):
            layers = nn.ModuleList()
            for _ in range(cfg["layers_per_block"]):
                layers.append(slot(cin, cout, attention[level]))
                cin = cout
                skip_channels.append(cout)
            self.down.append(layers)
            last = level == len(channels) - 1
            self.downsamplers.append(nn.Identity() if last else Downsample2D(cout, use_conv=True, name="op"))
            if not last:
                skip_channels.append(cout)

        self.mid = slot(cin, cin, True)
        self.mid_resnet = ResnetBlock2D(in_channels=cin, out_channels=cin, temb_channels=temb_dim, groups=groups)

        self.up = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level, cout in reversed(list(enumerate(channels))):
            layers = nn.ModuleList()
            for _ in range(cfg["layers_per_block"] + 1):
                layers.append(slot(cin + skip_channels.pop(), cout, attention[level]))
                cin = cout
            self.up.append(layers)
            self.upsamplers.append(Upsample2D(cout, use_conv=True) if level > 0 else nn.Identity())
        self.out_channels = cin

    def time_embed(self, timestep: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
        t = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep.reshape(-1)
        return self.time_embedding(self.time_proj(t).to(dtype))

    def run(self, latent: torch.Tensor, runner: _SlotRunner,
            input_residual: torch.Tensor | None = None) -> torch.Tensor:
        """`input_residual` (the audio locator's map) is added to the first hidden state."""
        hidden = self.conv_in(latent)
        if input_residual is not None:
            hidden = hidden + input_residual
        skips = [hidden]
        for layers, downsample in zip(self.down, self.downsamplers):
            for layer in layers:
                hidden = runner(layer, hidden)
                skips.append(hidden)
            if not isinstance(downsample, nn.Identity):
                hidden = downsample(hidden)
                skips.append(hidden)
        hidden = runner(self.mid, hidden)
        hidden = self.mid_resnet(hidden, runner.temb)
        for layers, upsample in zip(self.up, self.upsamplers):
            for layer in layers:
                hidden = runner(layer, torch.cat([hidden, skips.pop()], dim=1))
            hidden = upsample(hidden)
        return hidden


class ReferenceNet(ModelMixin, ConfigMixin):
    """A UNet without temporal layers, run once on the portrait (and on motion frames) at timestep 0.

    It records the input of every spatial self-attention (the reference bank) and every slot's output (the features
    the backbone's temporal layers read for motion frames).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,
        block_out_channels: tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
        attention_levels: tuple[bool, ...] = (True, True),
        attention_heads: int = 2,
        norm_num_groups: int = 8,
    ):
        super().__init__()
        self.body = _UNetBody(dict(self.config), temporal=False, audio_dim=None)

    def forward(self, latent: torch.Tensor) -> SlotFeatures:
        """latent (B, C, h, w) clean latents -> per-slot bank and outputs."""
        temb = self.body.time_embed(torch.zeros(1, device=latent.device), latent.shape[0], latent.dtype)
        record = SlotFeatures(bank=[], outputs=[])
        self.body.run(latent, _SlotRunner(temb, record=record))
        return record


class FaceLocator(nn.Module):
    """Light convolutions over the face-region mask, down to latent resolution, added to the noisy latent."""

    def __init__(self, latent_channels: int, downsamplings: int, hidden: int = 16):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, hidden, 3, padding=1), nn.SiLU()]
        for _ in range(downsamplings):
            layers += [nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.SiLU()]
        out = nn.Conv2d(hidden, latent_channels, 3, padding=1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return self.net(mask)


def lip_region_grid(face_box: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., 4) normalised face boxes -> (u, v, inside) on a size x size grid of pixel centres: the relative x (...,
    size) and y (..., size) in each box's lip region ([0, 1] inside it), and where both are inside (..., size, size;
    rows are y)."""
    lx0, ly0, lx1, ly1 = lip_region(face_box)
    grid = (torch.arange(size, device=face_box.device, dtype=torch.float32) + 0.5) / size
    u = (grid - lx0[..., None]) / (lx1 - lx0).clamp_min(1e-6)[..., None]
    v = (grid - ly0[..., None]) / (ly1 - ly0).clamp_min(1e-6)[..., None]
    inside = ((v >= 0) & (v <= 1))[..., :, None] & ((u >= 0) & (u <= 1))[..., None, :]
    return u, v, inside


def lip_region_maps(face_mask: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, R, R) face-box masks -> (B, 3, size, size): the lip region of each box (`lip_region` of the mask's
    bounding box) and, inside it, the relative x and y in [0, 1]; zero outside (and for an empty mask)."""
    present = face_mask[:, 0] > 0.5  # (B, R, R)
    resolution = face_mask.shape[-1]
    index = torch.arange(resolution, device=face_mask.device, dtype=torch.float32)

    def extent(occupied: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = torch.where(occupied, index, float(resolution)).amin(-1)
        high = torch.where(occupied, index + 1, 0.0).amax(-1)
        return low / resolution, high / resolution

    x0, x1 = extent(present.any(1))
    y0, y1 = extent(present.any(2))
    u, v, inside = lip_region_grid(torch.stack([x0, y0, x1, y1], -1), size)
    inside = inside.float()
    return torch.stack([inside, inside * u[:, None, :], inside * v[:, :, None]], 1).to(face_mask.dtype)


class AudioLocator(nn.Module):
    """The frame's audio, placed where the mouth is: an embedding of its windowed audio features, spread over the lip
    region of the face box, through light convolutions to the backbone's first hidden state (added, like the face
    locator's map is added to the latent). Cross-attention hands audio to every pixel alike, at the coarse levels
    only; this hands it to the mouth at the resolution the mouth is drawn at. Zero-initialised output."""

    def __init__(self, feature_dim: int, tokens: int, channels: int, out_channels: int):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(feature_dim * tokens, channels), nn.SiLU(), nn.Linear(channels, channels))
        out = nn.Conv2d(channels, out_channels, 3, padding=1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(nn.Conv2d(channels + 3, channels, 3, padding=1), nn.SiLU(), out)

    def forward(self, audio: torch.Tensor, face_mask: torch.Tensor, size: int) -> torch.Tensor:
        """audio (B, F, tokens, D), face_mask (B, 1, R, R) -> (B*F, out_channels, size, size)."""
        f = audio.shape[1]
        embedding = self.embed(audio.flatten(2).to(self.embed[0].weight.dtype)).flatten(0, 1)  # (B*F, C)
        region = lip_region_maps(face_mask, size).to(embedding.dtype).repeat_interleave(f, dim=0)  # (B*F, 3, s, s)
        painted = embedding[:, :, None, None] * region[:, :1]
        return self.net(torch.cat([painted, region], 1))


class SpeedEncoder(nn.Module):
    """EMO speed layers' input: s_d = tanh((w - c_d) / r * 3) per bucket, windowed over ±k frames, then an MLP."""

    def __init__(self, centers: tuple[float, ...], radius: float, context: int, embed_dim: int):
        super().__init__()
        self.register_buffer("centers", torch.tensor(centers, dtype=torch.float32), persistent=False)
        self.radius = radius
        self.context = context
        width = len(centers) * (2 * context + 1)
        self.mlp = nn.Sequential(nn.Linear(width, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, speed: torch.Tensor) -> torch.Tensor:
        """speed (B, F) -> (B, F, embed_dim)."""
        buckets = torch.tanh((speed[..., None] - self.centers) / self.radius * 3)  # (B, F, D)
        padded = torch.cat(
            [buckets[:, :1].expand(-1, self.context, -1), buckets, buckets[:, -1:].expand(-1, self.context, -1)], 1
        )
        frames = speed.shape[1]
        windows = torch.cat([padded[:, k : k + frames] for k in range(2 * self.context + 1)], dim=-1)
        return self.mlp(windows.to(self.mlp[0].weight.dtype))


class AudioProjection(nn.Module):
    """Windowed per-frame audio features (±m frames) -> cross-attention tokens, one token per context frame."""

    def __init__(self, feature_dim: int, tokens: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(feature_dim, dim)
        self.position = nn.Parameter(torch.zeros(tokens, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(audio) + self.position)


class EmoBackbone(ModelMixin, ConfigMixin):
    """The denoising UNet: reference-extended self-attention, audio cross-attention, temporal attention with motion
    frames and speed, and a face locator on the input."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,
        block_out_channels: tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
        attention_levels: tuple[bool, ...] = (True, True),
        attention_heads: int = 2,
        norm_num_groups: int = 8,
        temporal_heads: int = 2,
        speed_embed_dim: int = 32,
        audio_feature_dim: int = 64,
        audio_tokens_per_frame: int = 5,
        audio_cross_attention_dim: int = 64,
        vae_scale_factor: int = 8,
        speed_bucket_centers: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0),
        speed_bucket_radius: float = 0.5,
        speed_context_frames: int = 2,
        audio_locator_channels: int = 0,
    ):
        super().__init__()
        self.body = _UNetBody(dict(self.config), temporal=True, audio_dim=audio_cross_attention_dim)
        self.face_locator = FaceLocator(latent_channels, downsamplings=vae_scale_factor.bit_length() - 1)
        self.audio_locator = (
            AudioLocator(audio_feature_dim, audio_tokens_per_frame, audio_locator_channels, block_out_channels[0])
            if audio_locator_channels
            else None
        )
        self.audio_projection = AudioProjection(audio_feature_dim, audio_tokens_per_frame, audio_cross_attention_dim)
        self.speed_encoder = SpeedEncoder(speed_bucket_centers, speed_bucket_radius, speed_context_frames, speed_embed_dim)
        out = self.body.out_channels
        self.norm_out = nn.GroupNorm(norm_num_groups, out, eps=1e-6)
        self.conv_out = nn.Conv2d(out, latent_channels, 3, padding=1)

    def forward(self, noisy: torch.Tensor, timestep: torch.Tensor, cond: BackboneConditions) -> torch.Tensor:
        """noisy (B, F, C, h, w) -> model output of the same shape (epsilon or v, per the scheduler config)."""
        b, f, c, h, w = noisy.shape
        face = self.face_locator(cond.face_mask.to(noisy.dtype))  # (B, C, h, w)
        latent = (noisy + face[:, None]).reshape(b * f, c, h, w)
        timestep = torch.as_tensor(timestep, device=noisy.device)
        if timestep.numel() > 1:
            timestep = timestep.reshape(b, 1).expand(b, f)
        temb = self.body.time_embed(timestep, b * f, noisy.dtype)
        audio = self.audio_projection(cond.audio.to(noisy.dtype)).reshape(b * f, -1, self.config.audio_cross_attention_dim)
        speed = self.speed_encoder(cond.speed.to(noisy.device))
        runner = _SlotRunner(temb, num_frames=f, bank=cond.reference_bank, motion=cond.motion, audio=audio, speed=speed)
        lips = None
        if self.audio_locator is not None:
            lips = self.audio_locator(cond.audio, cond.face_mask, h).to(noisy.dtype)
        hidden = self.body.run(latent, runner, input_residual=lips)
        out = self.conv_out(nn.functional.silu(self.norm_out(hidden)))
        return out.reshape(b, f, c, h, w)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by EMO training stage group (see `parameter_group`)."""
        groups: dict[str, list[nn.Parameter]] = {"spatial": [], "temporal": [], "audio": [], "speed": []}
        for name, param in self.named_parameters():
            groups[parameter_group(name)].append(param)
        return groups


def parameter_group(name: str) -> str:
    """The EMO training group of a backbone parameter: "spatial" (stage 1: ResNets, reference self-attention, face
    locator), "temporal" and "audio" (stage 2: with the audio projection and the audio locator), or "speed"
    (stage 3)."""
    if "speed" in name:
        return "speed"
    if name.startswith(("audio_projection.", "audio_locator.")) or ".spatial.attn2." in name or ".spatial.norm2." in name:
        return "audio"
    if ".temporal." in name:
        return "temporal"
    return "spatial"


def reference_net_kwargs(cfg) -> dict:
    """ReferenceNet config derived from a ModelConfig: the layout it shares with the backbone."""
    return dict(
        latent_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        attention_levels=tuple(cfg.attention_levels),
        attention_heads=cfg.attention_heads,
        norm_num_groups=cfg.norm_num_groups,
    )


def backbone_kwargs(cfg) -> dict:
    return dict(
        **reference_net_kwargs(cfg),
        temporal_heads=cfg.temporal_heads,
        speed_embed_dim=cfg.speed_embed_dim,
        audio_feature_dim=cfg.audio_feature_dim,
        audio_tokens_per_frame=cfg.audio_tokens_per_frame,
        audio_cross_attention_dim=cfg.audio_cross_attention_dim,
        vae_scale_factor=cfg.vae_scale_factor,
        speed_bucket_centers=tuple(cfg.speed_bucket_centers),
        speed_bucket_radius=cfg.speed_bucket_radius,
        speed_context_frames=cfg.speed_context_frames,
        audio_locator_channels=cfg.audio_locator_channels,
    )
