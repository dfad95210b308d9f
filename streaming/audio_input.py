"""Any PCM chunk -> 16 kHz mono float32: int16/float, interleaved or (samples, channels), bytes, any rate or size."""
from __future__ import annotations

import av
import numpy as np

from avatar.config import AUDIO_SAMPLE_RATE
from avatar.errors import EmoteError


class AudioInput:
    """Stateful converter: keeps a partial sample of a `bytes` chunk and the resampler's filter state between calls."""

    def __init__(self, target_rate: int = AUDIO_SAMPLE_RATE):
        self.target_rate = target_rate
        self._resampler: av.AudioResampler | None = None
        self._rate: int | None = None
        self._leftover = b""

    def convert(self, pcm, sample_rate: int, channels: int = 1) -> np.ndarray:
        if sample_rate <= 0 or channels <= 0:
            raise EmoteError(f"bad audio format: {sample_rate} Hz, {channels} channels")
        if isinstance(pcm, (bytes, bytearray, memoryview)):
            data = self._leftover + bytes(pcm)
            usable = len(data) // (2 * channels) * (2 * channels)
            self._leftover = data[usable:]
            pcm = np.frombuffer(data[:usable], dtype=np.int16)
        samples = np.asarray(pcm)
        if samples.dtype == np.int16:
            samples = samples.astype(np.float32) / 32768.0
        elif samples.dtype.kind == "i":
            samples = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max + 1)
        elif samples.dtype.kind == "f":
            # Float PCM from a library caller may hold NaN/inf or overshoot: one bad chunk must not stop the engine.
            samples = np.clip(np.nan_to_num(samples.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
        else:
            raise EmoteError(f"unsupported PCM dtype {samples.dtype}")
        if samples.ndim == 1:
            if samples.size % channels:
                raise EmoteError(f"{samples.size} interleaved samples do not divide into {channels} channels")
            samples = samples.reshape(-1, channels)
        elif samples.ndim != 2 or samples.shape[1] != channels:
            raise EmoteError(f"PCM of shape {samples.shape} does not match {channels} channels")
        mono = samples.mean(axis=1, dtype=np.float32) if channels > 1 else samples[:, 0]
        return self._resample(np.ascontiguousarray(mono, dtype=np.float32), sample_rate)

    def _resample(self, mono: np.ndarray, rate: int) -> np.ndarray:
        if rate == self.target_rate and self._resampler is None:
            return mono.copy()
        if rate != self._rate:
            tail = self.flush()  # a format change mid-stream: finish the old resampler's filter first
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=self.target_rate)
            self._rate = rate
            if rate == self.target_rate:
                self._resampler = None
                return np.concatenate([tail, mono])
        else:
            tail = np.zeros(0, np.float32)
        if mono.size == 0:
            return tail
        frame = av.AudioFrame.from_ndarray(mono[None], format="flt", layout="mono")
        frame.sample_rate = rate
        out = [tail] + [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out).astype(np.float32, copy=False)

    def flush(self) -> np.ndarray:
        """Drain the resampler's delay line (end of speech); the next chunk starts a fresh resampler."""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(None)]
        self._resampler, self._rate = None, None
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def reset(self) -> None:
        self._resampler, self._rate, self._leftover = None, None, b""
