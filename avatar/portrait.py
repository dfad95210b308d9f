"""Finding the face in a portrait, so it can be cropped around it. OpenCV's bundled Haar cascade (it ships inside
the opencv-python-headless wheel: no download); no face found means a centre crop."""
from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def _cascade():
    import cv2

    return cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")


def find_face(image: np.ndarray) -> tuple[float, float, float, float] | None:
    """The largest frontal face as (x0, y0, x1, y1) pixels, or None."""
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    scale = max(1.0, max(gray.shape) / 640)  # detect on at most 640 px: fast, and plenty for a portrait
    if scale > 1:
        gray = cv2.resize(gray, (int(gray.shape[1] / scale), int(gray.shape[0] / scale)), interpolation=cv2.INTER_AREA)
    min_side = max(24, min(gray.shape) // 8)
    faces = _cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
    return (x * scale, y * scale, (x + w) * scale, (y + h) * scale)
