"""Finding the mark: fold the luma onto one tile, whiten its spectrum, find each pattern's correlation peak, read
the payload from the offsets between the peaks."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import numpy as np

from .pattern import PATTERNS, TILE, layout, offsets_payload

# Sizes of the file relative to the marked frames that are searched: as made, a 2x downscale, a 2x upscale.
SCALES = (1.0, 0.5, 2.0)
# The score is the sum over the PATTERNS patterns of each correlation map's peak z. Under the null each map is
# (close to, and no wider than) TILE*TILE standard normals; null_tail() integrates the sum of PATTERNS such maxima.
# 3 scales * null_tail(20.5) = 8e-8 per clip (the CRC adds little: list decoding tries 243 combinations).
SCORE_THRESHOLD = 20.5
EPS = 1e-6
CANDIDATES = 3
WHITEN_SMOOTH = 5  # bins: whitening divides by the content's local spectral magnitude, not each bin's own
MAP_BLUR = 1.0  # px: codecs widen the correlation peaks; smoothing the maps is the matched filter for that
DETAIL_SIGMA, CONTRAST_SIGMA, CONTRAST_FLOOR = 8.0, 6.0, 0.5


@dataclass
class Reading:
    score: float  # sum of the patterns' peak z
    peaks: list[float]  # each pattern's peak z
    scale: float
    payload: bytes | None

    @property
    def found(self) -> bool:
        return self.score >= SCORE_THRESHOLD and self.payload is not None


def luma(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return frame.astype(np.float32)
    return frame[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def normalise(y: np.ndarray) -> np.ndarray:
    """Divide the luma's detail by its local contrast, so flat regions (where content hides the mark least) count
    most and textured regions and edges least."""
    import cv2

    detail = y - cv2.GaussianBlur(y, (0, 0), DETAIL_SIGMA)
    contrast = np.sqrt(cv2.GaussianBlur(detail * detail, (0, 0), CONTRAST_SIGMA))
    return detail / (contrast + CONTRAST_FLOOR)


def folded_spectrum(y: np.ndarray, scale: float) -> np.ndarray:
    """Luma at `scale` times the marked size -> the rfft2 (TILE, TILE//2+1) of its normalised detail folded onto
    one tile."""
    import cv2

    if scale != 1.0:
        height, width = y.shape
        size = (max(1, round(width / scale)), max(1, round(height / scale)))
        y = cv2.resize(y, size, interpolation=cv2.INTER_CUBIC if scale < 1 else cv2.INTER_AREA)
    y = normalise(y)
    height, width = y.shape
    padded = np.zeros((-(-height // TILE) * TILE, -(-width // TILE) * TILE), np.float32)
    padded[:height, :width] = y
    folded = padded.reshape(padded.shape[0] // TILE, TILE, padded.shape[1] // TILE, TILE).sum(axis=(0, 2))
    return np.fft.rfft2(folded).astype(np.complex64)


def whiten(spectrum: np.ndarray) -> np.ndarray:
    """Divide each band bin by the content's typical magnitude around it."""
    import cv2

    group, _ = layout()
    power = (np.abs(spectrum) ** 2).astype(np.float32)
    power = cv2.blur(power, (WHITEN_SMOOTH, WHITEN_SMOOTH), borderType=cv2.BORDER_REFLECT)
    return np.where(group >= 0, spectrum / (np.sqrt(power) + EPS), 0).astype(np.complex64)


def whitened_tile(y: np.ndarray, scale: float) -> np.ndarray:
    return whiten(folded_spectrum(y, scale))


def read(white: np.ndarray, scale: float = 1.0) -> Reading:
    """A whitened tile spectrum (one frame's, or the mean of a clip's) -> the patterns' peaks and the payload."""
    from scipy.ndimage import gaussian_filter

    group, phase = layout()
    product = white * np.conj(phase)
    masked = np.stack([np.where(group == j, product, 0) for j in range(PATTERNS)])
    # Given the bins' magnitudes, a random phase makes each map value a sum of Re terms of variance |w|^2 / 2.
    sigmas = np.sqrt(np.maximum((np.abs(masked) ** 2).sum(axis=(1, 2)) / 2, EPS))
    # irfft2 returns 2 Re(sum) / TILE^2 over the half plane: rescale to the plain sum, then to z.
    maps = np.fft.irfft2(masked, s=(TILE, TILE), axes=(1, 2)) * (TILE * TILE / 2) / sigmas[:, None, None]
    # Blurred, a map is no longer unit-variance: rescale by its spread over all shifts (which also makes the
    # neighbouring shifts more alike, so the union bound over TILE^2 shifts becomes more conservative).
    maps = np.stack([gaussian_filter(m, MAP_BLUR, mode="wrap") for m in maps])
    spread = maps.reshape(PATTERNS, -1).std(axis=1)
    if spread.min() < EPS:  # a flat image: nothing in the band at all
        return Reading(0.0, [0.0] * PATTERNS, scale, None)
    maps /= spread[:, None, None]
    # The CRC picks the best-scoring combination that passes among: the reference's highest peak and its 8
    # neighbours (a codec can smear a peak across two pixels), and each data pattern's CANDIDATES highest local
    # maxima (a codec can push a true peak just below a noise peak). 9 * 27 = 243 CRC trials let noise pass the
    # CRC-10 about one time in five, so false positives are bounded by the score threshold alone.
    best_y, best_x = np.unravel_index(int(maps[0].argmax()), maps[0].shape)
    around = [((best_y + dy) % TILE, (best_x + dx) % TILE) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    options = [[(float(maps[0][yx]), yx) for yx in around]] + [_local_maxima(m, CANDIDATES) for m in maps[1:]]
    top = [max(opts) for opts in options]
    for combo in sorted(itertools.product(*options), key=lambda c: -sum(z for z, _ in c)):
        (_, (ref_y, ref_x)), data = combo[0], combo[1:]
        payload = offsets_payload([((y - ref_y) % TILE, (x - ref_x) % TILE) for _, (y, x) in data])
        if payload is not None:
            peaks = [z for z, _ in combo]
            return Reading(sum(peaks), [round(p, 2) for p in peaks], scale, payload)
    peaks = [z for z, _ in top]
    return Reading(sum(peaks), [round(p, 2) for p in peaks], scale, None)


def _local_maxima(z_map: np.ndarray, count: int) -> list[tuple[float, tuple[int, int]]]:
    """The `count` highest local maxima (3x3, cyclic) of a correlation map, as (z, (y, x))."""
    from scipy.ndimage import maximum_filter

    peaks = z_map == maximum_filter(z_map, size=3, mode="wrap")
    ys, xs = np.nonzero(peaks)
    values = z_map[ys, xs]
    top = np.argsort(values)[::-1][:count]
    return [(float(values[i]), (int(ys[i]), int(xs[i]))) for i in top]


@lru_cache(maxsize=1)
def _null_sum_tail() -> tuple[np.ndarray, np.ndarray]:
    step = 0.005
    grid = np.arange(0, 12, step)
    from scipy.stats import norm

    pdf = np.gradient(np.exp(TILE * TILE * norm.logcdf(grid)), step)
    total = pdf
    for _ in range(PATTERNS - 1):
        total = np.convolve(total, pdf) * step
    tail = np.cumsum(total[::-1])[::-1] * step
    return np.arange(len(total)) * step, tail


def null_tail(score: float) -> float:
    """P(score >= `score`) at one scale for an unmarked input, treating each map as TILE^2 independent normals
    (neighbouring shifts are correlated, so the true tail is lighter)."""
    grid, tail = _null_sum_tail()
    index = int(np.searchsorted(grid, score))
    return float(tail[index]) if index < len(tail) else 0.0


def confidence(score: float) -> float:
    """1 - the chance that an unmarked clip scores this high at some searched scale."""
    return max(0.0, 1.0 - min(1.0, len(SCALES) * null_tail(score)))


def detect_frames(frames: Iterable[np.ndarray]) -> dict:
    """Frames of one clip (uint8 RGB or luma) -> {"found", "confidence", "payload", "frames", "agreeing", ...}.

    The clip is decided on the mean of its frames' whitened spectra at each scale: the mark is the same in every
    frame, the codec noise and moving content are not. `agreeing` counts the frames that, read on their own, pass
    the same threshold with the same payload.
    """
    sums: dict[float, np.ndarray] = {}
    per_frame: list[dict[float, np.ndarray]] = []
    for frame in frames:
        y = luma(np.asarray(frame))
        spectra = {scale: folded_spectrum(y, scale) for scale in SCALES if _fits(y.shape, scale)}
        for scale, spectrum in spectra.items():
            white = whiten(spectrum)
            sums[scale] = white if scale not in sums else sums[scale] + white
        per_frame.append(spectra)
    count = len(per_frame)
    if not sums:
        return {"found": False, "confidence": 0.0, "payload": None, "frames": count, "agreeing": 0}
    readings = [read(total / count, scale) for scale, total in sums.items()]
    best = max(readings, key=lambda r: (r.found, r.score))
    agreeing = 0
    if best.found:
        for spectra in per_frame:
            single = read(whiten(spectra[best.scale]), best.scale)
            agreeing += int(single.found and single.payload == best.payload)
    return {
        "found": best.found,
        "confidence": round(confidence(best.score), 9),
        "payload": best.payload.hex() if best.found else None,
        "frames": count,
        "agreeing": agreeing,
        "score": round(best.score, 2),
        "scale": best.scale,
    }


def _fits(shape: tuple[int, ...], scale: float) -> bool:
    """Search a scale only when the frame at its marked size would span one tile and stay within 8192 px."""
    return min(shape) / scale >= TILE and max(shape) / scale <= 8192


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
MAX_VIDEO_FRAMES = 125  # the first 5 s at 25 fps: more frames add little once the mark is found


def detect_file(path) -> dict:
    """A PNG/JPEG image or an MP4/WebM video -> detect_frames' result for its frames (a video's first 125)."""
    from pathlib import Path

    from avatar.errors import EmoteError

    path = Path(path)
    if not path.is_file():
        raise EmoteError(f"no such file: {path}")
    frames = _read_image(path) if path.suffix.lower() in IMAGE_SUFFIXES else _read_video(path)
    if not frames:
        raise EmoteError(f"{path}: no image or video frames in it")
    for frame in frames:
        if min(frame.shape[:2]) < TILE // 2:
            raise EmoteError(f"{path}: {frame.shape[1]}x{frame.shape[0]} is too small to carry the mark "
                             f"(at least {TILE // 2} px a side)")
    return detect_frames(frames)


def _read_image(path) -> list[np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    from avatar.errors import EmoteError

    try:
        with Image.open(path) as image:
            return [np.asarray(image.convert("RGB"))]
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise EmoteError(f"{path}: not a readable image ({exc.__class__.__name__})") from None


def _read_video(path) -> list[np.ndarray]:
    import av

    from avatar.errors import EmoteError

    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise EmoteError(f"{path}: no video stream in it")
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) >= MAX_VIDEO_FRAMES:
                    break
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        if frames:  # a truncated file: detect on what decoded
            return frames
        raise EmoteError(f"{path}: not a readable image or video ({exc.__class__.__name__})") from None
    return frames
