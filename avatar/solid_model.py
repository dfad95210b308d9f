"""The solid-colour model: a `FrameModel` in a few lines of numpy, no torch. Each frame is one colour that encodes
its window, frame, seed and speaking flag, so streaming and server tests can check order and sync from pixels; its
cost is simulated (reported in `BatchResult.timings[SIMULATED_SECONDS]` for the engine to wait out on its clock)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import SAMPLES_PER_FRAME
from .errors import EmoteError
from .frame_model import SIMULATED_SECONDS, AvatarHandle, BatchResult, ModelSpec, WindowRequest, WindowResult


class RmsEncoder:
    """One feature per 40 ms frame: the frame's RMS level, ready as soon as the frame's samples are in."""

    feature_dim = 1
    lookahead_samples = 0

    def __init__(self):
        self._pending = np.zeros(0, np.float32)

    def push(self, samples) -> np.ndarray:
        pending = np.concatenate([self._pending, np.asarray(samples, np.float32).reshape(-1)])
        n = pending.size // SAMPLES_PER_FRAME
        frames = pending[: n * SAMPLES_PER_FRAME].reshape(n, SAMPLES_PER_FRAME)
        self._pending = pending[n * SAMPLES_PER_FRAME :]
        return np.sqrt(np.mean(frames**2, axis=1, keepdims=True)) if n else np.zeros((0, 1), np.float32)

    def snapshot(self) -> object:
        return self._pending

    def restore(self, snapshot: object) -> None:
        self._pending = snapshot


class SolidColourModel:
    """Each frame is one solid colour: R = window index % 256, G = frame in window, B = 2 * (seed % 128) + speaking
    (`decode`). The carry counts a session's generated windows. Costs are simulated: `seconds_per_step` per window
    per step and `fixed_seconds_per_frame`, reported in `BatchResult.timings[SIMULATED_SECONDS]` for the engine to
    wait out on its clock. Portraits under `min_side` pixels are refused, as a real model refuses unusable ones.
    `noise` > 0 adds seeded per-frame pixel noise of that amplitude (the top-left 16x16 block, which `decode` reads,
    stays exact), so frames encode to realistic sizes (several RTP packets) instead of a few bytes."""

    def __init__(self, width: int = 64, height: int = 64, frames_per_window: int = 4, context_frames: int = 2,
                 default_steps: int = 1, min_steps: int = 1, seconds_per_step: float = 0.0,
                 fixed_seconds_per_frame: float = 0.0, min_side: int = 64, name: str = "solid-colour",
                 noise: int = 0):
        self.spec = ModelSpec(name, width, height, frames_per_window, context_frames, RmsEncoder.feature_dim,
                              default_steps=default_steps, min_steps=min_steps)
        self.seconds_per_step, self.fixed_seconds_per_frame, self.min_side, self.noise = (
            seconds_per_step, fixed_seconds_per_frame, min_side, noise)

    @staticmethod
    def decode(image: np.ndarray) -> tuple[int, int, int, bool]:
        """(window index % 256, frame in window, seed % 128, speaking) of a frame."""
        r, g, b = (int(v) for v in image[0, 0])
        return r, g, b // 2, bool(b % 2)

    def prepare_avatar(self, avatar_id: str, portrait: np.ndarray, cache_dir: Path | None = None) -> AvatarHandle:
        portrait = np.asarray(portrait)
        if portrait.ndim != 3 or portrait.shape[2] != 3 or min(portrait.shape[:2]) < self.min_side:
            raise EmoteError(f"portrait must be an RGB image of at least {self.min_side}x{self.min_side} pixels, "
                             f"got shape {portrait.shape}")
        rows = np.arange(self.spec.height) * portrait.shape[0] // self.spec.height
        cols = np.arange(self.spec.width) * portrait.shape[1] // self.spec.width
        preview = np.ascontiguousarray(portrait[rows][:, cols], dtype=np.uint8)
        state = {"model": self.spec.name, "mean": float(preview.mean())}
        if cache_dir is not None:
            state = self._cached(Path(cache_dir), state)
        return AvatarHandle(avatar_id, preview, state)

    @staticmethod
    def _cached(cache_dir: Path, state: dict) -> dict:
        path = cache_dir / "analysis.json"
        try:
            stored = json.loads(path.read_text())
            if stored.get("model") == state["model"]:
                return stored
        except (OSError, ValueError):
            pass
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)
        return state

    def example_avatar(self) -> AvatarHandle:
        side = max(self.min_side, self.spec.width, self.spec.height)
        return self.prepare_avatar("example", np.full((side, side, 3), 128, np.uint8))

    def new_audio_encoder(self) -> RmsEncoder:
        return RmsEncoder()

    def generate(self, requests: Sequence[WindowRequest], steps: int) -> BatchResult:
        windows = []
        for r in requests:
            f = len(r.speaking)
            colours = np.stack([np.full(f, r.index % 256), np.arange(f), 2 * (r.seed % 128) + r.speaking], axis=1)
            frames = np.broadcast_to(colours.astype(np.uint8)[:, None, None, :], (f, self.spec.height, self.spec.width, 3))
            if self.noise:
                rng = np.random.default_rng([r.seed % 2**32, r.index])
                noise = rng.integers(-self.noise, self.noise + 1, frames.shape, dtype=np.int16)
                noise[:, :16, :16] = 0
                frames = np.clip(frames + noise, 0, 255).astype(np.uint8)
            windows.append(WindowResult(frames.copy(), (r.carry or 0) + 1))
        step_s = self.seconds_per_step * steps * len(requests)
        fixed_s = self.fixed_seconds_per_frame * sum(len(r.speaking) for r in requests)
        return BatchResult(windows, step_s, fixed_s, {SIMULATED_SECONDS: step_s + fixed_s})
