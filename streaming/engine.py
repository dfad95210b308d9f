"""The engine: one model worker per device, serving many sessions in batched, just-in-time windows.

Scheduling. All sessions share one window grid: boundary G is global frame G*F, shown at origin + G*F/25 s. The
worker forms every session's window for boundary G at `boundary_time(G) - lead`, where lead is the predicted time
to generate the batch plus a margin, and runs them as one `FrameModel.generate` call (split by `max_batch`). Forming
as late as possible uses the most recent audio, which is what bounds audio-to-lip latency.

The engine sees only `avatar.frame_model`: audio features in, frames and an opaque per-session `carry` out. The cost
model uses each batch's `step_seconds` (scales with steps) and `fixed_seconds`. A model whose cost is simulated
(`avatar.solid_model`) reports it as `timings[SIMULATED_SECONDS]`, which the engine waits out on its clock, so that
virtual-time tests see the cost as time passing while the pacers run.

Behind schedule (documented in docs/streaming.md, counted in metrics):
1. fewer steps: steps are lowered (down to `min_steps`) when the configured ones cannot be sustained (a batch longer
   than 90% of a window) or when the batch would finish after its first frame is due;
2. skip: if even `min_steps` cannot deliver any of the window's frames on time, the window is not generated; its
   audio still plays and the last image is held;
3. hold: frames that arrive after their slot are discarded and the previous image is repeated in their place.
Output timestamps never move, and the lead is capped, so latency stays bounded.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, replace
from typing import Callable, Sequence

import numpy as np

from avatar.config import VIDEO_FPS
from avatar.errors import EmoteError
from avatar.frame_model import SIMULATED_SECONDS, AvatarHandle, BatchResult, FrameModel, WindowRequest

from .clock import Clock, MonotonicClock
from .config import StreamConfig
from .metrics import EngineMetrics, Percentiles
from .session import Session, Window

logger = logging.getLogger("emote.engine")


PER_SESSION_OPTIONS = {"speech_speed", "idle_speed", "max_buffered_audio_s", "max_audio_backlog_s",
                       "max_consumer_lag_frames"}


class StreamingEngine:
    def __init__(
        self,
        model: FrameModel,
        config: StreamConfig | None = None,
        clock: Clock | None = None,
        threaded: bool = True,
        max_avatars: int = 64,
    ):
        """`model` is any `avatar.frame_model.FrameModel`. `threaded=False` runs the model inline on the event loop
        (deterministic tests with a FakeClock); otherwise it runs on one dedicated thread."""
        self.model = model
        self.spec = model.spec
        self.config = (config or StreamConfig()).resolve(self.spec)
        self.clock = clock or MonotonicClock()
        self.max_avatars = max_avatars
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="emote-model") if threaded else None
        self._avatars: OrderedDict[str, AvatarHandle] = OrderedDict()
        self._sessions: dict[str, Session] = {}
        self._ids = itertools.count()
        self._origin: float | None = None
        self._next_boundary = 0
        self._urgent: dict[str, Session] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._cost_step: float | None = None  # seconds per window per step
        self._cost_fixed: float | None = None  # seconds per window: rendering / decoding
        self._cost_form = 0.0  # seconds per window: audio encoding and bookkeeping
        # "denoise" and "decode" are the model's step and fixed parts (names kept for dashboards)
        self.stages = {name: Percentiles() for name in ("form", "denoise", "decode", "batch", "queue_wait")}
        self.batch_sizes: Counter[int] = Counter()
        self.model_errors = 0
        self.steps_used: Counter[int] = Counter()

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    @property
    def window_seconds(self) -> float:
        return self.config.frames_per_window / VIDEO_FPS

    async def start(self) -> "StreamingEngine":
        if self._task is None:
            if self._cost_step is None:
                await self._warm_up()
            self._origin = self.clock.now()
            self._next_boundary = self._first_formable_boundary()
            self._task = asyncio.ensure_future(self._worker())
        return self

    async def stop(self) -> None:
        for session in list(self._sessions.values()):
            await session.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def __aenter__(self) -> "StreamingEngine":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def set_costs(self, step_seconds: float, fixed_seconds: float) -> None:
        """Seed the cost model (seconds per window per step, and per window) instead of measuring at start."""
        self._cost_step, self._cost_fixed = step_seconds, fixed_seconds

    async def _warm_up(self) -> None:
        f, m, steps = self.config.frames_per_window, self.spec.context_frames, self.config.steps
        avatar = await self._call(self.model.example_avatar)
        request = WindowRequest(avatar, np.zeros((f, 2 * m + 1, self.spec.feature_dim), np.float32),
                                np.zeros(f, bool), np.full(f, self.config.idle_speed, np.float32), None, 0, 0)
        await self._model([request], steps)
        step_s, fixed_s = [], []
        for _ in range(3):  # the fastest of three: a busy machine only ever adds time
            result = await self._model([request], steps)
            step_s.append(result.step_seconds / steps)
            fixed_s.append(result.fixed_seconds)
        self.set_costs(min(step_s), min(fixed_s))

    async def _call(self, fn: Callable):
        if self._executor is None:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _model(self, requests: Sequence[WindowRequest], steps: int) -> BatchResult:
        """One `generate` call off the event loop; a simulated cost is then waited out on the engine's clock."""
        result = await self._call(lambda: self.model.generate(requests, steps))
        if len(result.windows) != len(requests):
            raise RuntimeError(f"the model returned {len(result.windows)} windows for {len(requests)} requests")
        simulated = result.timings.get(SIMULATED_SECONDS, 0.0)
        if simulated:
            await self.clock.sleep_until(self.clock.now() + simulated)
        return result

    # ---- avatars and sessions ----------------------------------------------------------------------------------

    async def add_avatar(self, avatar_id: str, portrait: np.ndarray) -> AvatarHandle:
        """Prepare a portrait once (`FrameModel.prepare_avatar`, off the event loop); later calls with the same id
        return the cached avatar."""
        if avatar_id in self._avatars:
            self._avatars.move_to_end(avatar_id)
            return self._avatars[avatar_id]
        avatar = await self._call(lambda: self.model.prepare_avatar(avatar_id, portrait))
        return self.register_avatar(avatar)

    def register_avatar(self, avatar: AvatarHandle) -> AvatarHandle:
        """Register an avatar prepared (or loaded from its cache) elsewhere, e.g. by the server's avatar store."""
        self._avatars[avatar.avatar_id] = avatar
        self._avatars.move_to_end(avatar.avatar_id)
        self._evict_avatars()
        return avatar

    def avatar(self, avatar_id: str) -> AvatarHandle:
        try:
            return self._avatars[avatar_id]
        except KeyError:
            raise EmoteError(f"unknown avatar {avatar_id!r}") from None

    def remove_avatar(self, avatar_id: str) -> None:
        """Forget an avatar; sessions already using it keep their (shared) handle until they close."""
        self._avatars.pop(avatar_id, None)

    def _evict_avatars(self) -> None:
        in_use = {s.avatar.avatar_id for s in self._sessions.values()}
        for avatar_id in list(self._avatars):
            if len(self._avatars) <= self.max_avatars:
                break
            if avatar_id not in in_use:
                del self._avatars[avatar_id]

    async def open_session(self, avatar_id: str, session_id: str | None = None, seed: int = 0, **options) -> Session:
        """A new session on a registered avatar. `options` override per-session fields of StreamConfig."""
        if self._task is None:
            await self.start()
        unknown = set(options) - PER_SESSION_OPTIONS
        if unknown:
            raise EmoteError(f"not per-session options: {', '.join(sorted(unknown))}")
        session_id = session_id or f"s{next(self._ids)}"
        if session_id in self._sessions:
            raise EmoteError(f"session {session_id!r} already exists")
        config = replace(self.config, **options).resolve(self.spec)
        boundary = max(self._next_boundary, self._first_formable_boundary())
        session = Session(
            self, session_id, self.avatar(avatar_id), self.model.new_audio_encoder(), config,
            self.spec.context_frames, self.clock, self._origin, boundary * self.config.frames_per_window, seed,
        )
        self._sessions[session_id] = session
        self._wake.set()
        return session

    def session(self, session_id: str) -> Session:
        return self._sessions[session_id]

    @property
    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def _remove_session(self, session: Session) -> None:
        self._sessions.pop(session.session_id, None)
        self._urgent.pop(session.session_id, None)

    def _request_urgent(self, session: Session) -> None:
        self._urgent[session.session_id] = session
        self._wake.set()

    # ---- timing ------------------------------------------------------------------------------------------------

    def boundary_time(self, boundary: int) -> float:
        return self._origin + boundary * self.window_seconds

    def predicted_seconds(self, steps: int, windows: int) -> float:
        return windows * (self._cost_form + self._cost_fixed + steps * self._cost_step)

    def planned_steps(self, windows: int) -> int:
        """The most steps (up to the configured) whose batch time still fits in one window duration: more could
        not be sustained, and planning the lead for them would only add latency."""
        steps = self.config.steps
        while steps > self.config.min_steps and self.predicted_seconds(steps, windows) > 0.9 * self.window_seconds:
            steps -= 1
        return steps

    def lead_seconds(self) -> float:
        n = max(1, len(self._sessions))
        lead = self.predicted_seconds(self.planned_steps(n), n) + self.config.lead_margin_s
        return min(lead, self.config.max_lead_windows * self.window_seconds)

    def _first_formable_boundary(self) -> int:
        now, lead = self.clock.now(), self.lead_seconds()
        boundary = max(0, int((now + lead - self._origin) / self.window_seconds))
        while self.boundary_time(boundary) - lead < now:
            boundary += 1
        return boundary

    # ---- the worker --------------------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            if self._urgent:
                await self._run_urgent()
                continue
            boundary = self._next_boundary
            form_at = self.boundary_time(boundary) - self.lead_seconds()
            if self.clock.now() < form_at:
                await self._sleep_or_wake(form_at)
                continue
            await self._run_boundary(boundary)
            self._next_boundary = boundary + 1
            await self.clock.sleep_until(self.clock.now())  # let the pacers run, even when behind schedule

    async def _sleep_or_wake(self, deadline: float) -> None:
        self._wake.clear()
        sleeper = asyncio.ensure_future(self.clock.sleep_until(deadline))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()

    async def _run_boundary(self, boundary: int) -> None:
        f = self.config.frames_per_window
        start = boundary * f
        due = [s for s in self._sessions.values() if s._g0 + s.next_window_slot <= start]
        if not due:
            return
        for session in due:  # a session that fell behind the grid (it cannot normally) catches up by skipping
            while session._g0 + session.next_window_slot < start:
                session.deliver(session.form_window(self.clock.now(), skip=True), None)
        now = self.clock.now()
        first_due = self.boundary_time(boundary)
        steps = self._steps_for(first_due - now, len(due))
        skip = steps is None
        windows = [s.form_window(now, skip=skip) for s in due]
        self._observe_form((self.clock.now() - now) / len(due))
        if skip:
            for w in windows:
                w.session.deliver(w, None)
            # Skipped windows measure nothing; relax the estimate so a pessimistic one (one slow outlier) is
            # re-tested within a few windows instead of skipping forever.
            self._cost_step *= 0.7
            self._cost_fixed *= 0.7
            return
        if steps < self.config.steps:
            for s in due:
                s.counters.reduced_step_windows += 1
        await self._generate(windows, steps)

    async def _run_urgent(self) -> None:
        sessions = [s for s in self._urgent.values() if not s.closed]
        self._urgent.clear()
        now = self.clock.now()
        windows = [s.form_window(now) for s in sessions]
        if windows:
            first_due = min(w.session.slot_time(w.first_slot) for w in windows)
            steps = self._steps_for(first_due - now, len(windows)) or self.config.min_steps
            await self._generate(windows, steps)

    def _steps_for(self, slack: float, windows: int) -> int | None:
        """The behind-schedule policy: the configured steps if they fit before the first frame is due, else fewer;
        None (skip) if even `min_steps` would miss every frame of the window."""
        cfg = self.config
        steps = self.planned_steps(windows)
        while steps > cfg.min_steps and self.predicted_seconds(steps, windows) > slack:
            steps -= 1
        last_frame_slack = slack + (cfg.frames_per_window - 1) / VIDEO_FPS
        if self.predicted_seconds(steps, windows) > last_frame_slack:
            return None
        return steps

    async def _generate(self, windows: list[Window], steps: int) -> None:
        cfg = self.config
        for i in range(0, len(windows), cfg.max_batch):
            batch = [w for w in windows[i : i + cfg.max_batch] if not w.cancelled]
            if not batch:
                continue
            start = self.clock.now()
            for w in batch:
                self.stages["queue_wait"].add(start - w.formed_at)
            try:
                result = await self._model([w.request for w in batch], steps)
            except Exception:  # one bad batch must not stop every session: its windows are skipped, held frames fill
                logger.exception("model call failed; skipping %d window(s)", len(batch))
                self.model_errors += 1
                for w in batch:
                    w.session.counters.skipped_windows += 1
                    w.session.deliver(w, None)
                continue
            self.stages["denoise"].add(result.step_seconds)
            self.stages["decode"].add(result.fixed_seconds)
            self.stages["batch"].add(result.step_seconds + result.fixed_seconds)
            self.batch_sizes[len(batch)] += 1
            self.steps_used[steps] += len(batch)
            self._observe(len(batch), steps, result.step_seconds, result.fixed_seconds)
            for w, out in zip(batch, result.windows):
                w.session.deliver(w, out.frames, out.carry)

    def _observe(self, windows: int, steps: int, step_s: float, fixed_s: float) -> None:
        """Cost model: rises at once on a slow batch, decays slowly, so the lead covers recent worst cases."""
        self._cost_step = _rise_fast(self._cost_step, step_s / (windows * steps))
        self._cost_fixed = _rise_fast(self._cost_fixed, fixed_s / windows)

    def _observe_form(self, seconds: float) -> None:
        self.stages["form"].add(seconds)
        self._cost_form = _rise_fast(self._cost_form, seconds)

    # ---- metrics -----------------------------------------------------------------------------------------------

    def metrics(self) -> EngineMetrics:
        return EngineMetrics(
            stages_ms={name: p.snapshot() for name, p in self.stages.items()},
            batch_sizes=dict(self.batch_sizes),
            steps_used=dict(self.steps_used),
            lead_ms=1000 * self.lead_seconds() if self._cost_step is not None else None,
            model_errors=self.model_errors,
            sessions={s.session_id: s.metrics().to_dict() for s in self._sessions.values()},
        )


def _rise_fast(estimate: float | None, sample: float, decay: float = 0.05) -> float:
    if estimate is None or sample > estimate:
        return sample
    return (1 - decay) * estimate + decay * sample


assert {f.name for f in fields(StreamConfig)} >= PER_SESSION_OPTIONS
