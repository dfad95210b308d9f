"""Prometheus exposition of sessions, frame rate, latency percentiles and drops (prometheus_client)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .memory import gpu_memory_bytes, tree_memory_bytes


class _Collector:
    def __init__(self, sessions, engine):
        self.sessions, self.engine = sessions, engine

    def collect(self):
        sessions = self.sessions
        active = GaugeMetricFamily("emote_sessions_active", "Sessions connected now")
        active.add_metric([], len(sessions))
        yield active
        limit = GaugeMetricFamily("emote_sessions_max", "Session limit")
        limit.add_metric([], sessions.settings.max_sessions)
        yield limit
        created = CounterMetricFamily("emote_sessions_created", "Sessions opened since start")
        created.add_metric([], sessions.total_created)
        yield created
        closed = CounterMetricFamily("emote_sessions_closed", "Sessions closed since start, by reason", labels=["reason"])
        for reason, count in sorted(sessions.total_closed.items()):
            closed.add_metric([reason], count)
        yield closed

        fps = GaugeMetricFamily("emote_session_fps", "Output frames per second", labels=["session", "mode"])
        latency = GaugeMetricFamily("emote_audio_to_lip_ms", "Audio-to-lip latency percentiles",
                                    labels=["session", "quantile"])
        frames = CounterMetricFamily("emote_frames", "Frames sent, by kind", labels=["session", "kind"])
        dropped = CounterMetricFamily("emote_dropped_frames", "Slots without a fresh frame", labels=["session"])
        for session in list(sessions.sessions.values()):
            stats = session.stats()
            if stats.get("fps") is not None:
                fps.add_metric([session.id, session.mode], stats["fps"])
            for q in ("p50", "p95", "p99"):
                value = (stats.get("audio_to_lip_ms") or {}).get(q)
                if value is not None:
                    latency.add_metric([session.id, q.replace("p", "0.")], value)
            counters = stats.get("counters") or {}
            for kind in ("speech_frames", "idle_frames", "held_frames"):
                if kind in counters:
                    frames.add_metric([session.id, kind.removesuffix("_frames")], counters[kind])
            dropped.add_metric([session.id], counters.get("dropped_frames", 0) + stats.get("video_queue_dropped", 0))
        yield from (fps, latency, frames, dropped)

        engine_metrics = self.engine.metrics().to_dict()
        errors = CounterMetricFamily("emote_model_errors", "Model batches that raised (their windows were skipped)")
        errors.add_metric([], engine_metrics.get("model_errors", 0))
        yield errors
        stages = GaugeMetricFamily("emote_stage_ms", "Model stage timings per window batch", labels=["stage", "quantile"])
        for stage, snapshot in (engine_metrics.get("stages_ms") or {}).items():
            for q in ("p50", "p95"):
                if snapshot.get(q) is not None:
                    stages.add_metric([stage, q.replace("p", "0.")], snapshot[q])
        yield stages

        memory = GaugeMetricFamily("emote_process_memory_bytes", "Memory of the server's process tree (RSS, PSS, "
                                   "anonymous; native allocations included) and, on a GPU, what torch holds there",
                                   labels=["kind"])
        for kind, value in {**tree_memory_bytes(), **gpu_memory_bytes()}.items():
            memory.add_metric([kind], value)
        yield memory


def render_metrics(sessions, engine) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(sessions, engine))
    return generate_latest(registry)
