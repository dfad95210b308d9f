"""Phoneme -> mouth shape mapping, coarticulation, and espeak-ng phoneme timing."""
from __future__ import annotations

import numpy as np

from avatar.data.visemes import MOUTH_FIELDS, PhonemeSpan, mouth_track, viseme_for

OPEN = MOUTH_FIELDS.index("mouth_open")
ROUND = MOUTH_FIELDS.index("mouth_round")
WIDTH = MOUTH_FIELDS.index("mouth_width")


def test_bilabials_close_and_open_vowels_open():
    for closed in ("m", "b", "p"):
        assert viseme_for(closed).open == 0.0
    for name in ("a", "a:", "aI", "A:"):
        assert viseme_for(name).open >= 0.8
    assert viseme_for("_").open == 0.0 and viseme_for("_:").open == 0.0


def test_rounded_and_wide_vowels():
    for name in ("o", "u:", "w", "U", "oU"):
        assert viseme_for(name).round >= 0.6
    for name in ("i:", "I", "e", "E"):
        assert viseme_for(name).width >= 0.5 and viseme_for(name).round == 0.0


def _track(names_and_durations, fps=25.0):
    spans, t = [], 0.2
    for name, duration in names_and_durations:
        spans.append(PhonemeSpan(name, t, t + duration))
        t += duration
    frames = int((t + 0.3) * fps)
    return mouth_track(spans, frames, fps), spans


def test_track_is_closed_in_silence_and_at_bilabials():
    track, spans = _track([("m", 0.12), ("a:", 0.3), ("m", 0.12), ("a:", 0.3)])
    frame = lambda t: int(t * 25)  # noqa: E731
    assert track[:3, OPEN].max() < 0.05  # leading silence
    assert track[-3:, OPEN].max() < 0.05  # trailing silence
    middle_of = lambda s: frame((s.start + s.end) / 2)  # noqa: E731
    assert track[middle_of(spans[2]), OPEN] < 0.15
    assert track[middle_of(spans[1]), OPEN] > 0.6 and track[middle_of(spans[3]), OPEN] > 0.6


def test_coarticulation_smooths_transitions():
    track, _ = _track([("a:", 0.3), ("u:", 0.3)])
    steps = np.abs(np.diff(track[:, ROUND]))
    assert steps.max() < 0.6  # no instant jump from spread to fully rounded
    assert track[:, ROUND].max() > 0.8


def test_espeak_phoneme_events_drive_the_mouth():
    from avatar.data.speech import EspeakEngine, Voice

    engine = EspeakEngine.get()
    first = engine.synthesize("Mama, a map.", Voice("en"))
    again = engine.synthesize("Mama, a map.", Voice("en"))
    assert np.array_equal(first.audio, again.audio)  # reproducible call after call
    names = [p.name for p in first.phonemes]
    assert "m" in names and "p" in names
    starts = [p.start for p in first.phonemes]
    assert starts == sorted(starts) and first.phonemes[-1].end <= len(first.audio) / 16000 + 1e-6
    track = mouth_track(first.phonemes, int(len(first.audio) / 640))
    m = next(p for p in first.phonemes if p.name == "m")
    assert track[int((m.start + m.end) / 2 * 25), OPEN] < 0.2
    assert track[:, OPEN].max() > 0.5
