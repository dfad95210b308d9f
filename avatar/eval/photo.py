"""The product check on real portraits: the mouth gap read back from rendered frames by an independent face-mesh
model, set against the speech envelope (issue 31's "real photos, real speech" targets).

- `mouth_gaps`: MediaPipe Face Mesh (a fresh tracker, not the renderer's analysis) reads each frame's inner-lip
  gap (landmarks 13 and 14) in units of the inter-ocular distance (iris centres 468 and 473).
- `speech_envelope`: log RMS per 40 ms frame.
- `sync_report`: r between the two at lags -2..2 frames (the best lag is reported; |lag| <= 1 is the target), the
  mean gap in the quietest fifth of frames over the loudest fifth, and the loudest fifth's mean gap.
"""
from __future__ import annotations

import warnings

import numpy as np

SAMPLES_PER_FRAME = 640
UPPER_INNER_LIP, LOWER_INNER_LIP = 13, 14
LEFT_IRIS, RIGHT_IRIS = 468, 473


def mouth_gaps(frames) -> np.ndarray:
    """Inner-lip gap / inter-ocular distance per frame (NaN where no face is found), from RGB uint8 frames."""
    import mediapipe as mp

    from avatar.photo.analysis import quiet_native_stderr

    gaps = []
    with quiet_native_stderr():
        mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=True,
                                               min_detection_confidence=0.3, min_tracking_confidence=0.3)
        mesh.process(np.zeros((64, 64, 3), np.uint8))
    with mesh, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="SymbolDatabase.GetPrototype", category=UserWarning)
        for frame in frames:
            result = mesh.process(np.ascontiguousarray(frame))
            if not result.multi_face_landmarks:
                gaps.append(np.nan)
                continue
            points = result.multi_face_landmarks[0].landmark
            h, w = frame.shape[:2]

            def xy(i: int) -> np.ndarray:
                return np.array([points[i].x * w, points[i].y * h])

            iod = np.linalg.norm(xy(LEFT_IRIS) - xy(RIGHT_IRIS))
            gaps.append(float(np.linalg.norm(xy(UPPER_INNER_LIP) - xy(LOWER_INNER_LIP)) / max(iod, 1e-6)))
    return np.asarray(gaps, np.float64)


def speech_envelope(audio: np.ndarray, num_frames: int) -> np.ndarray:
    """Log RMS (dB) of each 40 ms frame's audio."""
    padded = np.pad(np.asarray(audio, np.float64), (0, max(0, num_frames * SAMPLES_PER_FRAME - len(audio))))
    blocks = padded[: num_frames * SAMPLES_PER_FRAME].reshape(num_frames, SAMPLES_PER_FRAME)
    return 10 * np.log10(np.mean(blocks**2, axis=1) + 1e-10)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or a[ok].std() == 0 or b[ok].std() == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def sync_report(gaps: np.ndarray, envelope: np.ndarray, max_lag: int = 2) -> dict:
    """r at the best lag (positive: the mouth follows the audio), and the quiet/loud fifths."""
    n = min(len(gaps), len(envelope))
    gaps, envelope = gaps[:n], envelope[:n]
    by_lag = {}
    for lag in range(-max_lag, max_lag + 1):
        if lag >= 0:
            by_lag[lag] = _corr(gaps[lag:], envelope[: n - lag])
        else:
            by_lag[lag] = _corr(gaps[: n + lag], envelope[-lag:])
    best = max(by_lag, key=lambda k: -np.inf if np.isnan(by_lag[k]) else by_lag[k])
    order = np.argsort(envelope)
    fifth = max(1, n // 5)
    quiet, loud = np.nanmean(gaps[order[:fifth]]), np.nanmean(gaps[order[-fifth:]])
    return {
        "frames": int(n),
        "found": float(np.isfinite(gaps).mean()),
        "r": round(by_lag[best], 4),
        "lag_frames": int(best),
        "r_by_lag": {str(k): round(v, 4) for k, v in by_lag.items()},
        "quiet_over_loud": round(float(quiet / loud), 4) if loud > 0 else None,
        "loud_gap_iod": round(float(loud), 4),
        "quiet_gap_iod": round(float(quiet), 4),
    }
