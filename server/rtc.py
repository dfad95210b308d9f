"""aiortc media plumbing: the streaming session's paced output becomes a video track (and, in presenter mode, an
audio track sharing its clock); every incoming track is consumed so aiortc's unbounded receive queues stay empty.
"""
from __future__ import annotations

import asyncio
import fractions
import logging
from typing import AsyncIterator, Protocol

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from avatar.config import AUDIO_SAMPLE_RATE, VIDEO_FPS

logger = logging.getLogger(__name__)

VIDEO_CLOCK = 90_000
OPUS_RATE = 48_000
AUDIO_FRAME_SAMPLES = OPUS_RATE // 50  # 20 ms
QUEUE_FRAMES = 8  # video frames buffered between the session and the encoder (320 ms)


class OutputItem(Protocol):
    image: np.ndarray  # uint8 (H, W, 3)
    index: int  # frame number since the session started; presentation time = index / 25 s
    audio: np.ndarray  # float32 mono 16 kHz covering this frame's 40 ms


class QueueTrack(MediaStreamTrack):
    """A track fed through a bounded queue; `None` ends it."""

    def __init__(self, maxsize: int):
        super().__init__()
        self.queue: asyncio.Queue = asyncio.Queue(maxsize)
        self.dropped = 0

    def offer(self, item) -> None:
        """Enqueue without blocking; if the encoder has fallen behind, the oldest item is dropped."""
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(item)

    async def recv(self):
        item = await self.queue.get()
        if item is None:
            self.stop()
            raise MediaStreamError
        return item

    def finish(self) -> None:
        self.offer(None)


class AvatarVideoTrack(QueueTrack):
    kind = "video"

    def __init__(self):
        super().__init__(QUEUE_FRAMES)

    def push(self, item: OutputItem) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(item.image), format="rgb24")
        frame.pts = item.index * (VIDEO_CLOCK // VIDEO_FPS)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self.offer(frame)


class AvatarAudioTrack(QueueTrack):
    """The audio that drives the lips, resampled to 48 kHz in 20 ms frames, timestamped on the video's clock."""

    kind = "audio"

    def __init__(self):
        super().__init__(QUEUE_FRAMES * 2 + 4)
        self._reset()

    def _reset(self) -> None:
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=OPUS_RATE)
        self._pending = np.zeros(0, np.int16)
        self._next_pts = 0
        self._next_index: int | None = None  # the frame index that continues the stream without a gap

    def push(self, item: OutputItem) -> None:
        if item.index != self._next_index:
            # Start, interrupt or a skipped frame: (re)anchor on the video's clock, which both tracks share (RTCP
            # pairs it with NTP time). In between, the counter runs on, so the resampler's delay leaves no gaps.
            self._next_pts = item.index * OPUS_RATE // VIDEO_FPS - self._pending.size
        self._next_index = item.index + 1
        chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(item.audio, np.float32)[None], format="flt", layout="mono")
        chunk.sample_rate = AUDIO_SAMPLE_RATE
        resampled = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(chunk)]
        self._pending = np.concatenate([self._pending, *resampled]) if resampled else self._pending
        while self._pending.size >= AUDIO_FRAME_SAMPLES:
            samples, self._pending = self._pending[:AUDIO_FRAME_SAMPLES], self._pending[AUDIO_FRAME_SAMPLES:]
            frame = av.AudioFrame.from_ndarray(samples[None], format="s16", layout="mono")
            frame.sample_rate = OPUS_RATE
            frame.pts = self._next_pts
            frame.time_base = fractions.Fraction(1, OPUS_RATE)
            self._next_pts += AUDIO_FRAME_SAMPLES
            self.offer(frame)

    def clear(self) -> None:
        """Barge-in: drop audio not yet sent, so it stops together with the lips."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self._reset()


async def pump_output(items: AsyncIterator[OutputItem], video: AvatarVideoTrack, audio: AvatarAudioTrack | None) -> None:
    """Move the session's paced items into the outgoing tracks until the session ends."""
    try:
        async for item in items:
            video.push(item)
            if audio is not None:
                audio.push(item)
    finally:
        video.finish()
        if audio is not None:
            audio.finish()


async def consume_audio(track: MediaStreamTrack, push) -> None:
    """Feed a remote audio track (Opus decoded to s16 48 kHz, usually stereo) into `push(pcm, rate, channels)`."""
    try:
        while True:
            frame = await track.recv()
            push(frame.to_ndarray().reshape(-1), frame.sample_rate, len(frame.layout.channels))
    except MediaStreamError:
        pass


async def discard(track: MediaStreamTrack) -> None:
    """Read and drop a track we have no use for (e.g. the viewer's camera), keeping its queue empty."""
    try:
        while True:
            await track.recv()
    except MediaStreamError:
        pass
