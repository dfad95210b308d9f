"""The invisible watermark on every generated frame, its detector, the opt-in visible badge and MP4 provenance.

    marker = Watermarker()                 # default payload: product + model, nothing about the user
    frame = marker.mark(frame)             # uint8 (H, W, 3) RGB
    detect_file("out.mp4")                 # {"found", "confidence", "payload", "frames", "agreeing", ...}

docs/watermark.md has how it works, what survives and the measurements.
"""
from .badge import add_badge
from .detect import detect_file, detect_frames
from .embed import Watermarker, default_payload
from .provenance import write_provenance

__all__ = ["Watermarker", "default_payload", "detect_frames", "detect_file", "add_badge", "write_provenance"]
