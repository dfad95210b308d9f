"""The one interface between the streaming engine and a model: prepare an avatar, generate a batch of windows.

Shaped like LiveKit's avatar video generator (the two sides share one small options record, `ModelSpec`) and
diffusers' model/pipeline split. The engine sees audio features, frames and an opaque per-session `carry` (motion
frames for the motion model, motion latents for the pixel model); it never sees latents or motion vectors.

Implementations:
- `avatar.photo_model.MotionPhotoModel`: the motion backbone + the photo renderer (the default);
- `avatar.pixel_model.PixelFrameModel`: the pixel EMO pipeline (`--model DIR`);
- `avatar.solid_model.SolidColourModel`: a few lines, no torch, for streaming and server tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    """Everything the two sides share."""

    name: str
    width: int
    height: int
    frames_per_window: int  # the model's natural window length F (the engine may use fewer frames per window)
    context_frames: int  # m: each frame's audio features carry frames t-m..t+m (EMO's ±2 frames)
    feature_dim: int  # per-frame audio feature size of `new_audio_encoder()`
    lookahead_frames: int = 0  # of the m future context frames, how many the engine waits for by default (latency)
    default_steps: int = 1
    min_steps: int = 1
    fps: int = 25
    sample_rate: int = 16_000


class StreamingAudioEncoder(Protocol):
    """Push 16 kHz samples as they arrive; get each video frame's feature once it can be computed."""

    feature_dim: int
    lookahead_samples: int  # audio past a frame's end that its feature depends on (part of audio-to-lip latency)

    def push(self, samples) -> Any: ...  # 1-D float samples -> (n, feature_dim) features, n >= 0

    def snapshot(self) -> object: ...

    def restore(self, snapshot: object) -> None: ...


@dataclass
class AvatarHandle:
    """A portrait prepared once (its analysis or reference features, opaque to the engine), shared by sessions."""

    avatar_id: str
    preview: np.ndarray  # uint8 (H, W, 3) at the model's output size: shown until the first frame is generated
    state: Any = None  # model-specific: the photo analysis, or the pixel model's ReferenceCache


@dataclass
class WindowRequest:
    avatar: AvatarHandle
    audio: Any  # (F, 2m + 1, feature_dim) features: frame t's context t-m..t+m, edge frames repeated
    speaking: np.ndarray  # bool (F,): the frame's span contains pushed speech
    speed: np.ndarray  # float32 (F,): head-motion speed condition (the session's speech or idle speed)
    carry: Any  # None for a session's first window, else the `carry` of its previous window's result
    seed: int  # the session's seed
    index: int  # the window's number in its session (window seeds derive from seed and index)


@dataclass
class WindowResult:
    frames: np.ndarray  # uint8 (F, H, W, 3) RGB
    carry: Any  # state for the session's next window (motion frames, noise); opaque to the engine


SIMULATED_SECONDS = "simulated_seconds"  # BatchResult.timings key: a simulated cost the engine waits out on its clock


@dataclass
class BatchResult:
    windows: list[WindowResult]
    step_seconds: float  # the part of the batch's time that scales with sampler steps
    fixed_seconds: float  # the rest: rendering / decoding
    timings: dict[str, float] = field(default_factory=dict)  # finer stages, seconds, for metrics


@runtime_checkable
class FrameModel(Protocol):
    spec: ModelSpec

    def prepare_avatar(self, avatar_id: str, portrait: np.ndarray, cache_dir: Path | None = None) -> AvatarHandle:
        """Analyse a portrait once. With `cache_dir`, a valid cache there is loaded instead, and a new one is written
        there atomically. Raises `avatar.errors.EmoteError` with a user-facing message for unusable portraits."""
        ...

    def example_avatar(self) -> AvatarHandle:
        """A built-in avatar, for warm-up and cost measurement."""
        ...

    def new_audio_encoder(self) -> StreamingAudioEncoder: ...

    def generate(self, requests: Sequence[WindowRequest], steps: int) -> BatchResult:
        """One batch of windows, possibly from many sessions and avatars. Deterministic given each request's
        (seed, index, carry, audio)."""
        ...


class FrameModelWrapper:
    """A FrameModel around another one: every method delegates to `inner`; subclasses override `generate`."""

    def __init__(self, model: FrameModel):
        self.inner, self.spec = model, model.spec

    def prepare_avatar(self, avatar_id: str, portrait: np.ndarray, cache_dir: Path | None = None) -> AvatarHandle:
        return self.inner.prepare_avatar(avatar_id, portrait, cache_dir)

    def example_avatar(self) -> AvatarHandle:
        return self.inner.example_avatar()

    def new_audio_encoder(self) -> StreamingAudioEncoder:
        return self.inner.new_audio_encoder()

    def generate(self, requests: Sequence[WindowRequest], steps: int) -> BatchResult:
        return self.inner.generate(requests, steps)
