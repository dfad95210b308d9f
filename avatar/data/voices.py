"""More voices for the corpus: festival and flite, with phoneme timings from their own segment output.

Both synthesizers run as subprocesses (with timeouts). festival runs a small Scheme script that synthesises the
text and prints the Segment relation (phone name, end time); flite prints the same with `-psdur`. The CMU/radio
phone names are mapped to the espeak-ng mnemonics that `avatar.data.visemes` knows, so `mouth_track` works on them
unchanged. Audio is resampled to 16 kHz.

Voices are named "flite:slt", "festival:cmu_us_slt_arctic_hts", ...; `available_voices()` lists what is installed.
flite's time-domain voice `awb_time` only speaks clock times, so it is left out.
"""
from __future__ import annotations

import functools
import io
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from math import gcd

import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly

from avatar.data.speech import SAMPLE_RATE, Utterance
from avatar.data.visemes import PhonemeSpan
from avatar.errors import EmoteError

TIMEOUT_S = 60.0
MAX_TEXT_CHARS = 2000
_EXCLUDED_FLITE = frozenset({"awb_time"})  # a limited-domain voice: it can only say the time

# CMU / festival radio phone set -> espeak-ng mnemonics with the same mouth shape.
CMU_TO_ESPEAK: dict[str, str] = {
    "aa": "A:", "ae": "a", "ah": "V", "ao": "O:", "aw": "aU", "ax": "@", "axr": "3", "ay": "aI", "eh": "E",
    "er": "3:", "ey": "eI", "ih": "I", "ix": "I", "iy": "i:", "ow": "oU", "oy": "OI", "uh": "U", "uw": "u:",
    "b": "b", "ch": "tS", "d": "d", "dh": "D", "dx": "t", "f": "f", "g": "g", "hh": "h", "jh": "dZ", "k": "k",
    "l": "l", "el": "l", "m": "m", "em": "m", "n": "n", "en": "n", "nx": "n", "ng": "N", "p": "p", "r": "r",
    "s": "s", "sh": "S", "t": "t", "th": "T", "v": "v", "w": "w", "y": "j", "z": "z", "zh": "Z",
    "pau": "_", "h#": "_", "brth": "_", "sil": "_", "#": "_",
}


@dataclass(frozen=True)
class SynthVoice:
    """A festival or flite voice. `stretch` > 1 speaks slower; `f0_mean` (Hz) sets flite's pitch target."""

    engine: str  # "festival" | "flite"
    name: str
    stretch: float = 1.0
    f0_mean: float | None = None

    @property
    def label(self) -> str:
        return f"{self.engine}:{self.name}"


def _run(args: list[str], what: str) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(args, capture_output=True, timeout=TIMEOUT_S, check=False)
    except FileNotFoundError as error:
        raise EmoteError(f"{what} is not installed (Debian: apt-get install festival festvox-us-slt-hts flite)") \
            from error
    except subprocess.TimeoutExpired as error:
        raise EmoteError(f"{what} took longer than {TIMEOUT_S:.0f} s") from error
    return result


@functools.lru_cache(maxsize=1)
def flite_voices() -> tuple[str, ...]:
    if shutil.which("flite") is None:
        return ()
    out = _run(["flite", "-lv"], "flite").stdout.decode("utf-8", "replace")
    names = out.split(":", 1)[-1].split()
    return tuple(n for n in names if n not in _EXCLUDED_FLITE)


@functools.lru_cache(maxsize=1)
def festival_voices() -> tuple[str, ...]:
    if shutil.which("festival") is None:
        return ()
    out = _run(["festival", "-b", "(print (voice.list))"], "festival").stdout.decode("utf-8", "replace")
    return tuple(re.findall(r"[A-Za-z0-9_]+", out))


def available_voices() -> list[str]:
    """Installed voices as "engine:name", festival first."""
    return [f"festival:{v}" for v in festival_voices()] + [f"flite:{v}" for v in flite_voices()]


def parse_voice(voice: str | SynthVoice) -> SynthVoice:
    """"flite:slt" or a SynthVoice -> a SynthVoice that is installed, or EmoteError."""
    if isinstance(voice, SynthVoice):
        parsed = voice
    else:
        engine, _, name = str(voice).partition(":")
        parsed = SynthVoice(engine, name)
    installed = {"festival": festival_voices, "flite": flite_voices}.get(parsed.engine)
    if installed is None:
        raise EmoteError(f"unknown voice {parsed.label!r}: the engine must be festival or flite")
    if parsed.name not in installed():
        raise EmoteError(f"unknown voice {parsed.label!r}; installed: {', '.join(available_voices()) or 'none'}")
    if not 0.3 <= parsed.stretch <= 3.0:
        raise EmoteError(f"voice stretch {parsed.stretch} is outside 0.3..3")
    return parsed


def _clean_text(text: str) -> str:
    cleaned = " ".join("".join(ch if ch.isprintable() else " " for ch in str(text)).split())
    if not any(ch.isalnum() for ch in cleaned):
        raise EmoteError("the text to speak is empty")
    if len(cleaned) > MAX_TEXT_CHARS:
        raise EmoteError(f"the text to speak is longer than {MAX_TEXT_CHARS} characters")
    return cleaned


def _read_wav(data: bytes) -> np.ndarray:
    rate, pcm = wavfile.read(io.BytesIO(data))
    audio = pcm.astype(np.float32)
    if pcm.dtype == np.int16:
        audio /= 32768.0
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        g = gcd(int(rate), SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // g, int(rate) // g).astype(np.float32)
    return audio


def _spans_from_ends(segments: list[tuple[str, float]], duration: float, stretch: float = 1.0) -> list[PhonemeSpan]:
    """(cmu phone, end time) pairs -> espeak-named spans inside [0, duration]; stretch rescales the times."""
    spans: list[PhonemeSpan] = []
    start = 0.0
    for phone, end in segments:
        end = min(end * stretch, duration)
        name = CMU_TO_ESPEAK.get(phone.lower())
        if name is None:
            raise EmoteError(f"the synthesizer produced an unknown phone {phone!r}")
        if end - start > 1e-4:
            spans.append(PhonemeSpan(name, start, end))
        start = max(start, end)
    if start < duration - 1e-4:
        spans.append(PhonemeSpan("_", start, duration))
    return spans


def _synthesize_flite(text: str, voice: SynthVoice, workdir: str) -> Utterance:
    wav_path = os.path.join(workdir, "out.wav")
    args = ["flite", "-voice", voice.name, "--setf", f"duration_stretch={voice.stretch:.4f}"]
    if voice.f0_mean is not None:
        args += ["--setf", f"int_f0_target_mean={voice.f0_mean:.2f}"]
    args += ["-psdur", "-t", text, "-o", wav_path]
    result = _run(args, "flite")
    if result.returncode != 0 or not os.path.exists(wav_path):
        raise EmoteError(f"flite failed: {result.stderr.decode('utf-8', 'replace').strip()[:200]}")
    with open(wav_path, "rb") as handle:
        audio = _read_wav(handle.read())
    segments = []
    for token in result.stdout.decode("utf-8", "replace").split():
        phone, sep, end = token.rpartition(":")
        if sep and phone:
            segments.append((phone, float(end)))
    return Utterance(audio=audio, phonemes=_spans_from_ends(segments, len(audio) / SAMPLE_RATE))


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _synthesize_festival(texts: list[str], voice: SynthVoice, workdir: str) -> list[Utterance]:
    """All texts in one festival run: its start-up (loading the voice) costs more than a sentence."""
    script = os.path.join(workdir, "say.scm")
    wav_paths = [os.path.join(workdir, f"out{k}.wav") for k in range(len(texts))]
    lines = [f"(voice_{voice.name})"]
    for k, (text, wav_path) in enumerate(zip(texts, wav_paths)):
        lines += [
            f"(set! utt1 (eval (list 'Utterance 'Text {_scheme_string(text)})))",
            "(utt.synth utt1)",
            f"(mapcar (lambda (s) (format t \"SEG {k} %s %f\\n\" (item.name s) (item.feat s \"end\")))"
            " (utt.relation.items utt1 'Segment))",
            f"(utt.save.wave utt1 {_scheme_string(wav_path)} 'riff)"]
    with open(script, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    result = _run(["festival", "-b", script], "festival")
    if result.returncode != 0 or not all(os.path.exists(p) for p in wav_paths):
        raise EmoteError(f"festival failed: {result.stderr.decode('utf-8', 'replace').strip()[-200:]}")
    segments: list[list[tuple[str, float]]] = [[] for _ in texts]
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "SEG":
            segments[int(parts[1])].append((parts[2], float(parts[3])))
    utterances = []
    for wav_path, segs in zip(wav_paths, segments):
        with open(wav_path, "rb") as handle:
            audio = _read_wav(handle.read())
        scale = 1.0
        if voice.stretch != 1.0:  # festival's HTS voices ignore Duration_Stretch: stretch the result instead
            from avatar.data.augment import time_stretch

            audio, scale = time_stretch(audio, voice.stretch)
        utterances.append(Utterance(audio=audio, phonemes=_spans_from_ends(segs, len(audio) / SAMPLE_RATE, scale)))
    return utterances


def synthesize_many(texts: list[str], voice: str | SynthVoice) -> list[Utterance]:
    """Speak each text with a festival or flite voice: float32 16 kHz audio and espeak-named phoneme spans
    (seconds from the start of each audio, covering it from 0 to its end)."""
    parsed = parse_voice(voice)
    cleaned = [_clean_text(text) for text in texts]
    with tempfile.TemporaryDirectory(prefix="emote-voice-") as workdir:
        if parsed.engine == "flite":
            utterances = [_synthesize_flite(text, parsed, workdir) for text in cleaned]
        else:
            utterances = _synthesize_festival(cleaned, parsed, workdir) if cleaned else []
    for text, utterance in zip(cleaned, utterances):
        if len(utterance.audio) == 0 or not utterance.phonemes:
            raise EmoteError(f"{parsed.label} produced no speech for {text[:40]!r}")
    return utterances


def synthesize(text: str, voice: str | SynthVoice) -> Utterance:
    """Speak one text (see synthesize_many)."""
    return synthesize_many([text], voice)[0]


_FLITE_F0 = {"slt": (150.0, 230.0), "kal": (85.0, 140.0), "kal16": (85.0, 140.0), "awb": (85.0, 140.0)}


def sample_voice(rng: np.random.Generator) -> SynthVoice:
    """A random installed festival/flite voice with a random speaking rate (and pitch where flite supports it)."""
    voices = available_voices()
    if not voices:
        raise EmoteError("neither festival nor flite is installed")
    engine, _, name = voices[int(rng.integers(len(voices)))].partition(":")
    stretch = float(rng.uniform(0.8, 1.3))
    f0 = None
    if engine == "flite" and name in _FLITE_F0:
        f0 = float(rng.uniform(*_FLITE_F0[name]))
    return SynthVoice(engine, name, round(stretch, 3), None if f0 is None else round(f0, 1))
