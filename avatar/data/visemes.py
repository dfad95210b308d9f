"""Phonemes -> mouth shapes, with coarticulation.

Phoneme names are espeak-ng mnemonics (e.g. "m", "a#", "oU", "i:", "_:"). Each phoneme has a target mouth shape
and a dominance; the mouth track is the dominance-weighted blend of all targets (Cohen-Massaro style), so
neighbouring phonemes pull on each other while strongly dominant ones (lip closures) still reach their target.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avatar.motion.spec import MOUTH_NAMES

MOUTH_FIELDS = MOUTH_NAMES


@dataclass(frozen=True)
class Viseme:
    open: float
    width: float
    round: float
    teeth: float
    tongue: float
    dominance: float = 1.0

    def vector(self) -> tuple[float, float, float, float, float]:
        return (self.open, self.width, self.round, self.teeth, self.tongue)


SILENCE = Viseme(0.0, 0.0, 0.0, 0.0, 0.0, dominance=1.5)
NEUTRAL = Viseme(0.25, 0.0, 0.0, 0.3, 0.1, dominance=0.6)

# Vowel targets keyed by the base letter of the espeak mnemonic.
VOWELS: dict[str, Viseme] = {
    "a": Viseme(0.9, 0.2, 0.0, 0.5, 0.3),
    "A": Viseme(0.95, 0.0, 0.1, 0.4, 0.3),
    "&": Viseme(0.8, 0.4, 0.0, 0.6, 0.3),
    "V": Viseme(0.7, 0.1, 0.0, 0.5, 0.3),
    "e": Viseme(0.45, 0.7, 0.0, 0.8, 0.3),
    "E": Viseme(0.55, 0.6, 0.0, 0.7, 0.3),
    "3": Viseme(0.4, 0.1, 0.3, 0.5, 0.2),
    "@": Viseme(0.35, 0.1, 0.0, 0.4, 0.2),
    "i": Viseme(0.2, 1.0, 0.0, 0.9, 0.1),
    "I": Viseme(0.25, 0.8, 0.0, 0.8, 0.1),
    "o": Viseme(0.5, -0.6, 0.8, 0.2, 0.1),
    "O": Viseme(0.65, -0.4, 0.65, 0.3, 0.2),
    "0": Viseme(0.7, -0.3, 0.5, 0.3, 0.2),
    "u": Viseme(0.2, -1.0, 1.0, 0.0, 0.0),
    "U": Viseme(0.25, -0.8, 0.9, 0.1, 0.0),
    "y": Viseme(0.2, -0.9, 1.0, 0.1, 0.0),
    "Y": Viseme(0.3, -0.7, 0.85, 0.1, 0.0),
    "W": Viseme(0.4, -0.5, 0.7, 0.2, 0.1),
}

CONSONANTS: dict[str, Viseme] = {
    **{c: Viseme(0.0, 0.0, 0.0, 0.0, 0.0, dominance=3.0) for c in ("m", "b", "p")},
    **{c: Viseme(0.1, 0.1, 0.0, 1.0, 0.0, dominance=3.0) for c in ("f", "v")},
    "w": Viseme(0.15, -1.0, 1.0, 0.0, 0.0, dominance=3.0),
    **{c: Viseme(0.2, -0.4, 0.6, 0.9, 0.2, dominance=2.0) for c in ("S", "Z", "tS", "dZ")},
    **{c: Viseme(0.2, 0.2, 0.0, 0.9, 0.9, dominance=1.5) for c in ("T", "D")},
    **{c: Viseme(0.15, 0.3, 0.0, 1.0, 0.2, dominance=1.2) for c in ("s", "z", "ts", "dz")},
    **{c: Viseme(0.2, 0.1, 0.0, 0.7, 0.6, dominance=0.8) for c in ("t", "d", "n", "l", "r", "R", "l/", "r-")},
    **{c: Viseme(0.3, 0.0, 0.0, 0.5, 0.2, dominance=0.5) for c in ("k", "g", "N", "x", "h", "j", "C", "Q", "?", "n^")},
}

VOWEL_LETTERS = frozenset(VOWELS)


def _strip(name: str) -> str:
    return "".join(ch for ch in name if ch not in ":#~-'\",.;!%=^*")


def viseme_sequence(name: str) -> list[Viseme]:
    """The mouth target(s) for one espeak phoneme; diphthongs give two targets in order."""
    if not name or name.startswith("_") or name in ("||", "|"):
        return [SILENCE]
    if name in CONSONANTS:
        return [CONSONANTS[name]]
    core = _strip(name)
    if core in CONSONANTS:
        return [CONSONANTS[core]]
    vowels = [VOWELS[ch] for ch in core if ch in VOWEL_LETTERS]
    if vowels:
        return vowels[:2]
    if core[:1] in CONSONANTS:
        return [CONSONANTS[core[:1]]]
    return [NEUTRAL]


def viseme_for(name: str) -> Viseme:
    """The main mouth target of one phoneme (the first part of a diphthong)."""
    return viseme_sequence(name)[0]


@dataclass(frozen=True)
class PhonemeSpan:
    """One phoneme (or silence, name "_") from start to end, in seconds."""

    name: str
    start: float
    end: float


def mouth_track(spans: list[PhonemeSpan], num_frames: int, fps: float = 25.0, spread: float = 0.03) -> np.ndarray:
    """Per-frame mouth parameters [num_frames, 5] in MOUTH_FIELDS order.

    Each target's dominance decays exponentially (time constant `spread` seconds) outside its span. Frames not
    covered by any span count as silence.
    """
    targets: list[tuple[float, float, Viseme]] = []
    for span in spans:
        parts = viseme_sequence(span.name)
        step = (span.end - span.start) / len(parts)
        for k, vis in enumerate(parts):
            targets.append((span.start + k * step, span.start + (k + 1) * step, vis))
    times = (np.arange(num_frames, dtype=np.float64) + 0.5) / fps
    if not targets:
        return np.zeros((num_frames, len(MOUTH_FIELDS)), dtype=np.float32)
    starts = np.array([t[0] for t in targets])[:, None]
    ends = np.array([t[1] for t in targets])[:, None]
    dominance = np.array([t[2].dominance for t in targets])[:, None]
    values = np.array([t[2].vector() for t in targets])  # [T, 5]
    outside = np.maximum(starts - times[None, :], 0.0) + np.maximum(times[None, :] - ends, 0.0)
    weight = dominance * np.exp(-outside / spread)  # [T, F]
    # Silence before the first and after the last span.
    lead = np.where(times < starts.min(), 1.0, np.exp(-np.maximum(times - starts.min(), 0) / spread)) * 1.5
    tail = np.where(times > ends.max(), 1.0, np.exp(-np.maximum(ends.max() - times, 0) / spread)) * 1.5
    weight = np.vstack([weight, lead[None, :], tail[None, :]])
    values = np.vstack([values, np.zeros((2, values.shape[1]))])
    track = (weight[:, :, None] * values[:, None, :]).sum(0) / (weight.sum(0)[:, None] + 1e-9)
    return track.astype(np.float32)
