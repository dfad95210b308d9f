"""Kiosk input: a local microphone (sounddevice/PortAudio) feeding a session.

PortAudio calls back on its own thread; blocks go into a bounded deque (the oldest block is dropped when the event
loop falls behind, and counted), and a pump task on the event loop pushes them into the session.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Callable

import numpy as np

from .session import Session


class KioskAudioSource:
    def __init__(
        self,
        session: Session,
        device: int | str | None = None,
        sample_rate: int | None = None,
        channels: int = 1,
        block_ms: int = 20,
        max_queued_blocks: int = 50,
        stream_factory: Callable | None = None,
    ):
        """`stream_factory` builds the input stream (default `sounddevice.InputStream`); tests inject a fake."""
        self.session = session
        self.device, self.channels, self.block_ms = device, channels, block_ms
        self.sample_rate = sample_rate
        self._factory = stream_factory
        self._blocks: deque[np.ndarray] = deque(maxlen=max_queued_blocks)
        self._lock = threading.Lock()
        self._stream = None
        self._pump: asyncio.Task | None = None
        self._ready: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dropped_blocks = 0
        self.device_overflows = 0
        self.blocks_received = 0

    async def start(self) -> "KioskAudioSource":
        factory = self._factory
        if factory is None:
            import sounddevice

            factory = sounddevice.InputStream
            if self.sample_rate is None:
                self.sample_rate = int(sounddevice.query_devices(self.device, "input")["default_samplerate"])
        self.sample_rate = self.sample_rate or 48_000
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._stream = factory(
            device=self.device, samplerate=self.sample_rate, channels=self.channels, dtype="int16",
            blocksize=self.sample_rate * self.block_ms // 1000, callback=self._callback,
        )
        self._stream.start()
        self._pump = asyncio.ensure_future(self._run())
        return self

    def _callback(self, indata, frames, time_info, status) -> None:
        """PortAudio thread: copy the block and wake the pump; never blocks."""
        if status:
            self.device_overflows += 1
        with self._lock:
            if len(self._blocks) == self._blocks.maxlen:
                self.dropped_blocks += 1
            self._blocks.append(np.array(indata, dtype=np.int16, copy=True).reshape(-1, self.channels))
            self.blocks_received += 1
        self._loop.call_soon_threadsafe(self._ready.set)

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            with self._lock:
                blocks = list(self._blocks)
                self._blocks.clear()
            for block in blocks:
                self.session.push_audio(block, self.sample_rate, self.channels)

    async def stop(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None
        if self._pump is not None:
            self._pump.cancel()
            try:
                await self._pump
            except asyncio.CancelledError:
                pass
            self._pump = None

    async def __aenter__(self) -> "KioskAudioSource":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()
