"""`WatermarkedModel`: any FrameModel whose every generated frame (128 px a side or more) carries the invisible mark
(and, when asked, the visible badge). `emote serve` always wraps its model in it; there is no option to turn the mark off."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from avatar.frame_model import BatchResult, FrameModel, FrameModelWrapper, WindowRequest, WindowResult

from .badge import add_badge
from .embed import MAX_SIDE, MIN_SIDE, Watermarker, default_payload


def mark_frame(marker: Watermarker, frame: np.ndarray, badge: bool = False) -> np.ndarray:
    """The mark (and the badge when asked) on one generated frame. Frames under 128 px a side (only the tiny test
    models make them) cannot hold the mark and pass unmarked; every shipped model's frames are larger."""
    if MIN_SIDE <= min(frame.shape[:2]) and max(frame.shape[:2]) <= MAX_SIDE:
        frame = marker.mark(frame)
    return add_badge(frame) if badge else frame


class WatermarkedModel(FrameModelWrapper):
    def __init__(self, model: FrameModel, badge: bool = False):
        super().__init__(model)
        self.badge = badge
        self.marker = Watermarker(default_payload(model.spec.name))

    def mark(self, frame: np.ndarray) -> np.ndarray:
        return mark_frame(self.marker, frame, self.badge)

    def generate(self, requests: Sequence[WindowRequest], steps: int) -> BatchResult:
        result = self.inner.generate(requests, steps)
        start = time.perf_counter()
        windows = [WindowResult(np.stack([self.mark(f) for f in w.frames]), w.carry) for w in result.windows]
        marking = time.perf_counter() - start
        return BatchResult(windows, result.step_seconds, result.fixed_seconds + marking,
                           {**result.timings, "watermark": marking})
