"""The visible, opt-in "AI-generated" corner badge."""
from __future__ import annotations

import numpy as np

BOX_OPACITY = 0.55  # of the dark box behind the text; the frame shows through it


def add_badge(frame: np.ndarray, text: str = "AI-generated") -> np.ndarray:
    """uint8 (H, W, 3) RGB -> a copy with `text` in white on a translucent dark box in the bottom-right corner,
    its height about 1/40 of the frame's (at least 11 px)."""
    import cv2

    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) frame, got {frame.dtype} {frame.shape}")
    out = frame.copy()
    height, width = frame.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    text_height = max(7, round(min(height, width) / 40))
    scale = cv2.getFontScaleFromHeight(font, text_height, 1)
    thickness = 1 if text_height < 14 else 2
    (text_w, text_h), baseline = cv2.getTextSize(text, font, scale, thickness)
    pad, margin = max(2, text_height // 3), max(2, text_height // 2)
    x1, y1 = width - margin, height - margin
    x0, y0 = max(0, x1 - text_w - 2 * pad), max(0, y1 - text_h - baseline - 2 * pad)
    region = out[y0:y1, x0:x1]
    region[:] = (region.astype(np.float32) * (1 - BOX_OPACITY)).astype(np.uint8)
    cv2.putText(out, text, (x0 + pad, y1 - pad - baseline), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return out
