"""One live session: audio in (any format, any chunking), paced frames out, each with the audio of its span.

Timeline. Session frame k is shown at `slot_time(k)` = engine origin + (first global slot + k) / 25 s, computed from
the integer k, so the output never drifts. The model consumes a continuous 16 kHz *stream*: the pushed speech,
with silence inserted wherever speech is missing when a window must be formed. Frame k shows stream samples
[640 k, 640 (k + 1)), and the same samples are returned as that frame's audio, so lips and audio share one clock.

Windows are formed by the engine's worker just in time (see engine.py). Forming window [k0, k0 + F) feeds the
encoder up to sample 640 (k0 + F + c) + lookahead, where c is the number of future context frames waited for:
- enough speech queued: it is used as is;
- none: silence (an idle window: idle speed, silence features, mouth closed);
- some, mid-utterance: silence first, then the speech (right-aligned), which keeps audio-to-lip latency minimal;
- some, and the utterance was ended with `end_of_speech()`: the speech first, then silence.
"""
from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from avatar.config import AUDIO_SAMPLE_RATE, SAMPLES_PER_FRAME, VIDEO_FPS
from avatar.frame_model import AvatarHandle, StreamingAudioEncoder, WindowRequest

from .audio_input import AudioInput
from .clock import Clock
from .config import StreamConfig
from .metrics import Percentiles, SessionCounters, SessionMetrics

SILENCE_RMS = 0.003  # about -50 dBFS: quiet enough to drop while catching up

if TYPE_CHECKING:
    from .engine import StreamingEngine


@dataclass(frozen=True)
class OutputFrame:
    index: int  # frame number in the session; the presentation timestamp is index / 25 s
    image: np.ndarray  # uint8 (H, W, 3) RGB
    audio: np.ndarray  # float32 mono, 640 samples at 16 kHz: exactly the span [index / 25, (index + 1) / 25)
    speaking: bool  # the span contains pushed speech
    held: bool  # no fresh frame was ready in time: the previous image is repeated (behind schedule)
    end_of_speech: bool  # the last sample of an utterance closed with end_of_speech() is in this span
    sample_rate: int = AUDIO_SAMPLE_RATE

    @property
    def pts_seconds(self) -> float:
        return self.index / VIDEO_FPS

    def pts(self, clock_rate: int = 90_000) -> int:
        """Timestamp in units of 1/clock_rate s (90 kHz for RTP video); exact for rates that are multiples of 25."""
        return self.index * clock_rate // VIDEO_FPS


@dataclass
class _Slot:
    audio: np.ndarray
    speaking: bool
    arrival: float | None  # arrival time of the first speech sample in the span
    end_of_speech: bool = False


@dataclass
class _StreamState:
    """The model input stream's bookkeeping; arrays are replaced, never mutated, so snapshots are references."""

    fed: int  # samples fed to the encoder
    audio: np.ndarray  # stream samples [audio_base, fed)
    arrival: np.ndarray  # per sample arrival time, NaN for inserted silence
    audio_base: int
    features: np.ndarray  # float32 (n, D): features of frames [feature_base, feature_base + n)
    feature_base: int
    ends: tuple[int, ...]  # stream indices just after an utterance's last sample
    encoder: object
    carry: object  # the model's state after the last generated window (None before the first)


@dataclass
class Window:
    session: "Session"
    first_slot: int
    index: int
    request: WindowRequest | None  # None for a skipped window
    formed_at: float
    restore: _StreamState  # stream state before this window was formed (barge-in re-forms from here)
    cancelled: bool = False


class Session:
    def __init__(
        self,
        engine: "StreamingEngine",
        session_id: str,
        avatar: AvatarHandle,
        encoder: StreamingAudioEncoder,
        config: StreamConfig,
        audio_context_frames: int,
        clock: Clock,
        origin: float,
        first_global_slot: int,
        seed: int = 0,
    ):
        self.engine, self.session_id, self.avatar, self.config = engine, session_id, avatar, config
        self.seed = seed
        self._clock = clock
        self._origin, self._g0 = origin, first_global_slot
        self._context = audio_context_frames
        self._input = AudioInput()
        self._encoder = encoder
        self._speech: deque[list] = deque()  # [samples, arrival time]
        self._speech_samples = 0
        self._speech_pushed = 0
        self._speech_taken = 0
        self._speech_ends: deque[int] = deque()  # positions in the pushed-speech count where an utterance ended
        self._stream = _StreamState(
            fed=0, audio=np.zeros(0, np.float32), arrival=np.zeros(0), audio_base=0,
            features=np.zeros((0, encoder.feature_dim), np.float32), feature_base=0, ends=(),
            encoder=encoder.snapshot(), carry=None,
        )
        self._next_form = 0  # first slot of the next window to form
        self._windows: deque[Window] = deque()  # formed, not fully emitted
        self._slots: dict[int, _Slot] = {}
        self._frames: dict[int, np.ndarray] = {}
        self._next_slot = 0
        self._last_image = avatar.preview
        self._started_at: float | None = None
        self._closed = False
        self._playout = asyncio.Event()
        self._playout.set()
        self.counters = SessionCounters()
        self.audio_to_lip = Percentiles()

    # ---- input -------------------------------------------------------------------------------------------------

    def push_audio(self, pcm, sample_rate: int = AUDIO_SAMPLE_RATE, channels: int = 1) -> None:
        """Queue speech: int16/float PCM, interleaved, (samples, channels) or s16 bytes; any rate, any chunk size."""
        if self._closed:
            return
        self._append_speech(self._input.convert(pcm, sample_rate, channels))

    def end_of_speech(self) -> None:
        """The utterance is complete: its tail is not waited for, and its last frame is flagged."""
        self._append_speech(self._input.flush())
        if self._speech_samples:
            self._speech_ends.append(self._speech_pushed)
        else:
            fed_speech = np.flatnonzero(~np.isnan(self._stream.arrival))
            if fed_speech.size:  # the utterance is already in the stream: flag its last frame if not yet shown
                end = self._stream.audio_base + int(fed_speech[-1]) + 1
                self._mark_end(end)

    def interrupt(self) -> None:
        """Barge-in: drop queued audio and every frame not yet shown; the mouth closes within one window."""
        self.counters.interrupts += 1
        self._speech.clear()
        self._speech_samples, self._speech_ends = 0, deque()
        self._speech_taken = self._speech_pushed
        self._input.reset()
        unstarted = [w for w in self._windows if w.first_slot >= self._next_slot]
        if unstarted:
            first = unstarted[0]
            for w in unstarted:
                w.cancelled = True
                self._windows.remove(w)
            self._stream = first.restore
            self._next_form = first.first_slot
            for k in [k for k in self._slots if k >= first.first_slot]:
                del self._slots[k]
            for k in [k for k in self._frames if k >= first.first_slot]:
                del self._frames[k]
            self.engine._request_urgent(self)
        self._mute_stream()
        for k, slot in self._slots.items():  # the started window keeps its motion but goes silent
            if k >= self._next_slot:
                slot.audio, slot.speaking, slot.arrival, slot.end_of_speech = (
                    np.zeros_like(slot.audio), False, None, False)
        self._playout.set()

    clear_buffer = interrupt

    @property
    def buffered_seconds(self) -> float:
        """Queued speech not yet taken into the stream."""
        return self._speech_samples / AUDIO_SAMPLE_RATE

    async def wait_for_playout(self) -> None:
        """Until every queued utterance has been shown (or interrupted)."""
        await self._playout.wait()

    def _append_speech(self, mono: np.ndarray) -> None:
        if mono.size == 0:
            return
        self._speech.append([mono, self._clock.now()])
        self._speech_samples += mono.size
        self._speech_pushed += mono.size
        self._playout.clear()
        cap = int(self.config.max_buffered_audio_s * AUDIO_SAMPLE_RATE)
        if self._speech_samples > cap:
            self._drop_speech(self._speech_samples - cap)

    def _drop_speech(self, count: int) -> None:
        self._take_speech(count)
        self.counters.dropped_audio_s += count / AUDIO_SAMPLE_RATE
        while self._speech_ends and self._speech_ends[0] <= self._speech_taken:
            self._speech_ends.popleft()

    def _skip_silence(self, need: int, excess: int) -> None:
        """Live catch-up: latency grows when silence had to be inserted (late packets, a slow window) and the audio
        then arrives in a burst. Drop up to `excess` samples from quiet 10 ms blocks at the head of the queue, so
        the lag shrinks in pauses instead of lasting until the speaker stops for good."""
        block = 160
        scan = min(self._speech_samples, need + excess) // block * block
        if scan == 0:
            return
        taken_before = self._speech_taken
        samples, arrivals = self._take_speech(scan)
        quiet = np.sqrt(np.mean(samples.reshape(-1, block) ** 2, axis=1)) < SILENCE_RMS
        drop = np.zeros(quiet.size, bool)
        drop[np.flatnonzero(quiet)[: excess // block]] = True
        keep = np.repeat(~drop, block)
        kept, kept_arrivals = samples[keep], arrivals[keep]
        runs = np.flatnonzero(np.diff(kept_arrivals)) + 1  # requeue as chunks that each share an arrival time
        for chunk, arrived in reversed(list(zip(np.split(kept, runs), np.split(kept_arrivals, runs)))):
            if chunk.size:
                self._speech.appendleft([chunk, float(arrived[0])])
        dropped = int(drop.sum()) * block
        self._speech_samples += kept.size
        self._speech_taken -= kept.size
        self._speech_pushed -= dropped
        positions = taken_before + np.flatnonzero(~keep)
        self._speech_ends = deque(e - int(np.sum(positions < e)) for e in self._speech_ends)
        self.counters.skipped_silence_s += dropped / AUDIO_SAMPLE_RATE

    def _take_speech(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        samples, arrivals = [], []
        while count > 0:
            chunk, arrived = self._speech[0]
            n = min(count, chunk.size)
            samples.append(chunk[:n])
            arrivals.append(np.full(n, arrived))
            if n == chunk.size:
                self._speech.popleft()
            else:
                self._speech[0][0] = chunk[n:]
            count -= n
            self._speech_samples -= n
            self._speech_taken += n
        if not samples:
            return np.zeros(0, np.float32), np.zeros(0)
        return np.concatenate(samples), np.concatenate(arrivals)

    # ---- window formation (called by the engine's worker) ------------------------------------------------------

    def slot_time(self, k: int) -> float:
        return self._origin + (self._g0 + k) / VIDEO_FPS

    @property
    def next_window_slot(self) -> int:
        return self._next_form

    def form_window(self, now: float, skip: bool = False) -> Window:
        cfg = self.config
        f, c, m = cfg.frames_per_window, cfg.context_lookahead_frames, self._context
        k0 = self._next_form
        before = self._stream
        self._feed_until(SAMPLES_PER_FRAME * (k0 + f + c) + self._encoder.lookahead_samples)
        s = self._stream
        last = k0 + f - 1 + c
        index = np.array([[min(max(t + j, 0), last) for j in range(-m, m + 1)] for t in range(k0, k0 + f)])
        audio = s.features[index - s.feature_base]
        speeds, speaking = [], []
        for t in range(k0, k0 + f):
            lo, hi = SAMPLES_PER_FRAME * t - s.audio_base, SAMPLES_PER_FRAME * (t + 1) - s.audio_base
            arrival = s.arrival[lo:hi]
            speech = arrival[~np.isnan(arrival)]
            ends = any(SAMPLES_PER_FRAME * t < e <= SAMPLES_PER_FRAME * (t + 1) for e in s.ends)
            self._slots[t] = _Slot(s.audio[lo:hi], bool(speech.size), float(speech[0]) if speech.size else None, ends)
            speeds.append(cfg.speech_speed if speech.size else cfg.idle_speed)
            speaking.append(bool(speech.size))
        keep_audio = SAMPLES_PER_FRAME * (k0 + f) - s.audio_base
        keep_features = max(0, k0 + f - m - s.feature_base)
        self._stream = _StreamState(
            fed=s.fed, audio=s.audio[keep_audio:], arrival=s.arrival[keep_audio:],
            audio_base=SAMPLES_PER_FRAME * (k0 + f), features=s.features[keep_features:],
            feature_base=s.feature_base + keep_features,
            ends=tuple(e for e in s.ends if e > SAMPLES_PER_FRAME * (k0 + f)), encoder=s.encoder, carry=s.carry,
        )
        request = None
        if skip:
            self.counters.skipped_windows += 1
        else:
            request = WindowRequest(
                avatar=self.avatar, audio=audio, speaking=np.array(speaking, bool),
                speed=np.array(speeds, np.float32), carry=s.carry, seed=self.seed, index=k0 // f,
            )
        window = Window(self, k0, k0 // f, request, now, before)
        self._windows.append(window)
        self._next_form = k0 + f
        self.counters.windows += 1
        self._purge()
        return window

    def _feed_until(self, total: int) -> None:
        s = self._stream
        need = total - s.fed
        if need <= 0:
            return
        backlog = self.config.max_audio_backlog_s
        if backlog is not None:
            if self._speech_samples - need > SAMPLES_PER_FRAME:  # live input arriving faster than we show it
                self._skip_silence(need, self._speech_samples - need)
            if self._speech_samples - need > backlog * AUDIO_SAMPLE_RATE:
                self._drop_speech(self._speech_samples - need - int(backlog * AUDIO_SAMPLE_RATE))
        avail = min(self._speech_samples, need)
        taken_before = self._speech_taken
        speech, arrival = self._take_speech(avail)
        silence = need - avail
        utterance_ended = bool(self._speech_ends) and self._speech_ends[-1] == self._speech_pushed
        speech_first = silence == 0 or (utterance_ended and self._speech_samples == 0)
        pad, pad_arrival = np.zeros(silence, np.float32), np.full(silence, np.nan)
        if speech_first:
            samples, arrivals, speech_at = np.concatenate([speech, pad]), np.concatenate([arrival, pad_arrival]), s.fed
        else:
            samples, arrivals = np.concatenate([pad, speech]), np.concatenate([pad_arrival, arrival])
            speech_at = s.fed + silence
        ends = list(s.ends)
        while self._speech_ends and self._speech_ends[0] <= self._speech_taken:
            ends.append(speech_at + self._speech_ends.popleft() - taken_before)
        features = np.asarray(self._encoder.push(samples), np.float32).reshape(-1, s.features.shape[1])
        self._stream = _StreamState(
            fed=s.fed + need, audio=np.concatenate([s.audio, samples]), arrival=np.concatenate([s.arrival, arrivals]),
            audio_base=s.audio_base, features=np.concatenate([s.features, features]), feature_base=s.feature_base,
            ends=tuple(ends), encoder=self._encoder.snapshot(), carry=s.carry,
        )

    def _mute_stream(self) -> None:
        s = self._stream
        self._encoder.restore(s.encoder)
        self._stream = _StreamState(
            fed=s.fed, audio=np.zeros_like(s.audio), arrival=np.full(s.arrival.shape, np.nan), audio_base=s.audio_base,
            features=s.features, feature_base=s.feature_base, ends=(), encoder=s.encoder, carry=s.carry,
        )

    def _mark_end(self, end: int) -> None:
        k = (end - 1) // SAMPLES_PER_FRAME
        if k in self._slots:
            self._slots[k].end_of_speech = True
        elif end > self._stream.audio_base:
            self._stream = _StreamState(**{**self._stream.__dict__, "ends": self._stream.ends + (end,)})

    def deliver(self, window: Window, images: np.ndarray | None, carry: object = None) -> None:
        """Frames of a generated window and the model's carry for the next one (None, None for a skipped one)."""
        if window.cancelled or self._closed:
            return
        if images is not None:
            self._stream = _StreamState(**{**self._stream.__dict__, "carry": carry})
        if images is None:
            return
        for i, image in enumerate(images):
            k = window.first_slot + i
            if k < self._next_slot:
                self.counters.late_frames += 1
            else:
                self._frames[k] = image

    def _purge(self) -> None:
        """Forget what can no longer be shown, so nothing grows when nobody reads."""
        horizon = self._wall_slot() - self.config.max_consumer_lag_frames
        for k in [k for k in self._slots if k < horizon]:
            del self._slots[k]
        for k in [k for k in self._frames if k < horizon]:
            del self._frames[k]
        while self._windows and self._windows[0].first_slot + self.config.frames_per_window <= horizon:
            self._windows.popleft()

    def _wall_slot(self) -> int:
        return math.floor((self._clock.now() - self._origin) * VIDEO_FPS) - self._g0

    # ---- output ------------------------------------------------------------------------------------------------

    def __aiter__(self) -> "Session":
        return self

    async def __anext__(self) -> OutputFrame:
        if self._closed:
            raise StopAsyncIteration
        k = self._next_slot
        behind = self._wall_slot() - k
        if behind > self.config.max_consumer_lag_frames:  # a slow reader skips ahead instead of building a backlog
            self.counters.consumer_dropped_frames += behind
            k = self._next_slot = k + behind
            self._purge()
        await self._clock.sleep_until(self.slot_time(k))
        if self._closed:
            raise StopAsyncIteration
        self._next_slot = k + 1
        now = self._clock.now()
        if self._started_at is None:
            self._started_at = now
        image = self._frames.pop(k, None)
        slot = self._slots.pop(k, None) or _Slot(np.zeros(SAMPLES_PER_FRAME, np.float32), False, None)
        held = image is None
        if held:
            image = self._last_image
            self.counters.held_frames += 1
        else:
            self._last_image = image
            if slot.arrival is not None:
                self.audio_to_lip.add(now - slot.arrival)
        c = self.counters
        c.frames_emitted += 1
        if slot.speaking:
            c.speech_frames += 1
        else:
            c.idle_frames += 1
        while self._windows and self._windows[0].first_slot + self.config.frames_per_window <= self._next_slot:
            self._windows.popleft()
        if self._playout_done():
            self._playout.set()
        return OutputFrame(k, image, slot.audio, slot.speaking, held, slot.end_of_speech)

    def _playout_done(self) -> bool:
        if self._speech_samples or np.any(~np.isnan(self._stream.arrival)):
            return False
        return not any(s.speaking for k, s in self._slots.items() if k >= self._next_slot)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._playout.set()
            self.engine._remove_session(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def queue_sizes(self) -> dict[str, int]:
        """Everything this session holds, for the memory-bound tests and for monitoring."""
        return {
            "speech_chunks": len(self._speech),
            "speech_samples": self._speech_samples,
            "stream_samples": int(self._stream.audio.size),
            "features": int(self._stream.features.shape[0]),
            "windows": len(self._windows),
            "slots": len(self._slots),
            "frames": len(self._frames),
            "ends": len(self._stream.ends) + len(self._speech_ends),
        }

    def metrics(self) -> SessionMetrics:
        fps = None
        if self._started_at is not None and self.counters.frames_emitted > 1:
            elapsed = self._clock.now() - self._started_at
            fps = (self.counters.frames_emitted - 1) / elapsed if elapsed > 0 else None
        return SessionMetrics(
            session_id=self.session_id,
            counters=SessionCounters(**self.counters.__dict__),
            audio_to_lip_ms=self.audio_to_lip.snapshot(),
            buffered_audio_s=self.buffered_seconds,
            pending_frames=len(self._frames),
            fps=fps,
        )
