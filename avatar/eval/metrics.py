"""Oracle metrics: lip-sync correlation and offset, PSNR, SSIM, identity drift and flicker."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_erosion, gaussian_filter

PSNR_CAP = 100.0  # dB reported for identical images (JSON has no infinity)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either series is constant (a frozen mouth carries no information)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if len(a) < 2 or a.std() < 1e-9 or b.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def lagged_correlations(measured: np.ndarray, reference: np.ndarray, max_offset: int) -> np.ndarray:
    """corr[k] for lag = k - max_offset: Pearson of measured[t] with reference[t - lag] over the overlap."""
    out = np.zeros(2 * max_offset + 1)
    n = min(len(measured), len(reference))
    for k, lag in enumerate(range(-max_offset, max_offset + 1)):
        if lag >= 0:
            out[k] = pearson(measured[lag:n], reference[: n - lag])
        else:
            out[k] = pearson(measured[: n + lag], reference[-lag:n])
    return out


def lip_sync(measured: list[np.ndarray], reference: list[np.ndarray], max_offset: int = 10) -> dict:
    """r: frame-weighted mean Pearson at lag 0. offset_frames: lag of the peak of the mean cross-correlation;
    positive means the video lags the audio (the mouth moves `offset` frames late)."""
    lengths = np.array([min(len(m), len(r)) for m, r in zip(measured, reference)], np.float64)
    rs = np.array([pearson(m[:n], r[:n]) for m, r, n in zip(measured, reference, lengths.astype(int))])
    curves = np.array([lagged_correlations(m, r, max_offset) for m, r in zip(measured, reference)])
    mean_curve = (curves * lengths[:, None]).sum(0) / lengths.sum()
    offset = int(np.argmax(mean_curve)) - max_offset if np.any(mean_curve != 0) else 0
    return {"r": float((rs * lengths).sum() / lengths.sum()), "offset_frames": offset}


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB over all pixels of two uint8 arrays, capped at PSNR_CAP."""
    error = mse(a, b)
    if error <= 0:
        return PSNR_CAP
    return float(min(10 * np.log10(255.0 ** 2 / error), PSNR_CAP))


def _luma(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """Mean SSIM (Gaussian window, luma) over frames; a and b are uint8 [F, H, W, 3] or [H, W, 3]."""
    x, y = _luma(a), _luma(b)
    if x.ndim == 2:
        x, y = x[None], y[None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda v: gaussian_filter(v, sigma=(0, sigma, sigma))  # noqa: E731
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    score = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(score.mean())


def static_mask(oracle_frames: np.ndarray, margin: int = 2) -> np.ndarray:
    """Pixels that never change in the oracle's still-head frames, shrunk by `margin` pixels."""
    frames = oracle_frames.astype(np.int16)
    constant = (frames.max(axis=0) - frames.min(axis=0)).max(axis=-1) <= 1
    return binary_erosion(constant, iterations=margin) if margin else constant


def flicker(frames: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute frame-to-frame change (0-255 units) inside the static mask."""
    if len(frames) < 2 or not mask.any():
        return 0.0
    diff = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=-1)
    return float(diff[:, mask].mean())


def identity_descriptor(frames: np.ndarray) -> np.ndarray:
    """The temporal median frame: what stays of a face once speech, blinks and noise are averaged away."""
    return np.median(frames.astype(np.float32), axis=0)


def drift(frames: np.ndarray, region: np.ndarray, fps: int = 25, window_s: float = 10.0) -> float:
    """Identity change: mean absolute difference (0-255) inside `region` between the descriptors of the first
    and the last `window_s` seconds."""
    n = int(window_s * fps)
    if len(frames) < 2 * n:
        raise ValueError(f"drift needs at least {2 * window_s:.0f} s of frames, got {len(frames) / fps:.1f} s")
    first, last = identity_descriptor(frames[:n]), identity_descriptor(frames[-n:])
    return float(np.abs(first - last).mean(axis=-1)[region].mean())
