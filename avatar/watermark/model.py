"""`WatermarkedModel`: any FrameModel whose every generated frame (128 px a side or more) carries the invisible mark
(and, when asked, the visible badge). `emote serve` always wraps its model in it; there is no option to turn the mark off."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from avatar.frame_model import AvatarHandle, BatchResult, WindowRequest, WindowResult

from .badge import add_badge
from .embed import MAX_SIDE, MIN_SIDE, Watermarker, default_payload


class WatermarkedModel:
    def __init__(self, model, badge: bool = False):
        self.inner, self.spec, self.badge = model, model.spec, badge
        self.marker = Watermarker(default_payload(model.spec.name))

    def mark(self, frame: np.ndarray) -> np.ndarray:
        # Frames under 128 px a side (the tiny test models') cannot hold the mark; every shipped model's can.
        if MIN_SIDE <= min(frame.shape[:2]) and max(frame.shape[:2]) <= MAX_SIDE:
            frame = self.marker.mark(frame)
        return add_badge(frame) if self.badge else frame

    def prepare_avatar(self, avatar_id: str, portrait: np.ndarray, cache_dir: Path | None = None) -> AvatarHandle:
        return self.inner.prepare_avatar(avatar_id, portrait, cache_dir)

    def example_avatar(self) -> AvatarHandle:
        return self.inner.example_avatar()

    def new_audio_encoder(self):
        return self.inner.new_audio_encoder()

    def generate(self, requests: Sequence[WindowRequest], steps: int) -> BatchResult:
        result = self.inner.generate(requests, steps)
        start = time.perf_counter()
        windows = [WindowResult(np.stack([self.mark(f) for f in w.frames]), w.carry) for w in result.windows]
        marking = time.perf_counter() - start
        return BatchResult(windows, result.step_seconds, result.fixed_seconds + marking,
                           {**result.timings, "watermark": marking})
