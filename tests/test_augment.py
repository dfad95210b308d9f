"""Audio augmentations keep timing and level; the training-clip generator is seeded and labels the mouth."""
from __future__ import annotations

import numpy as np
import pytest

from avatar.data import augment
from avatar.data.motion import HOP, prosody
from avatar.data.speech import is_heldout_sentence
from avatar.data.visemes import PhonemeSpan
from avatar.errors import EmoteError
from avatar.motion import spec

SR = 16000


def _click(n: int = SR, at: int = 8000) -> np.ndarray:
    audio = np.zeros(n, np.float32)
    audio[at], audio[at + 1] = 0.8, -0.4
    return audio


def _tone(seconds: float, f0: float = 150.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.2 * sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8))).astype(np.float32)


def _bursts(onsets: list[float], seconds: float = 2.0) -> np.ndarray:
    """Broadband noise bursts of 120 ms (fricative-like) starting at `onsets`."""
    rng = np.random.default_rng(5)
    audio = np.zeros(int(seconds * SR), np.float32)
    for onset in onsets:
        audio[int(onset * SR): int((onset + 0.12) * SR)] = rng.normal(0, 0.1, int(0.12 * SR))
    return audio


def _onsets(audio: np.ndarray) -> np.ndarray:
    """Starts (s) of the regions louder than -20 dB below the peak, from 2 ms frames."""
    frames = np.abs(audio[: len(audio) // 32 * 32]).reshape(-1, 32).max(1)
    loud = frames > frames.max() * 0.1
    starts = np.flatnonzero(loud[1:] & ~loud[:-1]) * 32 / SR + 32 / SR
    return np.array([t for k, t in enumerate(starts) if k == 0 or t - starts[k - 1] > 0.2])  # not dips inside


@pytest.mark.parametrize("bitrate,complexity", [(16000, 9), (24000, 2), (64000, 10)])
def test_opus_round_trip_keeps_timing_and_level(bitrate, complexity):
    out = augment.opus_roundtrip(_click(), bitrate, complexity=complexity)
    assert out.dtype == np.float32 and len(out) == SR
    assert abs(int(np.argmax(np.abs(out))) - 8000) <= 16  # within 1 ms
    tone = _tone(2.0)
    coded = augment.opus_roundtrip(tone, bitrate, complexity=complexity)
    level_db = 20 * np.log10(np.sqrt(np.mean(coded[SR // 4:] ** 2)) / np.sqrt(np.mean(tone[SR // 4:] ** 2)))
    assert abs(level_db) < 1.0
    # The waveform itself lines up (no sub-frame shift): the coded tone correlates best at lag 0.
    lags = range(-8, 9)
    corr = [float(np.dot(tone[SR // 4 + 8: -SR // 4], coded[SR // 4 + 8 + lag: -SR // 4 + lag])) for lag in lags]
    assert list(lags)[int(np.argmax(corr))] == 0


def test_filters_reverb_and_clipping_keep_length_and_onset():
    rng = np.random.default_rng(0)
    click = _click()
    for kind in augment.BAND_KINDS:
        out, info = augment.band_limit(click, rng, kind)
        assert len(out) == len(click) and abs(int(np.argmax(np.abs(out))) - 8000) <= 16, kind
    wet, info = augment.reverb(click, rng, rt60=0.6)
    assert len(wet) == len(click) and int(np.argmax(np.abs(wet))) == 8000
    tail = wet[8000 + int(0.05 * SR): 8000 + int(0.3 * SR)]
    assert np.abs(tail).max() > 1e-3 and np.abs(wet[:8000]).max() < 1e-6  # a room tail after, nothing before
    loud = augment.gain(_tone(0.5), 20.0)
    clipped = augment.soft_clip(loud, 0.7)
    assert np.abs(clipped).max() <= 1.0 and np.array_equal(augment.soft_clip(loud * 0.01, 0.7), loud * 0.01)


def test_noise_is_added_at_the_requested_snr():
    rng = np.random.default_rng(1)
    speech = _tone(2.0)
    for kind in augment.NOISE_KINDS:
        noisy, info = augment.add_noise(speech, rng, snr_db=10.0, kind=kind)
        noise = noisy - speech
        snr = 10 * np.log10(np.mean(speech ** 2) / np.mean(noise ** 2))
        assert abs(snr - 10.0) < 0.5, kind
    floor, info = augment.noise_floor(SR, rng, level_db=-60.0)
    assert abs(20 * np.log10(np.sqrt(np.mean(floor ** 2))) + 60.0) < 0.5


@pytest.mark.parametrize("rate", [0.8, 1.25])
def test_tempo_change_rescales_spans_consistently(rate):
    onsets = [0.3, 0.8, 1.4]
    audio = _bursts(onsets)
    spans = [PhonemeSpan("a", t, t + 0.12) for t in onsets]
    out, scale = augment.change_tempo(audio, rate)
    assert len(out) == round(len(audio) / rate) and abs(scale - 1 / rate) < 1e-3
    moved = augment.rescale_spans(spans, scale)
    assert len(_onsets(out)) == len(onsets)
    for span in moved:  # the stretch smears edges by half a window, symmetrically: compare energy centres
        a, b = int((span.start - 0.1) * SR), int((span.end + 0.1) * SR)
        energy = out[a:b].astype(np.float64) ** 2
        centre = (a + np.sum(np.arange(len(energy)) * energy) / energy.sum()) / SR
        assert abs(centre - (span.start + span.end) / 2) < 0.008  # within a fifth of a frame
    assert all(abs((m.end - m.start) - 0.12 * scale) < 1e-9 for m in moved)


def test_pitch_and_formant_shift_change_what_they_say():
    voiced = _tone(1.5, 150.0)
    frames = len(voiced) // HOP

    def median_f0(audio):
        _, f0, is_voiced = prosody(audio, frames)
        return float(np.median(f0[is_voiced]))

    up = augment.pitch_shift(voiced, 4.0)
    assert len(up) == len(voiced) and 1.15 < median_f0(up) / median_f0(voiced) < 1.4
    shifted = augment.formant_shift(voiced, 1.15)
    assert len(shifted) == len(voiced) and abs(median_f0(shifted) / median_f0(voiced) - 1) < 0.05
    assert not np.allclose(shifted, voiced, atol=1e-3)


def _source_kind(seed: int, index: int) -> str:
    """Which source training_clip picks: its first random draw is the source roll (outside the held-out split)."""
    roll = np.random.default_rng([seed, 0xA06, index]).random()
    edges = np.cumsum([augment.SPEECH_SHARE, augment.VOICES_SHARE, augment.SINGING_SHARE, augment.NONSPEECH_SHARE])
    return ["speech", "voices", "singing", "nonspeech", "silence"][int(np.searchsorted(edges, roll, side="right"))]


def _first(kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    index = next(i for i in range(200) if _source_kind(seed, i) == kind)
    return augment.training_clip(seed, index)


@pytest.mark.parametrize("kind", ["nonspeech", "silence"])
def test_nonspeech_and_silence_clips_keep_the_mouth_closed(kind):
    audio, motion, meta = _first(kind)
    assert meta["kind"] == kind and meta["phonemes"] == []
    mouth = motion[:, [spec.INDEX[name] for name in spec.MOUTH_NAMES]]
    assert np.all(mouth == 0.0)
    assert np.all(np.abs(audio).reshape(-1, HOP).max(1) > 0.0)  # never digital zero, in any frame
    assert motion[:, spec.INDEX["blink"]].max() > 0.5  # the eyes still blink
    assert np.ptp(motion[:, spec.INDEX["yaw"]]) > 0.5  # and the head still moves


def test_training_clip_is_seeded_shaped_and_labelled():
    audio, motion, meta = augment.training_clip(3, 5)
    again = augment.training_clip(3, 5)
    assert np.array_equal(audio, again[0]) and np.array_equal(motion, again[1]) and meta == again[2]
    index = next(i for i in range(200) if _source_kind(3, i) == "voices")  # festival/flite and Opus are seeded too
    first, second = augment.training_clip(3, index), augment.training_clip(3, index)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]
    other = augment.training_clip(3, 6)
    assert len(other[0]) != len(audio) or not np.array_equal(other[0], audio)
    for a, m, info in (audio, motion, meta), other:
        assert a.dtype == np.float32 and m.dtype == np.float32 and len(a) == m.shape[0] * HOP
        spec.check(m)
        assert np.array_equal(spec.clip(m), m) and np.abs(a).max() <= 1.0
        assert info["kind"] in ("speech", "singing", "nonspeech", "silence") and "augment" in info


def test_speech_clip_mouth_follows_its_phonemes():
    audio, motion, meta = _first("voices")
    assert meta["kind"] == "speech" and meta["voice"]["name"].split(":")[0] in ("festival", "flite")
    opening = motion[:, spec.INDEX["mouth_open"]]
    speaking = np.zeros(len(opening), bool)
    for name, start, end in meta["phonemes"]:
        if name != "_":
            speaking[int(start * 25): int(np.ceil(end * 25))] = True
    assert opening[speaking].mean() > 0.2 and opening[~speaking].mean() < 0.5 * opening[speaking].mean()
    assert meta["phonemes"][-1][2] <= len(audio) / SR + 1e-3


def test_heldout_clips_are_english_espeak_with_heldout_sentences():
    for index in range(2):
        _, _, meta = augment.training_clip(0, index, heldout=True)
        assert meta["kind"] == "speech" and meta["voice"]["name"].startswith("espeak-ng:en")
        assert all(is_heldout_sentence(text) for text in meta["texts"])
        assert meta["identity"] % 10 == 9


def test_bad_input_raises_emote_error():
    rng = np.random.default_rng(0)
    with pytest.raises(EmoteError):
        augment.time_stretch(_tone(0.5), 10.0)
    with pytest.raises(EmoteError):
        augment.soft_clip(_tone(0.5), 1.5)
    with pytest.raises(EmoteError):
        augment.nonspeech(SR, rng, "whistling")
    with pytest.raises(EmoteError):
        augment.band_limit(_tone(0.5), rng, "radio")
    with pytest.raises(EmoteError):
        augment.opus_roundtrip(np.zeros((2, 100), np.float32))
    with pytest.raises(EmoteError):
        augment.training_clip(0, -1)
