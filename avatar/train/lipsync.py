"""A lip-sync expert for training (cf. Wav2Lip's expert discriminator, LatentSync's SyncNet loss): a small CNN that
reads the corpus's mouth parameters (opening, width, rounding, teeth, tongue) off the lip region of a frame.

It trains on the true frames only (in the warm stage, as the autoencoder reconstructs them, the look the student's
frames have at best), so the student cannot teach it to read its own mouths kindly; its reading of the
student's decoded frames, against the parameters the audio was rendered with, is the sync loss. The corpus gives the
exact parameters, so no expert has to be downloaded. It is part of the training objective, never of the model; the
warm stage stores it with the model directory it exports (as EXPERT_MODULE), so a later run continues with it.

Stages vae and decoder's lip-reading term uses another one, which learns from the true frames as they are (the
autoencoder is what it judges) and is stored as LIP_READER_MODULE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.func import functional_call

from avatar.unet import lip_region

EXPERT_MODULE = "mouth_expert"  # its folder in a model directory
LIP_READER_MODULE = "lip_reader"
CROP_SIZE = (24, 32)  # rows, columns of the lip-region crop the expert reads
# Each mouth parameter's spread (standard deviation) over the training split of the shipped model's corpus (`emote
# corpus --seed 0`), in MOUTH_FIELDS order (opening, width, rounding, teeth, tongue). Errors are counted in these
# units: in raw units the width (spread 0.36) weighed three times the opening (0.20), which is what lip sync is
# measured on.
MOUTH_FIELD_SCALE = (0.203, 0.360, 0.257, 0.301, 0.166)


def mouth_error(reading: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean squared error of (N, fields) mouth readings, each field in units of its corpus spread."""
    scale = torch.tensor(MOUTH_FIELD_SCALE, device=reading.device, dtype=reading.dtype)
    return ((reading - truth) / scale).square().mean()


def lip_crops(images: torch.Tensor, face_box: torch.Tensor) -> torch.Tensor:
    """(N, 3, R, R) images, (N, 4) normalised face boxes -> (N, 3, *CROP_SIZE) crops of each box's lip region."""
    x0, y0, x1, y1 = lip_region(face_box.to(images.device, torch.float32))
    rows, cols = CROP_SIZE
    u = (torch.arange(cols, device=images.device) + 0.5) / cols
    v = (torch.arange(rows, device=images.device) + 0.5) / rows
    gx = x0[:, None] + u[None] * (x1 - x0)[:, None]  # (N, cols), in [0, 1]
    gy = y0[:, None] + v[None] * (y1 - y0)[:, None]  # (N, rows)
    grid = torch.stack([gx[:, None, :].expand(-1, rows, -1), gy[:, :, None].expand(-1, -1, cols)], -1) * 2 - 1
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", align_corners=False)


class MouthExpert(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, fields: int, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(4, width), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * width), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * width), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, fields),
        )

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.net(crops)

    def frozen_reading(self, crops: torch.Tensor) -> torch.Tensor:
        """The expert's reading with its weights held fixed: gradients reach `crops` only."""
        return functional_call(self, {k: v.detach() for k, v in self.named_parameters()}, (crops,))
