"""Metrics the server can publish: counters plus latency percentiles over a bounded window of recent samples."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

RECENT_SAMPLES = 4096


class Percentiles:
    """A bounded window of recent values (seconds in, milliseconds out), in one preallocated array. A deque of
    Python floats would do, but a long-running server renews it all the time: its floats, each allocated wherever
    the allocator has room at that moment, would pin the memory that finished sessions leave behind."""

    def __init__(self, size: int = RECENT_SAMPLES):
        self._values = np.zeros(size, np.float64)
        self.count = 0

    def add(self, seconds: float) -> None:
        self._values[self.count % self._values.size] = seconds
        self.count += 1

    def values(self) -> np.ndarray:
        """The recent values (seconds), oldest first."""
        n = min(self.count, self._values.size)
        return np.roll(self._values, -(self.count % self._values.size))[-n:] if n else self._values[:0].copy()

    def snapshot(self) -> dict[str, float | int]:
        if not self.count:
            return {"count": self.count, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
        v = self._values[: min(self.count, self._values.size)] * 1000.0
        p50, p95, p99 = np.percentile(v, [50, 95, 99])
        return {"count": self.count, "p50": float(p50), "p95": float(p95), "p99": float(p99),
                "max": float(v.max()), "mean": float(v.mean())}


@dataclass
class SessionCounters:
    frames_emitted: int = 0
    speech_frames: int = 0
    idle_frames: int = 0
    held_frames: int = 0  # slots shown with the previous image because no fresh frame was ready (behind schedule)
    late_frames: int = 0  # frames generated after their slot had passed, discarded
    skipped_windows: int = 0  # windows not generated at all because they could not be on time
    reduced_step_windows: int = 0  # windows generated with fewer steps than configured, to stay on time
    consumer_dropped_frames: int = 0  # slots skipped because the consumer read too late
    dropped_audio_s: float = 0.0  # input audio dropped by the backlog/buffer bounds
    skipped_silence_s: float = 0.0  # quiet live input skipped to bring latency back down (catch-up)
    interrupts: int = 0
    windows: int = 0

    @property
    def dropped_frames(self) -> int:
        """Slots the viewer did not see a fresh generated frame for."""
        return self.held_frames + self.consumer_dropped_frames


@dataclass
class SessionMetrics:
    session_id: str
    counters: SessionCounters
    audio_to_lip_ms: dict
    buffered_audio_s: float
    pending_frames: int
    fps: float | None  # output frames/s on the session's clock since its first frame

    def to_dict(self) -> dict:
        d = asdict(self)
        d["counters"]["dropped_frames"] = self.counters.dropped_frames
        return d


@dataclass
class EngineMetrics:
    stages_ms: dict  # stage -> Percentiles snapshot (per window batch; audio_encode per window)
    batch_sizes: dict  # batch size -> number of batches
    steps_used: dict  # steps -> number of windows
    lead_ms: float  # how far ahead of its first slot a window is formed
    model_errors: int  # batches whose model call raised (skipped; see the log)
    sessions: dict = field(default_factory=dict)  # session id -> SessionMetrics.to_dict()

    def to_dict(self) -> dict:
        return asdict(self)
