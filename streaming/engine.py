"""The engine: one model worker per device, serving many sessions in batched, just-in-time windows.

Scheduling. All sessions share one window grid: boundary G is global frame G*F, shown at origin + G*F/25 s. The
worker forms every session's window for boundary G at `boundary_time(G) - lead`, where lead is the predicted time
to generate the batch plus a margin, and runs them as one `denoise_windows` call (split by `max_batch`). Forming as
late as possible uses the most recent audio, which is what bounds audio-to-lip latency.

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
from typing import Callable

import numpy as np
import torch

from avatar.config import VIDEO_FPS
from avatar.errors import EmoteError
from avatar.media import resize

from .audio_encoder import streaming_encoder_for
from .clock import Clock, MonotonicClock
from .config import StreamConfig
from .metrics import EngineMetrics, Percentiles
from .session import Avatar, Session, Window

logger = logging.getLogger("emote.engine")

PER_SESSION_OPTIONS = {"speech_speed", "idle_speed", "max_buffered_audio_s", "max_audio_backlog_s",
                       "max_consumer_lag_frames"}


class StreamingEngine:
    def __init__(
        self,
        pipeline,
        config: StreamConfig | None = None,
        clock: Clock | None = None,
        threaded: bool = True,
        max_avatars: int = 64,
    ):
        """`pipeline` is an `avatar.pipeline.AvatarPipeline`. `threaded=False` runs the model inline on the event
        loop (deterministic tests with a FakeClock); otherwise it runs on one dedicated thread."""
        self.pipeline = pipeline
        self.config = (config or StreamConfig()).resolve(pipeline.config)
        self.clock = clock or MonotonicClock()
        self.max_avatars = max_avatars
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="emote-model") if threaded else None
        self._avatars: OrderedDict[str, Avatar] = OrderedDict()
        self._sessions: dict[str, Session] = {}
        self._ids = itertools.count()
        self._origin: float | None = None
        self._next_boundary = 0
        self._urgent: dict[str, Session] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._cost_step: float | None = None  # seconds per window per step (incl. motion features)
        self._cost_fixed: float | None = None  # seconds per window: decode
        self._cost_form = 0.0  # seconds per window: audio encoding and bookkeeping
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
            if self.pipeline.device.type == "cpu":
                # Process-wide, so set once before the worker runs (changing it under a running model stalls it).
                torch.set_num_threads(self.config.model_threads)
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
        cfg = self.pipeline.config
        portrait = np.full((cfg.resolution, cfg.resolution, 3), 128, np.uint8)
        reference = await self._call(lambda: self.pipeline.prepare_reference(portrait))
        f, steps = self.config.frames_per_window, self.config.steps
        from avatar.pipeline import WindowInput

        dim = self.pipeline.audio_encoder.feature_dim
        window = WindowInput(reference, torch.zeros(f, cfg.audio_tokens_per_frame, dim), torch.zeros(f), None, 0)
        await self._model([window], steps)
        step_s, decode_s = [], []
        for _ in range(3):  # the fastest of three: a busy machine only ever adds time
            _, _, denoise, decode = await self._model([window], steps)
            step_s.append(denoise / steps)
            decode_s.append(decode)
        self.set_costs(min(step_s), min(decode_s))

    async def _call(self, fn: Callable):
        if self._executor is None:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _model(self, inputs, steps: int):
        """Denoise + decode a batch off the event loop -> (images, latents, denoise s, decode s)."""
        result = await self._call(lambda: self._run_model(inputs, steps))
        simulated = getattr(self.pipeline, "take_simulated_seconds", None)
        if simulated is None:
            return result
        images, latents, denoise_s, decode_s = result
        extra_denoise, extra_decode = simulated()  # a simulated model's cost, waited out on the (fake) clock
        await self.clock.sleep_until(self.clock.now() + extra_denoise + extra_decode)
        return images, latents, denoise_s + extra_denoise, decode_s + extra_decode

    # ---- avatars and sessions ----------------------------------------------------------------------------------

    async def add_avatar(self, avatar_id: str, portrait: np.ndarray, face_box=None) -> Avatar:
        """Prepare a portrait once (ReferenceNet); later calls with the same id return the cached avatar."""
        if avatar_id in self._avatars:
            self._avatars.move_to_end(avatar_id)
            return self._avatars[avatar_id]
        reference = await self._call(lambda: self.pipeline.prepare_reference(portrait, face_box))
        avatar = Avatar(avatar_id, reference, np.array(resize(portrait, self.pipeline.config.resolution)))
        self._avatars[avatar_id] = avatar
        self._evict_avatars()
        return avatar

    def register_avatar(self, avatar: Avatar) -> Avatar:
        """Register an avatar whose ReferenceCache was computed (or loaded from disk) elsewhere, e.g. by the server."""
        self._avatars[avatar.avatar_id] = avatar
        self._avatars.move_to_end(avatar.avatar_id)
        self._evict_avatars()
        return avatar

    def avatar(self, avatar_id: str) -> Avatar:
        try:
            return self._avatars[avatar_id]
        except KeyError:
            raise EmoteError(f"unknown avatar {avatar_id!r}") from None

    def remove_avatar(self, avatar_id: str) -> None:
        """Forget an avatar; sessions already using it keep their (shared) reference until they close."""
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
        config = replace(self.config, **options).resolve(self.pipeline.config)
        boundary = max(self._next_boundary, self._first_formable_boundary())
        session = Session(
            self, session_id, self.avatar(avatar_id), streaming_encoder_for(self.pipeline.audio_encoder), config,
            self.pipeline.config.audio_context_frames, self.clock, self._origin,
            boundary * self.config.frames_per_window, seed,
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
                session.deliver(session.form_window(self.clock.now(), skip=True), None, None)
        now = self.clock.now()
        first_due = self.boundary_time(boundary)
        steps = self._steps_for(first_due - now, len(due))
        skip = steps is None
        windows = [s.form_window(now, skip=skip) for s in due]
        self._observe_form((self.clock.now() - now) / len(due))
        if skip:
            for w in windows:
                w.session.deliver(w, None, None)
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
                images, latents, denoise_s, decode_s = await self._model([w.inputs for w in batch], steps)
            except Exception:  # one bad batch must not stop every session: its windows are skipped, held frames fill
                logger.exception("model call failed; skipping %d window(s)", len(batch))
                self.model_errors += 1
                for w in batch:
                    w.session.counters.skipped_windows += 1
                    w.session.deliver(w, None, None)
                continue
            self.stages["denoise"].add(denoise_s)
            self.stages["decode"].add(decode_s)
            self.stages["batch"].add(denoise_s + decode_s)
            self.batch_sizes[len(batch)] += 1
            self.steps_used[steps] += len(batch)
            self._observe(len(batch), steps, denoise_s, decode_s)
            for j, w in enumerate(batch):
                w.session.deliver(w, images[j], latents[j])

    def _run_model(self, inputs, steps: int):
        # Durations on the engine's clock: wall time in production, virtual time (a simulated model) in tests.
        t0 = self.clock.now()
        latents = self.pipeline.denoise_windows(inputs, steps=steps, strength=self.config.strength)
        t1 = self.clock.now()
        b, f = latents.shape[:2]
        references = [w.reference for w in inputs for _ in range(f)]
        audio = torch.cat([w.audio for w in inputs]) if self.config.refine else None  # what a refiner may hear
        images = self.pipeline.decode(latents.flatten(0, 1), references, refine=self.config.refine, audio=audio)
        images = images.reshape(b, f, *images.shape[1:])
        return images, latents.cpu(), t1 - t0, self.clock.now() - t1

    def _observe(self, windows: int, steps: int, denoise_s: float, decode_s: float) -> None:
        """Cost model: rises at once on a slow batch, decays slowly, so the lead covers recent worst cases."""
        self._cost_step = _rise_fast(self._cost_step, denoise_s / (windows * steps))
        self._cost_fixed = _rise_fast(self._cost_fixed, decode_s / windows)

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
