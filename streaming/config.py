"""Streaming knobs: timing and buffering only (model options belong to the model's constructor). Defaults favour
latency: short windows, no waiting for future audio context."""
from __future__ import annotations

from dataclasses import dataclass, replace

from avatar.errors import EmoteError
from avatar.frame_model import ModelSpec

LOW_LATENCY_FRAMES_PER_WINDOW = 4
DEFAULT_SPEECH_SPEED = 0.5  # the pixel models' ModelConfig.default_speed


@dataclass(frozen=True)
class StreamConfig:
    frames_per_window: int | None = None  # F new frames per window; None: min(the model's, 4)
    context_lookahead_frames: int | None = None  # future frames of the ±m context to wait for (None: the model's);
    # the rest repeat the edge
    steps: int | None = None  # sampler steps; None: the model's default
    min_steps: int | None = None  # the behind-schedule policy never goes below this; None: the model's (at most steps)
    max_batch: int = 8  # windows per model call
    speech_speed: float = DEFAULT_SPEECH_SPEED  # head-motion speed while speaking
    idle_speed: float = 0.3  # head-motion speed while idle (the shipped student's head does not follow it)
    lead_margin_s: float = 0.02  # safety added to the predicted generation time
    max_lead_windows: float = 2.0  # a window is never formed more than this many window durations early
    max_buffered_audio_s: float = 30.0  # hard cap on queued input audio (oldest dropped beyond it)
    max_audio_backlog_s: float | None = None  # live input: drop the oldest audio beyond this backlog (latency cap)
    max_consumer_lag_frames: int = 3  # a reader later than this skips to the current frame

    def resolve(self, spec: ModelSpec) -> "StreamConfig":
        steps = self.steps or spec.default_steps
        cfg = replace(
            self,
            frames_per_window=self.frames_per_window or min(spec.frames_per_window, LOW_LATENCY_FRAMES_PER_WINDOW),
            context_lookahead_frames=(spec.lookahead_frames if self.context_lookahead_frames is None
                                      else self.context_lookahead_frames),
            steps=steps,
            min_steps=min(spec.min_steps, steps) if self.min_steps is None else self.min_steps,
        )
        problems = []
        if cfg.frames_per_window < 1:
            problems.append("frames_per_window must be at least 1")
        if not 0 <= cfg.context_lookahead_frames <= spec.context_frames:
            problems.append(f"context_lookahead_frames must be within 0..{spec.context_frames}")
        if cfg.steps < 1 or not 1 <= cfg.min_steps <= cfg.steps:
            problems.append("need 1 <= min_steps <= steps")
        if cfg.max_batch < 1:
            problems.append("max_batch must be at least 1")
        if cfg.max_buffered_audio_s <= 0 or (cfg.max_audio_backlog_s is not None and cfg.max_audio_backlog_s < 0):
            problems.append("audio buffer bounds must be positive")
        if cfg.max_lead_windows <= 0 or cfg.max_consumer_lag_frames < 0:
            problems.append("max_lead_windows must be positive and max_consumer_lag_frames non-negative")
        if problems:
            raise EmoteError("invalid streaming config: " + "; ".join(problems))
        return cfg
