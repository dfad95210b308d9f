"""Test doubles for the streaming engine, usable by transport and server tests too: `SolidColourModel` (a FrameModel
in a few lines of numpy, no torch), `SimulatedCost` (gives any FrameModel a simulated cost and records its calls)
and a fake PortAudio input stream. (`FakeClock` lives in clock.py.)"""
from __future__ import annotations

import threading
from collections import deque
from typing import Sequence

import numpy as np

from avatar.frame_model import SIMULATED_SECONDS, BatchResult, FrameModel, FrameModelWrapper, WindowRequest, WindowResult
from avatar.solid_model import RmsEncoder, SolidColourModel

__all__ = ["FakeInputStream", "RmsEncoder", "SimulatedCost", "SolidColourModel"]


class SimulatedCost(FrameModelWrapper):
    """Wraps any FrameModel: its real time is not counted; instead each batch costs `seconds_per_step` per window per
    step plus `fixed_seconds_per_frame`, waited out on the engine's clock. Records the latest requests, results and
    (batch size, steps) calls, bounded."""

    def __init__(self, model: FrameModel, seconds_per_step: float = 0.0, fixed_seconds_per_frame: float = 0.0,
                 record: int = 64):
        super().__init__(model)
        self.seconds_per_step, self.fixed_seconds_per_frame = seconds_per_step, fixed_seconds_per_frame
        self.calls: deque[tuple[int, int]] = deque(maxlen=record)
        self.requests: deque[WindowRequest] = deque(maxlen=record)
        self.results: deque[WindowResult] = deque(maxlen=record)

    def generate(self, requests: Sequence[WindowRequest], steps: int) -> BatchResult:
        result = self.inner.generate(requests, steps)
        self.calls.append((len(requests), steps))
        self.requests.extend(requests)
        self.results.extend(result.windows)
        step_s = self.seconds_per_step * steps * len(requests)
        fixed_s = self.fixed_seconds_per_frame * sum(len(r.speaking) for r in requests)
        return BatchResult(result.windows, step_s, fixed_s, {**result.timings, SIMULATED_SECONDS: step_s + fixed_s})


class FakeInputStream:
    """Stands in for sounddevice.InputStream: `feed(block)` delivers a block from another thread, like PortAudio."""

    instances: list["FakeInputStream"] = []

    def __init__(self, device=None, samplerate=48000, channels=1, dtype="int16", blocksize=960, callback=None):
        self.samplerate, self.channels, self.blocksize, self.callback = samplerate, channels, blocksize, callback
        self.started = self.closed = False
        FakeInputStream.instances.append(self)

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False

    def close(self) -> None:
        self.closed = True

    def feed(self, block: np.ndarray, status: int = 0) -> None:
        thread = threading.Thread(target=self.callback, args=(block.reshape(-1, self.channels), len(block), None, status))
        thread.start()
        thread.join()
