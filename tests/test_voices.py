"""festival and flite voices: audio, phoneme spans from their own segment output, espeak-named visemes."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import butter, sosfiltfilt

from avatar.data import voices
from avatar.data.visemes import MOUTH_FIELDS, NEUTRAL, mouth_track, viseme_sequence
from avatar.errors import EmoteError

OPEN = MOUTH_FIELDS.index("mouth_open")
INSTALLED = voices.available_voices()
# One festival voice and two flite voices of different kinds (diphone, clustergen), where installed.
CHECKED = [v for v in ("festival:cmu_us_slt_arctic_hts", "flite:kal", "flite:slt") if v in INSTALLED]
pytestmark = pytest.mark.skipif(not INSTALLED, reason="neither festival nor flite is installed (make deps)")


def _frame_db(audio: np.ndarray, start: float, end: float) -> np.ndarray:
    """Level in dB of the 10 ms frames inside [start, end)."""
    a, b = int(start * 100), max(int(end * 100), int(start * 100) + 1)
    frames = audio[: len(audio) // 160 * 160].reshape(-1, 160)[a:b]
    return 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)


def test_flite_and_festival_are_installed():
    assert any(v.startswith("flite:") for v in INSTALLED)
    assert any(v.startswith("festival:") for v in INSTALLED)
    assert "flite:awb_time" not in INSTALLED  # it can only say the time


@pytest.mark.parametrize("voice", CHECKED)
def test_spans_cover_the_audio_and_map_closes_the_lips_in_place(voice):
    utterance = voices.synthesize("A map.", voice)
    audio, spans = utterance.audio, utterance.phonemes
    duration = len(audio) / 16000
    assert audio.dtype == np.float32 and 0.4 < duration < 3.0 and np.abs(audio).max() > 0.05
    assert spans[0].start == 0.0 and abs(spans[-1].end - duration) < 1e-6
    assert all(abs(a.end - b.start) < 1e-6 for a, b in zip(spans, spans[1:]))
    speech = [s.name for s in spans if s.name != "_"]
    assert speech == ["@", "m", "a", "p"]
    by_name = {s.name: s for s in spans}
    loudest = _frame_db(audio, 0, duration).max()
    # /p/ starts with a closure: a stretch of near silence inside its span. /m/ is a nasal murmur with little
    # energy at 0.8-3 kHz, where the open vowel after it is strong.
    assert _frame_db(audio, by_name["p"].start, by_name["p"].end).min() < loudest - 30
    mid = sosfiltfilt(butter(4, [800, 3000], "band", fs=16000, output="sos"), audio)
    vowel, nasal = by_name["a"], by_name["m"]
    assert np.median(_frame_db(mid, vowel.start, vowel.end)) > np.median(_frame_db(mid, nasal.start, nasal.end)) + 10
    # And the mouth track (espeak mnemonics, unchanged visemes.py) closes on /m/ and opens on /a/.
    frames = int(np.ceil(duration * 25))
    mouth = mouth_track(spans, frames)[:, OPEN]
    at = lambda t: mouth[min(int(t * 25), frames - 1)]  # noqa: E731
    m, a = by_name["m"], by_name["a"]
    assert at((m.start + m.end) / 2) < 0.2 < 0.4 < at((a.start + a.end) / 2)


def test_every_mapped_phone_has_a_real_mouth_shape():
    for cmu, name in voices.CMU_TO_ESPEAK.items():
        parts = viseme_sequence(name)
        assert parts and all(p is not NEUTRAL for p in parts), cmu


def test_flite_rate_and_pitch_settings_change_the_speech():
    if "flite:slt" not in INSTALLED:
        pytest.skip("flite slt voice missing")
    slow = voices.synthesize("Seven yellow apples.", voices.SynthVoice("flite", "slt", stretch=1.3))
    fast = voices.synthesize("Seven yellow apples.", voices.SynthVoice("flite", "slt", stretch=0.8))
    assert len(slow.audio) > 1.4 * len(fast.audio)
    assert slow.phonemes[-1].end > 1.4 * fast.phonemes[-1].end
    again = voices.synthesize("Seven yellow apples.", voices.SynthVoice("flite", "slt", stretch=1.3))
    assert np.array_equal(slow.audio, again.audio)


def test_festival_speaks_several_texts_in_one_run_and_quotes_them():
    voice = next((v for v in INSTALLED if v.startswith("festival:")), None)
    if voice is None:
        pytest.skip("no festival voice")
    texts = ['He said "stop" \\ then left.', "Bob."]
    first, second = voices.synthesize_many(texts, voice)
    assert len(first.audio) > 2 * len(second.audio)
    assert [s.name for s in second.phonemes if s.name != "_"] == ["b", "A:", "b"]
    alone = voices.synthesize("Bob.", voice)
    assert np.array_equal(alone.audio, second.audio) and alone.phonemes == second.phonemes


def test_bad_input_raises_emote_error():
    with pytest.raises(EmoteError, match="unknown voice"):
        voices.synthesize("hello", "flite:nobody")
    with pytest.raises(EmoteError, match="unknown voice"):
        voices.synthesize("hello", "espeak:en")
    with pytest.raises(EmoteError, match="empty"):
        voices.synthesize("  \n ", INSTALLED[-1])
    with pytest.raises(EmoteError, match="empty"):
        voices.synthesize("", INSTALLED[-1])


def test_sample_voice_is_seeded():
    first = [voices.sample_voice(np.random.default_rng([7, k])) for k in range(6)]
    again = [voices.sample_voice(np.random.default_rng([7, k])) for k in range(6)]
    assert first == again and len({v.label for v in first + [voices.sample_voice(np.random.default_rng(k))
                                                              for k in range(20)]}) >= 3
