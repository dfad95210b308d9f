"""Test doubles for the streaming engine, usable by transport tests too: a simulated-cost pipeline wrapper, a fast
stub pipeline and a fake PortAudio input stream. (`FakeClock` lives in clock.py.)"""
from __future__ import annotations

import threading
from collections import deque

import numpy as np
import torch



class SimulatedPipeline:
    """Wraps a real pipeline: each denoise/decode call owes a simulated cost, which the engine then waits out on its
    clock (`take_simulated_seconds`) while the pacers keep running, as they would beside a model thread. The latest
    windows, seeds and latents are recorded (bounded)."""

    def __init__(self, pipeline, seconds_per_step: float = 0.0, decode_seconds_per_frame: float = 0.0,
                 record: int = 64):
        self.inner = pipeline
        self.seconds_per_step, self.decode_seconds_per_frame = seconds_per_step, decode_seconds_per_frame
        self.calls: deque[tuple[int, int]] = deque(maxlen=record)  # (batch size, steps)
        self.latents: deque[tuple[int, torch.Tensor]] = deque(maxlen=record)  # (seed, latents)
        self.windows: deque = deque(maxlen=record)
        self._owed = [0.0, 0.0]

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def take_simulated_seconds(self) -> tuple[float, float]:
        """(denoise, decode) seconds owed since the last call."""
        owed, self._owed = tuple(self._owed), [0.0, 0.0]
        return owed

    def _record(self, windows, steps) -> None:
        self._owed[0] += self.seconds_per_step * steps * len(windows)
        self.calls.append((len(windows), steps))
        self.windows.extend(windows)

    def denoise_windows(self, windows, steps=None, **kwargs):
        steps = steps or self.inner.default_steps
        out = self.inner.denoise_windows(windows, steps=steps, **kwargs)
        self._record(windows, steps)
        for w, latents in zip(windows, out):
            self.latents.append((w.seed, latents.clone()))
        return out

    def decode(self, latents, references, refine=True, audio=None):
        self._owed[1] += self.decode_seconds_per_frame * latents.shape[0]
        return self.inner.decode(latents, references, refine=refine, audio=audio)


class StubPipeline(SimulatedPipeline):
    """No network: latents are zeros whose first value is the window's seed (mod 1000); decoding paints each frame
    with it. Microseconds per window, for long simulated runs."""

    def denoise_windows(self, windows, steps=None, **kwargs):
        cfg = self.inner.config
        shape = (len(windows), windows[0].audio.shape[0], cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        out = torch.zeros(shape)
        for i, w in enumerate(windows):
            out[i, :, 0, 0, 0] = w.seed % 1000
        self._record(windows, steps or self.inner.default_steps)
        return out

    def decode(self, latents, references, refine=True, audio=None):
        self._owed[1] += self.decode_seconds_per_frame * latents.shape[0]
        r = self.inner.config.resolution
        values = (latents[:, 0, 0, 0].numpy() % 256).astype(np.uint8)
        return np.broadcast_to(values[:, None, None, None], (latents.shape[0], r, r, 3)).copy()


class FakeInputStream:
    """Stands in for sounddevice.InputStream: `feed(block)` delivers a block from another thread, like PortAudio."""

    instances: list["FakeInputStream"] = []

    def __init__(self, device=None, samplerate=48000, channels=1, dtype="int16", blocksize=960, callback=None):
        self.samplerate, self.channels, self.blocksize, self.callback = samplerate, channels, blocksize, callback
        self.started = self.closed = False
        FakeInputStream.instances.append(self)

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False

    def close(self) -> None:
        self.closed = True

    def feed(self, block: np.ndarray, status: int = 0) -> None:
        thread = threading.Thread(target=self.callback, args=(block.reshape(-1, self.channels), len(block), None, status))
        thread.start()
        thread.join()
