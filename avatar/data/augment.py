"""Audio augmentations for motion training, and the training-clip generator.

Every augmentation takes and returns float32 mono audio at 16 kHz. Unless its docstring says otherwise it keeps the
length and the timing (zero-phase filters, impulse responses with the direct path at lag 0, codec delay removed),
so phoneme spans stay valid. Random choices come from a `np.random.Generator`, so a clip is a pure function of
its seed.

`training_clip(seed, index)` is what the motion trainer calls: audio of exactly F * 640 samples, the motion
[F, MOTION_DIM] in `avatar.motion.spec` units, and a meta dict (phonemes, kind, voice, augment).
"""
from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
from scipy.signal import butter, fftconvolve, lfilter, resample_poly, sosfilt, sosfiltfilt

from avatar.data.motion import FPS, HOP, MOTION_FIELDS, SAMPLE_RATE, motion_track
from avatar.data.visemes import MOUTH_FIELDS, PhonemeSpan, mouth_track
from avatar.errors import EmoteError
from avatar.motion.spec import MOTION_DIM, MOTION_NAMES, clip as clip_motion

N_FFT = 512
STFT_HOP = N_FFT // 4
_WINDOW = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT))  # periodic Hann: constant OLA at hop N/4


def _as_audio(audio: np.ndarray) -> np.ndarray:
    array = np.asarray(audio, dtype=np.float32)
    if array.ndim != 1:
        raise EmoteError(f"audio must be mono 1-D, got shape {list(array.shape)}")
    return array


def _fit(audio: np.ndarray, length: int) -> np.ndarray:
    """Crop or zero-pad to `length` samples."""
    return np.pad(audio, (0, max(length - len(audio), 0)))[:length].astype(np.float32)


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if len(audio) else 0.0


def _active_power(audio: np.ndarray) -> float:
    """Mean power over the louder part (frames within 30 dB of the loudest), i.e. the speech, not the pauses."""
    n = len(audio) // HOP
    if n == 0:
        return float(np.mean(np.square(audio))) + 1e-12
    frames = np.square(audio[: n * HOP].astype(np.float64)).reshape(n, HOP).mean(1)
    active = frames[frames > frames.max() * 1e-3]
    return float(active.mean()) + 1e-12


# ---- STFT, time stretch, pitch and formants ------------------------------------------------------------------------

def _stft(audio: np.ndarray) -> np.ndarray:
    padded = np.pad(audio.astype(np.float64), (N_FFT // 2, N_FFT // 2 + STFT_HOP))
    count = 1 + (len(padded) - N_FFT) // STFT_HOP
    index = np.arange(count)[:, None] * STFT_HOP + np.arange(N_FFT)[None, :]
    return np.fft.rfft(padded[index] * _WINDOW, axis=1)  # [T, bins]


def _istft(spec: np.ndarray, length: int) -> np.ndarray:
    frames = np.fft.irfft(spec, N_FFT, axis=1) * _WINDOW  # [T, N_FFT]
    count = frames.shape[0]
    out = np.zeros((count + 3) * STFT_HOP)
    # N_FFT = 4 hops: overlap-add as four shifted, reshaped sums.
    for part in range(4):
        chunk = frames[:, part * STFT_HOP:(part + 1) * STFT_HOP].reshape(-1)
        out[part * STFT_HOP: part * STFT_HOP + len(chunk)] += chunk
    out /= np.sum(_WINDOW ** 2) / STFT_HOP
    return out[N_FFT // 2: N_FFT // 2 + length]


def time_stretch(audio: np.ndarray, factor: float) -> tuple[np.ndarray, float]:
    """Phase-vocoder time stretch: `factor` > 1 makes it longer (slower), pitch unchanged.

    Changes the timing: returns (audio, scale) where scale = new length / old length; multiply span times by it.
    """
    audio = _as_audio(audio)
    if not 0.25 <= factor <= 4.0:
        raise EmoteError(f"time-stretch factor {factor} is outside 0.25..4")
    new_length = int(round(len(audio) * factor))
    if abs(factor - 1.0) < 1e-6 or len(audio) == 0:
        return audio.copy(), 1.0
    if len(audio) < N_FFT:  # too short for the vocoder: plain resampling (shifts the pitch of a few ms)
        resampled = resample_poly(audio, new_length, len(audio)).astype(np.float32)
        return _fit(resampled, new_length), new_length / len(audio)
    spec = _stft(audio)
    count = spec.shape[0]
    steps = np.arange(0, count - 1, 1.0 / factor)
    base = np.floor(steps).astype(int)
    frac = (steps - base)[:, None]
    magnitude = (1 - frac) * np.abs(spec[base]) + frac * np.abs(spec[base + 1])
    omega = 2 * np.pi * STFT_HOP * np.arange(spec.shape[1]) / N_FFT
    delta = np.angle(spec[base + 1]) - np.angle(spec[base]) - omega
    delta = delta - 2 * np.pi * np.round(delta / (2 * np.pi)) + omega
    phase = np.angle(spec[0])[None, :] + np.vstack([np.zeros((1, spec.shape[1])), np.cumsum(delta[:-1], axis=0)])
    out = _istft(magnitude * np.exp(1j * phase), new_length)
    return _fit(out.astype(np.float32), new_length), new_length / len(audio)


def _resample_ratio(audio: np.ndarray, ratio: float) -> np.ndarray:
    """Resample so the output has len/ratio samples (ratio > 1 shortens: plays faster and higher)."""
    frac = Fraction(ratio).limit_denominator(200)
    return resample_poly(audio, frac.denominator, frac.numerator).astype(np.float32)


def _envelope(magnitude: np.ndarray, lifter: int = 24) -> np.ndarray:
    """Spectral envelope per frame by cepstral smoothing of the log magnitude."""
    cepstrum = np.fft.irfft(np.log(magnitude + 1e-7), N_FFT, axis=1)
    cepstrum[:, lifter:N_FFT - lifter + 1] = 0.0
    return np.exp(np.fft.rfft(cepstrum, axis=1).real)


def shift_voice(audio: np.ndarray, semitones: float) -> np.ndarray:
    """Pitch and formants together (a smaller or larger speaker): resample, then time-stretch back."""
    audio = _as_audio(audio)
    ratio = 2.0 ** (semitones / 12.0)
    stretched, _ = time_stretch(audio, ratio)
    return _fit(_resample_ratio(stretched, ratio), len(audio))


def _warp_envelope(source: np.ndarray, target_env: np.ndarray) -> np.ndarray:
    """Replace the spectral envelope of every frame of `source` by `target_env` (bounded correction)."""
    env = _envelope(np.abs(source))
    gain = np.clip(target_env / (env + 1e-9), 0.05, 20.0)
    return source * gain


def pitch_shift(audio: np.ndarray, semitones: float) -> np.ndarray:
    """Pitch only: shift voice and formants, then put the original spectral envelope back."""
    audio = _as_audio(audio)
    shifted = shift_voice(audio, semitones)
    original_env = _envelope(np.abs(_stft(audio)))
    out = _istft(_warp_envelope(_stft(shifted), original_env), len(audio))
    return _match_rms(out, audio)


def formant_shift(audio: np.ndarray, ratio: float) -> np.ndarray:
    """Formants only: every frame's spectral envelope is moved up (ratio > 1) or down in frequency."""
    audio = _as_audio(audio)
    spec = _stft(audio)
    env = _envelope(np.abs(spec))
    bins = np.arange(spec.shape[1], dtype=np.float64)
    source = np.clip(bins / ratio, 0, spec.shape[1] - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, spec.shape[1] - 1)
    frac = source - low
    warped = (1 - frac) * env[:, low] + frac * env[:, high]
    out = _istft(spec * np.clip(warped / (env + 1e-9), 0.05, 20.0), len(audio))
    return _match_rms(out, audio)


def change_tempo(audio: np.ndarray, rate: float) -> tuple[np.ndarray, float]:
    """Speak faster (rate > 1) or slower; returns (audio, time scale = 1/rate approximately)."""
    return time_stretch(audio, 1.0 / rate)


def rescale_spans(spans: list[PhonemeSpan], scale: float) -> list[PhonemeSpan]:
    return [PhonemeSpan(s.name, s.start * scale, s.end * scale) for s in spans]


def _match_rms(out: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return (out * (_rms(reference) / (_rms(out) + 1e-12))).astype(np.float32)


# ---- room, microphone, level ---------------------------------------------------------------------------------------

def reverb(audio: np.ndarray, rng: np.random.Generator, rt60: float | None = None,
           direct_to_reverb_db: float | None = None) -> tuple[np.ndarray, dict]:
    """A synthetic room: exponentially decaying noise impulse response with the direct path at lag 0."""
    audio = _as_audio(audio)
    rt60 = float(rng.uniform(0.1, 0.8)) if rt60 is None else float(rt60)
    drr = float(rng.uniform(-3.0, 12.0)) if direct_to_reverb_db is None else float(direct_to_reverb_db)
    length = int(rt60 * SAMPLE_RATE)
    t = np.arange(length) / SAMPLE_RATE
    tail = rng.normal(0.0, 1.0, length) * np.exp(-6.908 * t / rt60)
    tail[: int(0.002 * SAMPLE_RATE)] = 0.0  # first reflections arrive after a few ms
    tail = sosfilt(butter(2, 6000, "low", fs=SAMPLE_RATE, output="sos"), tail)
    tail *= np.sqrt(10 ** (-drr / 10) / (np.sum(tail ** 2) + 1e-12))
    ir = tail
    ir[0] += 1.0
    wet = fftconvolve(audio, ir)[: len(audio)]
    return _match_rms(wet, audio), {"rt60": round(rt60, 3), "drr_db": round(drr, 2)}


NOISE_KINDS = ("white", "pink", "brown", "hum", "fan", "babble", "traffic")


def room_noise(n: int, rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, str]:
    """`n` samples of unit-RMS background noise of a random (or given) kind."""
    kind = NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))] if kind is None else kind
    t = np.arange(n) / SAMPLE_RATE
    if kind == "white":
        noise = rng.normal(0, 1, n)
    elif kind in ("pink", "brown", "traffic"):
        spectrum = np.fft.rfft(rng.normal(0, 1, n))
        power = {"pink": 0.5, "brown": 1.0, "traffic": 1.2}[kind]
        spectrum /= np.maximum(np.arange(len(spectrum)), 1) ** power
        noise = np.fft.irfft(spectrum, n)
        if kind == "traffic":  # slow swells of passing cars
            noise *= 1 + 0.7 * np.sin(2 * np.pi * float(rng.uniform(0.05, 0.3)) * t + float(rng.uniform(0, 6)))
    elif kind == "hum":
        base = float(rng.choice([50.0, 60.0]))
        noise = sum(np.sin(2 * np.pi * base * k * t + float(rng.uniform(0, 6))) / k for k in range(1, 8))
        noise = noise + rng.normal(0, 0.1, n)
    elif kind == "fan":
        noise = sosfilt(butter(2, float(rng.uniform(300, 1500)), "low", fs=SAMPLE_RATE, output="sos"),
                        rng.normal(0, 1, n))
        noise += 0.3 * np.sin(2 * np.pi * float(rng.uniform(80, 200)) * t)
    elif kind == "babble":  # distant voices: detuned buzzes, formant-ish filtered, syllable-rate modulation
        noise = np.zeros(n)
        for _ in range(6):
            f0 = float(rng.uniform(90, 260))
            mod = 0.5 + 0.5 * np.sin(2 * np.pi * float(rng.uniform(3, 6)) * t + float(rng.uniform(0, 6)))
            noise += np.sign(np.sin(2 * np.pi * f0 * t + float(rng.uniform(0, 6)))) * mod
        noise = sosfilt(butter(2, [300, 3000], "band", fs=SAMPLE_RATE, output="sos"), noise)
    else:
        raise EmoteError(f"unknown noise kind {kind!r}; choose from {', '.join(NOISE_KINDS)}")
    noise = np.asarray(noise, np.float64)
    return (noise / (_rms(noise) + 1e-12)).astype(np.float32), kind


def add_noise(audio: np.ndarray, rng: np.random.Generator, snr_db: float | None = None,
              kind: str | None = None) -> tuple[np.ndarray, dict]:
    """Room noise at a random SNR (dB against the active, i.e. speaking, part of the signal)."""
    audio = _as_audio(audio)
    snr_db = float(rng.uniform(3.0, 30.0)) if snr_db is None else float(snr_db)
    noise, kind = room_noise(len(audio), rng, kind)
    scale = np.sqrt(_active_power(audio) / 10 ** (snr_db / 10))
    return (audio + noise * scale).astype(np.float32), {"kind": kind, "snr_db": round(snr_db, 2)}


def noise_floor(n: int, rng: np.random.Generator, level_db: float | None = None) -> tuple[np.ndarray, dict]:
    """A microphone's self-noise: slightly coloured hiss (and sometimes faint mains hum) at level_db dBFS RMS."""
    level_db = float(rng.uniform(-75.0, -50.0)) if level_db is None else float(level_db)
    hiss = rng.normal(0, 1, n)
    hiss = lfilter([1.0], [1.0, -float(rng.uniform(0.0, 0.7))], hiss)  # some low-frequency tilt
    if rng.random() < 0.3:
        t = np.arange(n) / SAMPLE_RATE
        hiss = hiss + 0.5 * np.sin(2 * np.pi * float(rng.choice([50.0, 60.0])) * t) * hiss.std()
    hiss = hiss / (_rms(hiss) + 1e-12) * 10 ** (level_db / 20)
    return hiss.astype(np.float32), {"level_db": round(level_db, 1)}


BAND_KINDS = ("telephone", "laptop", "headset", "webcam")


def band_limit(audio: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, dict]:
    """A microphone/channel response (zero-phase, so timing is kept): telephone band, laptop mic, ..."""
    audio = _as_audio(audio)
    kind = BAND_KINDS[int(rng.integers(len(BAND_KINDS)))] if kind is None else kind
    if kind == "telephone":
        low, high = float(rng.uniform(250, 400)), float(rng.uniform(3200, 3600))
    elif kind == "laptop":
        low, high = float(rng.uniform(150, 350)), float(rng.uniform(5000, 7000))
    elif kind == "headset":
        low, high = float(rng.uniform(60, 150)), float(rng.uniform(6500, 7800))
    elif kind == "webcam":
        low, high = float(rng.uniform(100, 250)), float(rng.uniform(4000, 6000))
    else:
        raise EmoteError(f"unknown band kind {kind!r}; choose from {', '.join(BAND_KINDS)}")
    sos = butter(2, [low, high], "band", fs=SAMPLE_RATE, output="sos")
    out = sosfiltfilt(sos, audio.astype(np.float64))
    info = {"kind": kind, "low_hz": round(low), "high_hz": round(high)}
    if kind in ("laptop", "webcam"):  # a small-capsule presence peak
        centre = float(rng.uniform(2000, 4000))
        peak = sosfiltfilt(butter(2, [centre / 1.3, centre * 1.3], "band", fs=SAMPLE_RATE, output="sos"), out)
        gain = float(rng.uniform(0.3, 1.0))
        out = out + gain * peak
        info.update(peak_hz=round(centre), peak_gain=round(gain, 2))
    return out.astype(np.float32), info


def gain(audio: np.ndarray, db: float) -> np.ndarray:
    return (_as_audio(audio) * 10 ** (db / 20)).astype(np.float32)


def soft_clip(audio: np.ndarray, threshold: float = 0.7) -> np.ndarray:
    """Identity below `threshold`, a tanh knee above it, never beyond +-1 (an overdriven input stage)."""
    audio = _as_audio(audio)
    if not 0.0 < threshold < 1.0:
        raise EmoteError(f"soft-clip threshold {threshold} is outside (0, 1)")
    magnitude = np.abs(audio)
    knee = threshold + (1 - threshold) * np.tanh((magnitude - threshold) / (1 - threshold))
    return (np.sign(audio) * np.where(magnitude > threshold, knee, magnitude)).astype(np.float32)


# ---- Opus --------------------------------------------------------------------------------------------------------

def opus_roundtrip(audio: np.ndarray, bitrate: int = 24000, container: str = "ogg",
                   complexity: int = 10) -> np.ndarray:
    """Encode with libopus (PyAV, in memory), decode, back to 16 kHz; same length, codec delay removed.

    The demuxer drops Opus's pre-skip (its encoder delay), so the decoded samples line up with the input.
    `complexity` is libopus's 0-10 speed/quality trade-off (browsers use about 9 on desktops, less on phones).
    """
    import av

    audio = _as_audio(audio)
    if not 6000 <= bitrate <= 256000:
        raise EmoteError(f"Opus bitrate {bitrate} is outside 6000..256000")
    if not 0 <= complexity <= 10:
        raise EmoteError(f"Opus complexity {complexity} is outside 0..10")
    n = len(audio)
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)
    pcm = np.pad(pcm, (0, (-n) % 320 + 320))  # whole 20 ms frames, and one more so the end is flushed
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream("libopus", rate=SAMPLE_RATE, layout="mono")
        stream.bit_rate = int(bitrate)
        stream.codec_context.options = {"compression_level": str(int(complexity))}
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = 0
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    buffer.seek(0)
    chunks: list[np.ndarray] = []
    rate = SAMPLE_RATE
    with av.open(buffer, "r") as source:
        for frame in source.decode(audio=0):
            rate = frame.sample_rate
            array = frame.to_ndarray()
            if array.dtype == np.int16:
                array = array.astype(np.float32) / 32768.0
            chunks.append(array.reshape(array.shape[0], -1).mean(0) if array.shape[0] > 1 and
                          frame.format.is_planar else array.reshape(-1))
    decoded = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if rate != SAMPLE_RATE:
        decoded = resample_poly(decoded, SAMPLE_RATE, rate).astype(np.float32)
    return _fit(decoded, n)


# ---- non-speech sounds (the mouth stays closed) ----------------------------------------------------------------------

def _resonate(signal: np.ndarray, freq: float, bandwidth: float) -> np.ndarray:
    r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    theta = 2 * np.pi * freq / SAMPLE_RATE
    return lfilter([1.0 - r], [1.0, -2 * r * np.cos(theta), r * r], signal)


def music(n: int, rng: np.random.Generator) -> np.ndarray:
    """Instrumental music: chords, a bass line, a plucked melody and hi-hat ticks, no voice."""
    t_all = np.arange(n) / SAMPLE_RATE
    out = np.zeros(n)
    beat = float(rng.uniform(0.3, 0.7))
    root = float(rng.uniform(110, 220))
    timbre = int(rng.integers(3))  # 0 square-ish organ, 1 soft sines, 2 saw-ish
    progression = rng.choice([0, 5, 7, 9, -3, 2], size=4)
    for k, start in enumerate(np.arange(0, n / SAMPLE_RATE, beat)):
        seg = slice(int(start * SAMPLE_RATE), min(int((start + beat) * SAMPLE_RATE), n))
        local = t_all[seg] - start
        chord_root = root * 2 ** (progression[(k // 4) % 4] / 12)
        env = np.exp(-local * float(rng.uniform(2, 6)))
        for semis in (0, 4, 7):
            f = chord_root * 2 ** (semis / 12)
            wave = np.sin(2 * np.pi * f * local)
            if timbre == 0:
                wave = 0.6 * wave + 0.25 * np.sign(wave)
            elif timbre == 2:
                wave = sum(np.sin(2 * np.pi * f * h * local) / h for h in range(1, 6))
            out[seg] += 0.25 * wave * env
        out[seg] += 0.4 * np.sin(2 * np.pi * chord_root / 2 * local) * np.exp(-local * 3)  # bass
        if rng.random() < 0.7:  # plucked melody note
            f = chord_root * 2 * 2 ** (int(rng.choice([0, 2, 4, 7, 9, 12])) / 12)
            out[seg] += 0.3 * np.sin(2 * np.pi * f * local) * np.exp(-local * 8)
        tick = min(int(0.03 * SAMPLE_RATE), len(local))
        out[seg.start:seg.start + tick] += 0.15 * rng.normal(0, 1, tick) * np.exp(-np.arange(tick) / 60)
    out = sosfilt(butter(2, 80, "high", fs=SAMPLE_RATE, output="sos"), out)
    return (out / (_rms(out) + 1e-12)).astype(np.float32)


def cough(n: int, rng: np.random.Generator) -> np.ndarray:
    """One to three coughs in `n` samples of silence: fast-attack noise bursts coloured by formant resonators."""
    out = np.zeros(n)
    count = int(rng.integers(1, 4))
    start = float(rng.uniform(0.2, max(0.25, n / SAMPLE_RATE - 0.6 * count - 0.3)))
    for _ in range(count):
        length = int(float(rng.uniform(0.2, 0.45)) * SAMPLE_RATE)
        s = int(start * SAMPLE_RATE)
        if s + length > n:
            break
        t = np.arange(length) / SAMPLE_RATE
        envelope = (1 - np.exp(-t / 0.004)) * np.exp(-t / float(rng.uniform(0.05, 0.12)))
        burst = rng.normal(0, 1, length)
        coloured = sum(g * _resonate(burst, f, bw) for f, bw, g in (
            (float(rng.uniform(400, 800)), 250.0, 1.0), (float(rng.uniform(1100, 1900)), 350.0, 0.7),
            (float(rng.uniform(2400, 3200)), 500.0, 0.4)))
        out[s:s + length] += coloured * envelope * float(rng.uniform(0.6, 1.0))
        start += length / SAMPLE_RATE + float(rng.uniform(0.1, 0.35))
    return (out / (np.abs(out).max() + 1e-12) * 0.8).astype(np.float32)


def typing(n: int, rng: np.random.Generator) -> np.ndarray:
    """Keyboard typing: bursts of short resonant clicks 60-300 ms apart, with pauses between words."""
    out = np.zeros(n)
    t = float(rng.uniform(0.0, 0.4))
    click_len = int(0.012 * SAMPLE_RATE)
    resonance = float(rng.uniform(1500, 4000))
    while t < n / SAMPLE_RATE - 0.02:
        s = int(t * SAMPLE_RATE)
        burst = rng.normal(0, 1, click_len) * np.exp(-np.arange(click_len) / float(rng.uniform(15, 40)))
        click = _resonate(burst, resonance * float(rng.uniform(0.8, 1.2)), 600.0) + 0.3 * burst
        end = min(s + click_len, n)
        out[s:end] += click[: end - s] * float(rng.uniform(0.4, 1.0))
        t += float(rng.uniform(0.06, 0.3)) if rng.random() > 0.15 else float(rng.uniform(0.4, 1.2))
    return (out / (np.abs(out).max() + 1e-12) * 0.5).astype(np.float32)


def breath(n: int, rng: np.random.Generator) -> np.ndarray:
    """Breathing: band-passed noise with slow rise-and-fall envelopes every 2-4 s."""
    out = np.zeros(n)
    noise = sosfilt(butter(2, [float(rng.uniform(300, 700)), float(rng.uniform(1800, 3500))], "band",
                           fs=SAMPLE_RATE, output="sos"), rng.normal(0, 1, n))
    t = float(rng.uniform(0.1, 1.0))
    while t < n / SAMPLE_RATE - 0.3:
        length = int(float(rng.uniform(0.4, 1.0)) * SAMPLE_RATE)
        s = int(t * SAMPLE_RATE)
        end = min(s + length, n)
        window = np.sin(np.pi * np.arange(end - s) / length) ** 2
        out[s:end] += noise[s:end] * window * float(rng.uniform(0.4, 1.0))
        t += float(rng.uniform(2.0, 4.0))
    return (out / (np.abs(out).max() + 1e-12) * 0.3).astype(np.float32)


NONSPEECH_KINDS = ("music", "cough", "typing", "breath", "noise_floor")


def nonspeech(n: int, rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, str]:
    """`n` samples of a sound that is not speech (the mouth stays closed): music, cough, typing, breath, floor."""
    kind = NONSPEECH_KINDS[int(rng.integers(len(NONSPEECH_KINDS)))] if kind is None else kind
    if kind == "music":
        audio = music(n, rng) * 10 ** (float(rng.uniform(-30, -12)) / 20)
    elif kind == "cough":
        audio = cough(n, rng)
    elif kind == "typing":
        audio = typing(n, rng) * 10 ** (float(rng.uniform(-20, 0)) / 20)
    elif kind == "breath":
        audio = breath(n, rng) * 10 ** (float(rng.uniform(-20, 0)) / 20)
    elif kind == "noise_floor":
        audio, _ = noise_floor(n, rng, float(rng.uniform(-65, -40)))
    else:
        raise EmoteError(f"unknown non-speech kind {kind!r}; choose from {', '.join(NONSPEECH_KINDS)}")
    return audio.astype(np.float32), kind


# ---- the augmentation chain --------------------------------------------------------------------------------------

NOMINAL_SPEECH_DB = -26.0  # dBFS RMS of the active part; gain is applied around it


def acoustic_chain(audio: np.ndarray, rng: np.random.Generator, speech: bool,
                   opus_probability: float = 0.5) -> tuple[np.ndarray, dict]:
    """Room, noise, microphone, level and codec, each with its own probability. Keeps length and timing."""
    info: dict = {}
    out = _as_audio(audio)
    if rng.random() < 0.35:
        out, info["reverb"] = reverb(out, rng)
    if speech and rng.random() < 0.45:
        out, info["noise"] = add_noise(out, rng)
    elif not speech and rng.random() < 0.35:  # background under a non-speech sound: absolute, quiet
        noise, kind = room_noise(len(out), rng)
        level = float(rng.uniform(-65, -40))
        out = out + noise * 10 ** (level / 20)
        info["noise"] = {"kind": kind, "level_db": round(level, 1)}
    if rng.random() < 0.35:
        out, info["band"] = band_limit(out, rng)
    # A real input is never digital zero: always some self-noise, from nearly inaudible to a cheap mic's hiss.
    floor, info["floor"] = noise_floor(len(out), rng, float(rng.uniform(-85.0, -50.0)))
    out = out + floor
    if speech:  # set the speaking level to nominal, then a random input gain of +-20 dB around it
        out = out * (10 ** (NOMINAL_SPEECH_DB / 20) / np.sqrt(_active_power(out)))
    db = float(rng.uniform(-20.0, 20.0)) if speech else float(rng.uniform(-12.0, 12.0))
    out = gain(out, db)
    info["gain_db"] = round(db, 2)
    if np.abs(out).max() > 0.7 or rng.random() < 0.1:
        threshold = float(rng.uniform(0.5, 0.9))
        out = soft_clip(out, threshold)
        info["soft_clip"] = round(threshold, 2)
    if rng.random() < opus_probability:
        bitrate = int(rng.choice([16000, 20000, 24000, 32000, 48000, 64000]))
        complexity = int(rng.choice([5, 9]))
        out = opus_roundtrip(out, bitrate, complexity=complexity)
        info["opus_kbps"], info["opus_complexity"] = bitrate // 1000, complexity
    return np.clip(out, -1.0, 1.0).astype(np.float32), info


# ---- the training-clip generator ------------------------------------------------------------------------------------

SPEECH_SHARE, VOICES_SHARE, SINGING_SHARE, NONSPEECH_SHARE = 0.50, 0.20, 0.08, 0.15  # the rest is near-silence


def _identity(rng: np.random.Generator, index: int, num_identities: int, heldout: bool) -> int:
    from avatar.data.corpus import heldout_identities, is_heldout_identity

    held = heldout_identities(num_identities)
    if heldout:
        return held[index % len(held)] if held else index % num_identities
    identity = index % num_identities
    while is_heldout_identity(identity, num_identities) and len(held) < num_identities:
        identity = (identity + 1) % num_identities
    return identity


def _voices_speech(rng: np.random.Generator) -> tuple[np.ndarray, list[PhonemeSpan], dict]:
    """One or two English sentences from a festival/flite voice, with pauses around them."""
    from avatar.data import voices
    from avatar.data.speech import sentence_for_split

    voice = voices.sample_voice(rng)
    texts = [sentence_for_split(rng, "en", False) for _ in range(int(rng.integers(1, 3)))]
    utterances = voices.synthesize_many(texts, voice)
    pieces = [np.zeros(int(rng.uniform(0.1, 0.8) * SAMPLE_RATE), np.float32)]
    cursor = len(pieces[0])
    spans: list[PhonemeSpan] = []
    for k, utterance in enumerate(utterances):
        if k:
            pause = np.zeros(int(rng.uniform(0.15, 1.2) * SAMPLE_RATE), np.float32)
            pieces.append(pause)
            cursor += len(pause)
        offset = cursor / SAMPLE_RATE
        spans += [PhonemeSpan(p.name, p.start + offset, p.end + offset) for p in utterance.phonemes]
        pieces.append(utterance.audio)
        cursor += len(utterance.audio)
    pieces.append(np.zeros(int(rng.uniform(0.2, 1.0) * SAMPLE_RATE), np.float32))
    meta = {"kind": "speech", "language": "en", "texts": texts,
            "voice": {"name": voice.label, "stretch": voice.stretch, "f0_mean": voice.f0_mean}}
    return np.concatenate(pieces), spans, meta


def _espeak_speech(rng: np.random.Generator, heldout: bool) -> tuple[np.ndarray, list[PhonemeSpan], dict]:
    from avatar.data.corpus import _compose_speech
    from avatar.data.speech import LANGUAGES

    if heldout:
        language = "en"
    else:
        language = str(LANGUAGES[int(rng.integers(len(LANGUAGES)))])
        if rng.random() < 0.45:
            language = ("en", "en-us")[int(rng.integers(2))]
    audio, spans, meta = _compose_speech(rng, language, heldout)
    meta["voice"] = dict(meta["voice"], name="espeak-ng:" + meta["voice"]["name"])
    return audio, spans, meta


def _source(rng: np.random.Generator, heldout: bool) -> tuple[np.ndarray, list[PhonemeSpan], dict]:
    """The clean sound of one clip, its phoneme spans and meta (kind, voice, ...)."""
    from avatar.data.singing import synthesize_song

    if heldout:
        return _espeak_speech(rng, True)
    roll = rng.random()
    if roll < SPEECH_SHARE:
        return _espeak_speech(rng, False)
    if roll < SPEECH_SHARE + VOICES_SHARE:
        return _voices_speech(rng)
    if roll < SPEECH_SHARE + VOICES_SHARE + SINGING_SHARE:
        audio, spans = synthesize_song(rng, float(rng.uniform(3.0, 8.0)))
        lead = np.zeros(int(rng.uniform(0.1, 0.5) * SAMPLE_RATE), np.float32)
        offset = len(lead) / SAMPLE_RATE
        spans = [PhonemeSpan(p.name, p.start + offset, p.end + offset) for p in spans]
        return np.concatenate([lead, audio, lead]).astype(np.float32), spans, {"kind": "singing", "voice": "song"}
    n = int(rng.uniform(2.0, 8.0) * SAMPLE_RATE)
    if roll < SPEECH_SHARE + VOICES_SHARE + SINGING_SHARE + NONSPEECH_SHARE:
        audio, sound = nonspeech(n, rng)
        return audio, [], {"kind": "nonspeech", "sound": sound, "voice": None}
    noise, kind = room_noise(n, rng)
    level = float(rng.uniform(-70.0, -45.0))
    return (noise * 10 ** (level / 20)).astype(np.float32), [], \
        {"kind": "silence", "sound": f"{kind} room noise at {level:.0f} dBFS", "voice": None}


def _voice_changes(audio: np.ndarray, spans: list[PhonemeSpan], rng: np.random.Generator,
                   tempo: bool) -> tuple[np.ndarray, list[PhonemeSpan], dict]:
    info: dict = {}
    if tempo and rng.random() < 0.3:
        rate = float(rng.uniform(0.85, 1.2))
        audio, scale = change_tempo(audio, rate)
        spans = rescale_spans(spans, scale)
        info["tempo"] = round(rate, 3)
    if rng.random() < 0.25:
        semitones = float(rng.uniform(-4.0, 4.0))
        audio = pitch_shift(audio, semitones)
        info["pitch_semitones"] = round(semitones, 2)
    if rng.random() < 0.25:
        ratio = float(rng.uniform(0.85, 1.18))
        audio = formant_shift(audio, ratio)
        info["formant_ratio"] = round(ratio, 3)
    elif rng.random() < 0.1:
        semitones = float(rng.uniform(-3.0, 3.0))
        audio = shift_voice(audio, semitones)
        info["voice_semitones"] = round(semitones, 2)
    return audio, spans, info


def training_clip(seed: int, index: int, num_identities: int = 200, heldout: bool = False,
                  augment: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """One motion-training clip, a pure function of (seed, index).

    Returns (audio float32 16 kHz of exactly F * 640 samples, motion float32 [F, MOTION_DIM] in spec units, meta).
    meta: "phonemes" [[name, start_s, end_s], ...] (after any tempo change), "kind" (speech, singing, nonspeech,
    silence), "voice", "augment" (what was applied), "identity", "liveliness", "num_frames".
    Held-out clips are espeak-ng English speech with held-out sentences, for held-out identities.
    `augment=False` gives the clean clip (no voice or acoustic changes).
    """
    if int(seed) < 0 or int(index) < 0:
        raise EmoteError(f"seed and index must be non-negative, got seed {seed} and index {index}")
    rng = np.random.default_rng([int(seed), 0xA06, int(index)])
    identity = _identity(rng, int(index), max(int(num_identities), 1), heldout)
    audio, spans, meta = _source(rng, heldout)
    is_voice = meta["kind"] in ("speech", "singing")
    info: dict = {}
    if augment and is_voice:
        audio, spans, info = _voice_changes(audio, spans, rng, tempo=meta["kind"] == "speech")
    peak = float(np.abs(audio).max()) if len(audio) else 0.0
    if peak > 0.95:
        audio = audio * (0.95 / peak)
    num_frames = max(int(round(len(audio) * FPS / SAMPLE_RATE)), 1)
    clean = _fit(audio, num_frames * HOP)

    liveliness = float(rng.uniform(0.5, 1.3))
    mouth = mouth_track(spans, num_frames) if is_voice else np.zeros((num_frames, len(MOUTH_FIELDS)), np.float32)
    head = motion_track(clean, num_frames, rng, liveliness=liveliness)
    columns = dict(zip(MOUTH_FIELDS, mouth.T))
    columns.update(zip(MOTION_FIELDS, head.T))
    motion = clip_motion(np.stack([columns[name] for name in MOTION_NAMES], axis=1))
    assert motion.shape == (num_frames, MOTION_DIM)

    if augment:
        noisy, acoustic = acoustic_chain(clean, rng, speech=is_voice)
        info.update(acoustic)
    else:
        noisy = clean
    meta.update(phonemes=[[p.name, round(p.start, 4), round(p.end, 4)] for p in spans], augment=info,
                identity=identity, liveliness=round(liveliness, 3), num_frames=num_frames)
    return _fit(noisy, num_frames * HOP), motion, meta
