"""Head motion, blinks and brows that loosely follow prosody (energy, pitch, stress, pauses)."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

FPS = 25
SAMPLE_RATE = 16000
HOP = SAMPLE_RATE // FPS  # 640 audio samples per video frame
MOTION_FIELDS = ("blink", "brow_raise", "yaw", "pitch", "roll", "tx", "ty")


def prosody(audio: np.ndarray, num_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame (energy in dB, F0 in Hz or 0 when unvoiced, voiced mask)."""
    padded = np.pad(audio.astype(np.float64), (512, 512 + num_frames * HOP))
    starts = np.arange(num_frames) * HOP + 512 - 512 + HOP // 2
    idx = starts[:, None] + np.arange(1024)[None, :]
    frames = padded[idx] * np.hanning(1024)[None, :]
    energy = 10 * np.log10((frames ** 2).mean(1) + 1e-9)
    spectrum = np.fft.rfft(frames, 2048, axis=1)
    acf = np.fft.irfft(np.abs(spectrum) ** 2, axis=1)[:, :400]
    lo, hi = SAMPLE_RATE // 450, SAMPLE_RATE // 70
    lag = lo + np.argmax(acf[:, lo:hi], axis=1)
    strength = acf[np.arange(num_frames), lag] / (acf[:, 0] + 1e-12)
    voiced = (strength > 0.45) & (energy > energy.max() - 35)
    f0 = np.where(voiced, SAMPLE_RATE / lag, 0.0)
    return energy.astype(np.float32), f0.astype(np.float32), voiced


def _smooth_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    noise = gaussian_filter1d(rng.normal(0, 1, n + 100), sigma)[50:50 + n]
    return noise / (noise.std() + 1e-9)


def motion_track(audio: np.ndarray, num_frames: int, rng: np.random.Generator, liveliness: float = 1.0) -> np.ndarray:
    """Per-frame [num_frames, len(MOTION_FIELDS)] motion: blinks, brows, head angles (degrees), translation."""
    energy, f0, voiced = prosody(audio, num_frames)
    active = gaussian_filter1d((energy > energy.max() - 30).astype(np.float64), 4)
    log_f0 = np.log2(np.where(voiced, f0, 1.0))
    if voiced.sum() > 3:
        mean, std = log_f0[voiced].mean(), log_f0[voiced].std() + 0.05
        pitch_z = np.where(voiced, (log_f0 - mean) / std, 0.0)
    else:
        pitch_z = np.zeros(num_frames)
    pitch_z = gaussian_filter1d(pitch_z, 2)
    rise = np.maximum(np.diff(energy, prepend=energy[:1]), 0.0)
    stress = gaussian_filter1d(np.where(rise > 6.0, 1.0, 0.0), 2.5)
    stress = stress / (stress.max() + 1e-9)

    amp = liveliness * (0.4 + 0.6 * active)
    yaw = (6.0 * _smooth_noise(rng, num_frames, 12) + 2.0 * _smooth_noise(rng, num_frames, 4)) * amp
    pitch = (2.5 * _smooth_noise(rng, num_frames, 10) - 3.0 * stress + 1.5 * pitch_z) * amp
    roll = (3.0 * _smooth_noise(rng, num_frames, 15)) * amp
    brow = np.clip(0.35 * pitch_z + 0.6 * stress + 0.15 * _smooth_noise(rng, num_frames, 20), -1.0, 1.0)

    blink = np.zeros(num_frames)
    shape = np.array([0.5, 1.0, 1.0, 0.6, 0.2])
    pause_onsets = np.flatnonzero((active[1:] < 0.3) & (active[:-1] >= 0.3)) + 1
    candidates = [int(t) for t in pause_onsets if rng.random() < 0.6]
    t = int(rng.integers(0, 60))
    while t < num_frames:
        candidates.append(t)
        t += int(rng.exponential(3.5 * FPS)) + 8
    for start in candidates:
        seg = blink[start:start + len(shape)]
        seg[:] = np.maximum(seg, shape[:len(seg)])

    tx = 0.0015 * yaw + 0.01 * _smooth_noise(rng, num_frames, 25) * liveliness
    ty = 0.0015 * pitch + 0.006 * _smooth_noise(rng, num_frames, 25) * liveliness
    return np.stack([blink, brow, yaw, pitch, roll, tx, ty], axis=1).astype(np.float32)


def rotation_speed(yaw: np.ndarray, pitch: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """Head-rotation speed in degrees per frame (backward difference; the first frame copies the second)."""
    angles = np.stack([yaw, pitch, roll], axis=1).astype(np.float64)
    step = np.linalg.norm(np.diff(angles, axis=0), axis=1)
    if len(step) == 0:
        return np.zeros(len(angles), dtype=np.float32)
    return np.concatenate([step[:1], step]).astype(np.float32)
