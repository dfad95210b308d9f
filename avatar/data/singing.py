"""Singing-like material: sustained vowels with pitch contours and vibrato, from a small source-filter synthesiser.

A band-limited glottal pulse train (F0 contour + vibrato + jitter) is shaped by per-vowel formant resonators.
Syllables are an optional nasal onset /m/ (closed lips, hummed) or /l/ followed by a held vowel, so the phoneme
timing is known exactly by construction.
"""
from __future__ import annotations

import numpy as np
from scipy.signal import lfilter

from avatar.data.visemes import PhonemeSpan

SAMPLE_RATE = 16000

# (F1, F2, F3) in Hz, with espeak-style names so visemes.py maps them.
FORMANTS = {"a": (800, 1200, 2600), "e": (450, 2000, 2600), "i": (300, 2300, 3000), "o": (480, 850, 2500),
            "u": (330, 800, 2300), "m": (250, 1100, 2400), "l": (360, 1300, 2700)}
SCALE = np.array([0, 2, 4, 5, 7, 9, 11, 12])  # major scale in semitones


def _resonate(signal: np.ndarray, freq: float, bandwidth: float) -> np.ndarray:
    r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    theta = 2 * np.pi * freq / SAMPLE_RATE
    a = [1.0, -2 * r * np.cos(theta), r * r]
    return lfilter([1.0 - r], a, signal)


def _voiced(f0: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Glottal source: a sum of harmonics with a -12 dB/octave tilt, band-limited below 7 kHz."""
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    out = np.zeros_like(f0)
    for k in range(1, 30):
        audible = (k * f0) < 7000
        out += audible * np.sin(k * phase) / (k ** 1.2)
    return out + rng.normal(0, 0.01, len(f0))


def _segment(name: str, f0: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    source = _voiced(f0, rng)
    out = np.zeros_like(source)
    for formant, gain in zip(FORMANTS[name], (1.0, 0.6, 0.3)):
        out += gain * _resonate(source, formant, 80 + formant * 0.06)
    if name == "m":
        out *= 0.25  # nasal murmur: quiet, lips closed
    return out


def synthesize_song(rng: np.random.Generator, duration: float) -> tuple[np.ndarray, list[PhonemeSpan]]:
    """About `duration` seconds of sung syllables; returns (float32 audio at 16 kHz, phoneme spans)."""
    tonic = float(rng.uniform(110, 330))
    vibrato_rate = float(rng.uniform(4.5, 6.5))
    vibrato_depth = float(rng.uniform(0.2, 0.7))  # semitones
    pieces: list[np.ndarray] = []
    spans: list[PhonemeSpan] = []
    t = 0.0
    degree = int(rng.integers(0, 5))
    while t < duration - 0.3:
        note_len = float(min(rng.choice([0.3, 0.45, 0.6, 0.9, 1.2]), duration - t))
        degree = int(np.clip(degree + rng.integers(-2, 3), 0, len(SCALE) - 1))
        target = tonic * 2 ** (SCALE[degree] / 12)
        n = int(note_len * SAMPLE_RATE)
        time = np.arange(n) / SAMPLE_RATE
        glide = np.exp(-time / 0.05)  # scoop up into the note
        semis = -0.8 * glide + vibrato_depth * np.sin(2 * np.pi * vibrato_rate * time) * np.clip(time / 0.25, 0, 1)
        f0 = target * 2 ** (semis / 12)
        vowel = "aeiou"[int(rng.integers(5))]
        onset = ["m", "l", None][int(rng.integers(3))]
        onset_n = int(0.09 * SAMPLE_RATE) if onset else 0
        audio = np.zeros(n)
        if onset:
            audio[:onset_n] = _segment(onset, f0[:onset_n], rng)
            spans.append(PhonemeSpan(onset, t, t + onset_n / SAMPLE_RATE))
        audio[onset_n:] = _segment(vowel, f0[onset_n:], rng)
        spans.append(PhonemeSpan(vowel + ":", t + onset_n / SAMPLE_RATE, t + note_len))
        envelope = np.clip(time / 0.02, 0, 1) * np.clip((note_len - time) / 0.04, 0, 1)
        pieces.append(audio * envelope)
        t += note_len
        if rng.random() < 0.25:  # a breath
            gap = float(rng.uniform(0.15, 0.4))
            pieces.append(np.zeros(int(gap * SAMPLE_RATE)))
            spans.append(PhonemeSpan("_", t, t + gap))
            t += gap
    audio = np.concatenate(pieces) if pieces else np.zeros(int(duration * SAMPLE_RATE))
    peak = float(np.abs(audio).max()) or 1.0
    return (audio / peak * 0.5).astype(np.float32), spans
