"""Mouth opening measured from pixels, for any renderer (the oracle, a model, a video).

The measure compares each frame with the identity's neutral frame (mouth closed, head still) inside the mouth
box: per pixel, the colour change, counted in full from FULL_SCALE up, summed down each column of the box's central
band and averaged over those columns. An opening mouth replaces lips and skin by a dark interior, teeth and tongue,
so the measure grows with the vertical opening; widening or rounding moves mainly the corners, outside the central
band.

There is no noise tolerance: a blurred mouth (a model's, or one through an autoencoder) opens as a faint change
spread over more pixels, which a tolerance cut away (oracle frames blurred by sigma 2 px at 128x128 tracked the
mouth parameter at r 0.30-0.98 with a 0.04 tolerance, 0.67-0.99 without). Noise and codec error add about the
same amount to every frame, which a correlation ignores; frame-to-frame flicker can only lower r, not raise it.
"""
from __future__ import annotations

import numpy as np

FULL_SCALE = 0.12  # colour change (0-1) counted as a full pixel of opening


def mouth_opening(frames: np.ndarray, neutral: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Per-frame opening in units of the mouth box height, from uint8 frames [F, H, W, 3]."""
    r0, r1, c0, c1 = box
    width = c1 - c0
    band = slice(c0 + width // 4, c1 - width // 4) if width >= 4 else slice(c0, c1)
    region = frames[:, r0:r1, band].astype(np.float32) / 255.0
    base = neutral[r0:r1, band].astype(np.float32) / 255.0
    change = np.abs(region - base[None]).mean(axis=-1)
    weight = np.clip(change / FULL_SCALE, 0.0, 1.0)
    return (weight.sum(axis=1).mean(axis=1) / max(r1 - r0, 1)).astype(np.float32)
