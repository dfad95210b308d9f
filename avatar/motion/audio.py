"""Cheap causal audio features for the motion backbone: 40 log-mels at 10 ms hops, 4 stacked per 25 fps video frame.

Mel frame k covers samples [160 (k + 1) - 400, 160 (k + 1)) (zeros before the start), so video frame n's feature
uses mel frames 4n..4n+3 and no audio past the frame's end: the encoder itself adds no lookahead; the backbone's
±2 context frames add 80 ms.

Gain robustness: each log-mel is taken relative to a causal level tracker, a running peak of the frame energy that
decays by DECAY_DB_PER_S and never falls below FLOOR (so that a microphone's noise floor is not blown up to speech
level). A gain change shifts every log-mel and the tracker by the same amount, so the relative features do not
change while the level is above the floor. One more value per mel frame carries the absolute energy (clipped) so
the model can still tell a noise floor from speech; training varies the gain by ±20 dB so it leans on it lightly.
"""
from __future__ import annotations

import math

import numpy as np

from avatar.errors import EmoteError

SAMPLE_RATE = 16_000
SAMPLES_PER_FRAME = 640
N_MELS = 40
N_FFT = 400
HOP = 160
HOPS_PER_FRAME = SAMPLES_PER_FRAME // HOP
VALUES_PER_HOP = N_MELS + 1
FEATURE_DIM = VALUES_PER_HOP * HOPS_PER_FRAME

_LN10 = math.log(10.0)
DECAY_DB_PER_S = 3.0
_DECAY = DECAY_DB_PER_S / 10.0 * _LN10 / (SAMPLE_RATE / HOP)  # natural-log power units per hop
_EPS = 1e-10
# Tracker floor (log summed mel power): ~35 dB under speech peaks at -18 dBFS RMS, 15 dB over a -60 dBFS noise floor.
FLOOR = -5.0
ABS_CENTER = 0.0  # typical speech energy at -18 dBFS RMS, for the absolute-level value
_REL_LOW, _REL_HIGH, _REL_SCALE = -14.0, 2.0, 4.0
_ABS_LOW, _ABS_HIGH, _ABS_SCALE = -16.0, 6.0, 4.0

_FILTERS: np.ndarray | None = None
_WINDOW = np.hanning(N_FFT + 1)[:-1].astype(np.float64)  # periodic Hann


def _filters() -> np.ndarray:
    global _FILTERS
    if _FILTERS is None:
        from transformers.audio_utils import mel_filter_bank

        _FILTERS = mel_filter_bank(N_FFT // 2 + 1, N_MELS, 40.0, SAMPLE_RATE / 2, SAMPLE_RATE, norm="slaney",
                                   mel_scale="slaney").astype(np.float64)
    return _FILTERS


def check_audio(audio) -> np.ndarray:
    """A finite 1-D float array of samples, or EmoteError."""
    array = np.asarray(audio)
    if array.ndim != 1:
        raise EmoteError(f"audio must be 1-D 16 kHz samples, got shape {list(array.shape)}")
    if not np.issubdtype(array.dtype, np.number):
        raise EmoteError(f"audio must be numeric samples, got dtype {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise EmoteError("audio has non-finite samples (NaN or inf)")
    return array


def _log_mels(history_and_samples: np.ndarray, hops: int) -> np.ndarray:
    """(hops, N_MELS) log-mel power; input holds N_FFT - HOP samples of history, then hops * HOP samples."""
    x = np.asarray(history_and_samples, np.float64)
    idx = np.arange(hops)[:, None] * HOP + np.arange(N_FFT)[None, :]
    spectrum = np.fft.rfft(x[idx] * _WINDOW, axis=1)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    return np.log(power @ _filters() + _EPS)


def _track(energy: np.ndarray, previous: float) -> np.ndarray:
    """r_k = max(FLOOR, e_k, r_{k-1} - DECAY), vectorised from the level `previous` before the first hop."""
    k = np.arange(1, len(energy) + 1, dtype=np.float64)
    peaks = np.maximum.accumulate(energy + _DECAY * k)
    return np.maximum(np.maximum(peaks, previous) - _DECAY * k, FLOOR)


def _features(mels: np.ndarray, level: np.ndarray) -> np.ndarray:
    energy = _hop_energy(mels)
    relative = np.clip(mels - level[:, None], _REL_LOW, _REL_HIGH) / _REL_SCALE
    absolute = np.clip(energy - ABS_CENTER, _ABS_LOW, _ABS_HIGH) / _ABS_SCALE
    per_hop = np.concatenate([relative, absolute[:, None]], axis=1)
    return per_hop.reshape(-1, FEATURE_DIM).astype(np.float32)


def _hop_energy(mels: np.ndarray) -> np.ndarray:
    return np.log(np.exp(mels).sum(axis=1))


def encode_audio(audio: np.ndarray) -> np.ndarray:
    """16 kHz float32 samples -> (ceil(len / 640), FEATURE_DIM) features (the last frame zero-padded)."""
    samples = check_audio(audio)
    frames = -(-len(samples) // SAMPLES_PER_FRAME)
    padded = np.zeros(N_FFT - HOP + frames * SAMPLES_PER_FRAME, np.float64)
    padded[N_FFT - HOP:N_FFT - HOP + len(samples)] = samples
    mels = _log_mels(padded, frames * HOPS_PER_FRAME)
    return _features(mels, _track(_hop_energy(mels), FLOOR))


class StreamingMotionAudioEncoder:
    """Incremental `encode_audio`: push samples as they arrive, get each frame's feature once its 640 samples are in.

    Implements `avatar.frame_model.StreamingAudioEncoder`. Equal to `encode_audio` on the same samples (to float
    rounding, < 1e-5) for every complete frame; `flush()` pads a trailing partial frame with zeros as the offline
    path does.
    """

    feature_dim = FEATURE_DIM
    lookahead_samples = 0  # a frame's feature needs nothing past its end; the ±2 context frames are the model's

    def __init__(self) -> None:
        self._history = np.zeros(N_FFT - HOP, np.float64)
        self._pending = np.zeros(0, np.float64)
        self._level = FLOOR

    def push(self, samples) -> np.ndarray:
        new = check_audio(samples).astype(np.float64)
        self._pending = np.concatenate([self._pending, new])
        frames = len(self._pending) // SAMPLES_PER_FRAME
        if frames == 0:
            return np.zeros((0, FEATURE_DIM), np.float32)
        used = frames * SAMPLES_PER_FRAME
        block = np.concatenate([self._history, self._pending[:used]])
        mels = _log_mels(block, frames * HOPS_PER_FRAME)
        level = _track(_hop_energy(mels), self._level)
        self._level = float(level[-1])
        self._history = block[-(N_FFT - HOP):].copy()
        self._pending = self._pending[used:].copy()
        return _features(mels, level)

    def flush(self) -> np.ndarray:
        """Features of a trailing partial frame, zero-padded (empty when none)."""
        if len(self._pending) == 0:
            return np.zeros((0, FEATURE_DIM), np.float32)
        return self.push(np.zeros(SAMPLES_PER_FRAME - len(self._pending), np.float32))

    def snapshot(self) -> object:
        return (self._history.copy(), self._pending.copy(), self._level)

    def restore(self, snapshot: object) -> None:
        history, pending, level = snapshot  # type: ignore[misc]
        self._history, self._pending, self._level = history.copy(), pending.copy(), float(level)


def context_windows(features: np.ndarray, context: int, end: int | None = None) -> np.ndarray:
    """(N, D) features -> (N, 2 context + 1, D): frame t's features t-context..t+context.

    Indices before 0 repeat frame 0; indices at or past `end` (default N) repeat frame end - 1, the engine's rule
    for future frames it has not waited for.
    """
    n = len(features)
    end = n if end is None else end
    offsets = np.arange(-context, context + 1)
    idx = np.clip(np.arange(n)[:, None] + offsets[None, :], 0, max(end - 1, 0))
    return features[idx]
