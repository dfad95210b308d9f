"""Streaming knobs. Defaults favour latency: short windows, no waiting for future audio context."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from avatar.config import ModelConfig
from avatar.errors import EmoteError

LOW_LATENCY_FRAMES_PER_WINDOW = 4


def default_model_threads() -> int:
    """Intra-op threads for the model on a CPU: all cores but one. The event loop, audio encoding and the WebRTC
    encoders need a core of their own; the model's small kernels gain little from a second thread (measured on 2
    cores: 33.7 vs 35.8 fps alone, but 25 vs 12 fresh fps when the event loop competes for the cores)."""
    return max(1, (os.cpu_count() or 1) - 1)


@dataclass(frozen=True)
class StreamConfig:
    frames_per_window: int | None = None  # F new frames per window; None: min(model's, 4)
    model_threads: int | None = None  # torch intra-op threads on a CPU device; None: default_model_threads()
    motion_frames: int | None = None  # M frames carried from the previous window; None: the model's
    context_lookahead_frames: int = 0  # future frames of the ±m audio context to wait for; the rest repeat the edge
    steps: int | None = None  # sampler steps; None: the model's default
    min_steps: int | None = None  # the behind-schedule policy never goes below this; None: the model's (at most steps)
    strength: float | None = None  # warm start (ModelConfig.warm_start; 1.0: from pure noise); None: the model's
    max_batch: int = 8  # windows per backbone call
    speech_speed: float | None = None  # head-motion speed while speaking; None: the model's default
    idle_speed: float = 0.3  # head-motion speed while idle (the shipped student's head does not follow it)
    lead_margin_s: float = 0.02  # safety added to the predicted generation time
    max_lead_windows: float = 2.0  # a window is never formed more than this many window durations early
    max_buffered_audio_s: float = 30.0  # hard cap on queued input audio (oldest dropped beyond it)
    max_audio_backlog_s: float | None = None  # live input: drop the oldest audio beyond this backlog (latency cap)
    max_consumer_lag_frames: int = 3  # a reader later than this skips to the current frame
    # Decode through the model's portrait refiner. Off by default: on the 2-core CPU it adds about 17 ms per frame on
    # the model's one thread, and a live window then takes longer than it lasts (docs/benchmarks.md).
    refine: bool = False

    def resolve(self, model: ModelConfig) -> "StreamConfig":
        steps = self.steps or model.default_steps
        cfg = replace(
            self,
            frames_per_window=self.frames_per_window or min(model.frames_per_window, LOW_LATENCY_FRAMES_PER_WINDOW),
            model_threads=self.model_threads or default_model_threads(),
            motion_frames=self.motion_frames or model.motion_frames,
            steps=steps,
            min_steps=min(model.min_steps, steps) if self.min_steps is None else self.min_steps,
            strength=model.strength if self.strength is None else self.strength,
            speech_speed=model.default_speed if self.speech_speed is None else self.speech_speed,
        )
        problems = []
        if cfg.frames_per_window < 1 or cfg.motion_frames < 1:
            problems.append("frames_per_window and motion_frames must be at least 1")
        if not 0 <= cfg.context_lookahead_frames <= model.audio_context_frames:
            problems.append(f"context_lookahead_frames must be within 0..{model.audio_context_frames}")
        if cfg.steps < 1 or not 1 <= cfg.min_steps <= cfg.steps:
            problems.append("need 1 <= min_steps <= steps")
        if not 0 < cfg.strength <= 1:
            problems.append("strength must be in (0, 1]")
        if cfg.max_batch < 1:
            problems.append("max_batch must be at least 1")
        if cfg.refine and not model.portrait_refiner_channels:
            problems.append("refine needs a model with a portrait refiner")
        if cfg.max_buffered_audio_s <= 0 or (cfg.max_audio_backlog_s is not None and cfg.max_audio_backlog_s < 0):
            problems.append("audio buffer bounds must be positive")
        if cfg.max_lead_windows <= 0 or cfg.max_consumer_lag_frames < 0:
            problems.append("max_lead_windows must be positive and max_consumer_lag_frames non-negative")
        if problems:
            raise EmoteError("invalid streaming config: " + "; ".join(problems))
        return cfg
