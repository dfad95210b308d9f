"""Media I/O: portraits (PIL), audio files and MP4 output (PyAV). Bad files raise EmoteError naming the file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import AUDIO_SAMPLE_RATE, VIDEO_FPS
from .errors import EmoteError

MAX_IMAGE_PIXELS = 40_000_000  # a 40 MP portrait is plenty; larger is treated as a decompression bomb


def load_image(path: str | Path) -> np.ndarray:
    """Any PIL-readable image (PNG, JPEG, WebP, ...) -> RGB uint8 (H, W, 3)."""
    path = Path(path)
    if not path.is_file():
        raise EmoteError(f"image {path} does not exist")
    return decode_image(path.read_bytes(), str(path))


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    import io
    import warnings

    if not data:
        raise EmoteError(f"{name} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise EmoteError(f"{name} is too large ({image.width}x{image.height} pixels)")
                image.load()
                return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise EmoteError(f"{name} is not a readable image (not a PNG, JPEG, WebP or other known format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise EmoteError(f"{name} is not a readable image: {exc}") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise EmoteError(f"{name} is too large: {exc}") from exc


HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


def load_portrait(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """A portrait photo as it is meant to be seen -> RGB uint8 (H, W, 3), sRGB.

    Unlike `decode_image` it applies the EXIF orientation (phone photos are stored sideways), converts ICC-tagged
    images (Display P3, Adobe RGB, CMYK) to sRGB, scales 16-bit images to 8 bits and composites transparency on
    white. Oversized images are rejected from their header, before any pixel is decoded; HEIC gets a clear error.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = name or "image"
    else:
        path = Path(source)
        name = name or str(path)
        if not path.is_file():
            raise EmoteError(f"image {path} does not exist")
        data = path.read_bytes()
    return decode_portrait(data, name)


def decode_portrait(data: bytes, name: str = "image") -> np.ndarray:
    import io
    import warnings

    from PIL import ImageOps

    if not data:
        raise EmoteError(f"{name} is empty")
    if len(data) >= 12 and data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS:
        raise EmoteError(f"{name} is a HEIC/HEIF photo, which is not supported; convert it to JPEG or PNG")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                # Image.open reads only the header: the size is known before anything is decoded.
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise EmoteError(f"{name} is too large ({image.width}x{image.height} pixels; at most "
                                     f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels)")
                image.load()
                return _to_srgb_array(ImageOps.exif_transpose(image))
    except UnidentifiedImageError:
        raise EmoteError(f"{name} is not a readable image (not a PNG, JPEG, WebP or other known format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise EmoteError(f"{name} is too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise EmoteError(f"{name} is not a readable image: {exc}") from exc


def _to_srgb_array(image: Image.Image) -> np.ndarray:
    icc = image.info.get("icc_profile")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        icc = None
    if image.mode == "P":
        image = image.convert("RGBA")
    if icc and image.mode in ("RGB", "RGBA", "CMYK", "L", "LA"):
        image = _icc_to_srgb(image, icc)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "RGB" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.ascontiguousarray(np.asarray(image.convert("RGB")))


def _icc_to_srgb(image: Image.Image, icc: bytes) -> Image.Image:
    import io

    from PIL import ImageCms

    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    base = image.convert({"RGBA": "RGB", "LA": "L"}.get(image.mode, image.mode))
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        converted = ImageCms.profileToProfile(base, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image  # an unreadable profile: use the pixels as they are
    if converted is None:
        return image
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


def crop_square(image: np.ndarray, box: tuple[float, float, float, float] | None = None, margin: float = 0.6) -> np.ndarray:
    """A square crop around `box` (x0, y0, x1, y1 in pixels, e.g. a detected face) grown by `margin` on each side,
    or the largest centred square when there is no box; clipped to the image."""
    h, w = image.shape[:2]
    if box is None:
        side = min(h, w)
        cx, cy = w / 2, h / 2
    else:
        x0, y0, x1, y1 = box
        side = min(max(x1 - x0, y1 - y0) * (1 + 2 * margin), h, w)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    side = int(side)
    return image[top : top + side, left : left + side]


def resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


def load_audio(path: str | Path, sample_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """Any FFmpeg-readable audio (WAV, MP3, FLAC, OGG, M4A, ...) -> mono float32 at `sample_rate`."""
    path = Path(path)
    if not path.is_file():
        raise EmoteError(f"audio {path} does not exist")
    if path.stat().st_size == 0:
        raise EmoteError(f"audio {path} is empty")
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise EmoteError(f"{path} has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as exc:
        raise EmoteError(f"audio {path} is not readable: {exc}") from exc
    if not chunks:
        raise EmoteError(f"audio {path} contains no samples")
    return np.concatenate(chunks).astype(np.float32)


def frame_count(num_samples: int, sample_rate: int = AUDIO_SAMPLE_RATE) -> int:
    """Video frames for an audio clip: its duration times 25, rounded."""
    return int(round(num_samples * VIDEO_FPS / sample_rate))


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    audio: np.ndarray | None = None,
    sample_rate: int = AUDIO_SAMPLE_RATE,
    fps: int = VIDEO_FPS,
    crf: int = 18,
) -> int:
    """H.264 MP4 at exactly `fps`, with optional AAC audio; written to a temp file and renamed into place.

    Frames are consumed one at a time, so memory stays bounded whatever the length. Returns the frame count.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".mp4")
    os.close(fd)
    count = 0
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            video = container.add_stream("libx264", rate=fps)
            video.pix_fmt = "yuv420p"
            video.options = {"crf": str(crf), "preset": "veryfast"}
            audio_stream = None
            if audio is not None:
                audio_stream = container.add_stream("aac", rate=sample_rate, layout="mono")
            for frame in frames:
                if count == 0:
                    video.height, video.width = frame.shape[:2]
                image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                image.pts = count
                container.mux(video.encode(image))
                count += 1
            container.mux(video.encode(None))
            if audio_stream is not None:
                _encode_audio(container, audio_stream, audio, sample_rate)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return count


def _encode_audio(container, stream, audio: np.ndarray, sample_rate: int, chunk: int = 1024) -> None:
    samples = np.clip(audio, -1, 1).astype(np.float32)
    for start in range(0, len(samples), chunk):
        block = samples[start : start + chunk][None, :]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="flt", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = start
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
