"""Training data for the motion backbone: corpus clips (audio + exact per-frame motion) cached once as an npz.

Clips come from `avatar.data.corpus.make_clip(seed, index, identities)` without video, so they are cheap. Held-out
identities (index % 10 == 9) speak held-out sentences and are kept for evaluation only.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from avatar.motion.spec import MOTION_DIM

TRAIN_SEED = 2402  # the evaluation set's seed: its held-out identities/sentences never reach the train split
TRAIN_IDENTITIES = 40


@dataclass
class MotionClip:
    audio: np.ndarray  # float32 16 kHz, num_frames * 640 samples
    motion: np.ndarray  # float32 [F, MOTION_DIM] physical units
    phonemes: list = field(default_factory=list)  # [[name, start_s, end_s], ...]
    kind: str = "speech"
    identity: int = 0


def corpus_clip(seed: int, index: int, identities: int = TRAIN_IDENTITIES) -> tuple[MotionClip, str]:
    from avatar.data.corpus import make_clip

    spec, _ = make_clip(seed, index, identities, size=None)
    clip = MotionClip(spec.audio.astype(np.float32), spec.params[:, :MOTION_DIM].astype(np.float32).copy(),
                      list(spec.meta.get("phonemes", [])), str(spec.meta.get("kind", "speech")), spec.identity_index)
    return clip, spec.split


def build_cache(path: str | os.PathLike, split: str, count: int, seed: int = TRAIN_SEED,
                identities: int = TRAIN_IDENTITIES, start: int = 0,
                log: Callable[[str], None] | None = None) -> Path:
    """Write `count` clips of `split` (scanning clip indices from `start`) to one npz, atomically."""
    log = log or (lambda line: None)
    clips: list[MotionClip] = []
    index = start
    began = time.perf_counter()
    while len(clips) < count:
        from avatar.data.corpus import is_heldout_identity

        if (split == "test") != is_heldout_identity(index % identities, identities):
            index += 1
            continue
        clip, _ = corpus_clip(seed, index, identities)
        clips.append(clip)
        index += 1
        if len(clips) % 20 == 0:
            log(f"cache {split}: {len(clips)}/{count} clips, {time.perf_counter() - began:.0f} s")
    save_clips(path, clips)
    return Path(path)


def save_clips(path: str | os.PathLike, clips: list[MotionClip]) -> None:
    import json

    path = Path(path)
    lengths = np.array([len(c.motion) for c in clips], np.int64)
    payload = {
        "audio": np.concatenate([c.audio for c in clips]).astype(np.float32),
        "motion": np.concatenate([c.motion for c in clips]).astype(np.float32),
        "lengths": lengths,
        "meta": np.frombuffer(json.dumps([{"phonemes": c.phonemes, "kind": c.kind, "identity": c.identity}
                                          for c in clips]).encode(), np.uint8),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    os.close(fd)
    np.savez(tmp, **payload)
    os.replace(tmp, path)


def load_clips(path: str | os.PathLike) -> list[MotionClip]:
    import json

    with np.load(path) as data:  # read each member once: indexing an NpzFile re-reads the member
        audio, motion, lengths = data["audio"], data["motion"], data["lengths"]
        metas = json.loads(data["meta"].tobytes().decode())
    clips, frame, sample = [], 0, 0
    for n, meta in zip(lengths, metas):
        n = int(n)
        clips.append(MotionClip(audio[sample:sample + n * 640].copy(), motion[frame:frame + n].copy(),
                                meta["phonemes"], meta["kind"], meta["identity"]))
        frame += n
        sample += n * 640
    return clips


if __name__ == "__main__":  # python -m avatar.motion.data OUT SPLIT COUNT [START]
    import sys

    out, split_name, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
    first = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    build_cache(out, split_name, total, start=first, log=lambda line: print(line, flush=True))
    print("done", out, flush=True)


NONSPEECH_KINDS = ("music", "hum", "noise", "typing", "cough", "silence")
# Tonal music and clicks are the hardest to tell from voice: they get more clips.
NONSPEECH_SCHEDULE = ("music", "hum", "music", "noise", "typing", "music", "cough", "typing", "silence")


def nonspeech_audio(rng: np.random.Generator, kind: str, seconds: float) -> np.ndarray:
    """Sound without a voice (the mouth stays closed): music, mains hum, a noise floor, keyboard typing, coughs."""
    from scipy.signal import lfilter

    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    if kind == "music":
        audio = np.zeros(n)
        beat = float(rng.uniform(0.25, 0.7))
        root = float(rng.uniform(80, 330))
        for start in np.arange(0, seconds, beat):
            notes = np.array([0, 4, 7, 12])[: int(rng.integers(1, 5))]
            chord = root * 2 ** (notes / 12 + int(rng.integers(-5, 6)) / 12)
            seg = (t >= start) & (t < start + beat)
            local = t[seg] - start
            tone = sum(np.sin(2 * np.pi * f * local) + 0.3 * np.sign(np.sin(2 * np.pi * f * local)) for f in chord)
            audio[seg] += tone * np.exp(-local * float(rng.uniform(1, 8)))
            if rng.random() < 0.5:  # a drum hit
                hit = min(len(local), 1600)
                audio[np.flatnonzero(seg)[:hit]] += rng.normal(0, 1, hit) * np.exp(-np.arange(hit) / 300)
    elif kind == "hum":
        base = float(rng.choice([50.0, 60.0]))
        audio = sum(np.sin(2 * np.pi * base * k * t) / k for k in range(1, 8)) + rng.normal(0, 0.05, n)
    elif kind == "noise":
        audio = rng.normal(0, 1, n)
        if rng.random() < 0.5:
            audio = lfilter([1.0], [1.0, -float(rng.uniform(0.5, 0.98))], audio)
    elif kind == "typing":
        audio = rng.normal(0, 0.01, n)
        for start in np.cumsum(rng.exponential(1 / float(rng.uniform(3, 10)), int(seconds * 12) + 1)):
            i = int(start * 16000)
            if i >= n:
                break
            k = min(400, n - i)
            audio[i:i + k] += rng.normal(0, 1, k) * np.exp(-np.arange(k) / float(rng.uniform(20, 80)))
    elif kind == "cough":
        audio = rng.normal(0, 0.005, n)
        for start in rng.uniform(0, max(seconds - 0.5, 0.1), int(rng.integers(1, 4))):
            i = int(start * 16000)
            k = min(int(rng.uniform(0.15, 0.4) * 16000), n - i)
            burst = rng.normal(0, 1, k) * np.exp(-np.arange(k) / (0.08 * 16000)) * np.minimum(np.arange(k) / 80, 1)
            audio[i:i + k] += lfilter([1.0], [1.0, -float(rng.uniform(0.3, 0.9))], burst)
    else:
        audio = np.zeros(n)
    peak = np.abs(audio).max()
    if peak > 0:
        audio = audio / peak * 10 ** (float(rng.uniform(-40, -3)) / 20)
    return audio.astype(np.float32)


def nonspeech_clip(seed: int, index: int) -> MotionClip:
    """A closed-mouth clip: non-speech sound with the corpus's own blinks, brows and head motion."""
    from avatar.data.motion import motion_track

    rng = np.random.default_rng([seed, 0x5EC, index])
    kind = NONSPEECH_SCHEDULE[index % len(NONSPEECH_SCHEDULE)]
    audio = nonspeech_audio(rng, kind, float(rng.uniform(2.0, 6.0)))
    frames = len(audio) // 640
    audio = audio[: frames * 640]
    motion = np.zeros((frames, MOTION_DIM), np.float32)
    motion[:, 5:] = motion_track(np.zeros_like(audio), frames, rng, liveliness=float(rng.uniform(0.5, 1.3)))
    return MotionClip(audio, motion, [], f"nonspeech-{kind}", -1)


def augmented_clips(count: int, seed: int = 7, log: Callable[[str], None] | None = None) -> list[MotionClip]:
    """Training clips from `avatar.data.augment.training_clip`: espeak-ng, flite and festival voices with pitch,
    formant and tempo changes, reverb, noise, band limits, Opus round trips, and closed-mouth non-speech."""
    from avatar.data.augment import training_clip

    log = log or (lambda line: None)
    clips, began = [], time.perf_counter()
    for index in range(count):
        audio, motion, meta = training_clip(seed, index)
        clips.append(MotionClip(audio.astype(np.float32), motion.astype(np.float32), list(meta.get("phonemes", [])),
                                f"aug-{meta.get('kind', 'speech')}", int(meta.get("identity", 0))))
        if (index + 1) % 50 == 0:
            log(f"augmented clips: {index + 1}/{count}, {time.perf_counter() - began:.0f} s")
    return clips


PAUSE_GAP = 0.12  # seconds: shorter gaps between phoneme events occur inside words (unreported events)


def fill_silences(phonemes: list, min_gap: float = PAUSE_GAP) -> list:
    """Phoneme spans with every gap longer than `min_gap` between spans covered by a silence span.

    `avatar.data.visemes.mouth_track` counts only the time before the first and after the last span as silence: in
    a pause between two utterances the blend is dominated by the nearest phoneme, so the corpus's track holds the
    mouth open (up to 0.8) through up to 1.5 s of silence. Filling the gaps gives the closed mouth the track's
    docstring promises."""
    spans = sorted(((str(n), float(s), float(e)) for n, s, e in phonemes), key=lambda span: span[1])
    out: list = []
    for name, start, end in spans:
        if out and start - out[-1][2] > min_gap:
            out.append(["_", out[-1][2], start])
        out.append([name, start, end])
    return out


def corrected_motion(clip: MotionClip) -> np.ndarray:
    """The clip's motion with the mouth track recomputed from silence-filled phoneme spans (see fill_silences)."""
    from avatar.data.visemes import PhonemeSpan, mouth_track

    motion = clip.motion.copy()
    if clip.phonemes:
        spans = [PhonemeSpan(n, s, e) for n, s, e in fill_silences(clip.phonemes)]
        motion[:, :5] = mouth_track(spans, len(motion))
    return motion
