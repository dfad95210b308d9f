"""Face analysis of a portrait, once per avatar: find the face (MediaPipe Face Mesh), crop and align a square around
it, measure the portrait's own expression (`rest`) and face geometry (`reference`), sample the colours the renderer
needs for what the photo cannot show (mouth interior), and cache it all on disk.

The crop puts the face where the synthetic corpus puts its drawn faces (`avatar.data.face.FaceRenderer`): the eyes
level, `IOD_FRACTION` of the crop apart, their midpoint at `EYE_CENTER`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from avatar.errors import EmoteError
from avatar.motion.spec import INDEX, MOTION_DIM, REFERENCE_DIM
from avatar.photo import glasses, mesh

ANALYSIS_VERSION = 2  # 2 added the glasses mask; a version 1 cache gets it on loading
IOD_FRACTION = 0.169  # inter-ocular distance / crop side, as measured on the corpus's drawn faces
EYE_CENTER = (0.5, 0.41)  # the eyes' midpoint in the crop, fractions of its side (corpus faces)
# mouth_open -> inner-lip gap at the centre of the mouth, in inter-ocular distances: gap = GAP_PER_OPEN * mouth_open.
# 0.39 is the corpus's drawn faces' own gap (0.26 head units at mouth_open 1 over their eye spacing): mouth_open 1.0
# is a wide-open jaw, the lips parted by about 40 % of the distance between the eyes.
GAP_PER_OPEN = 0.39
NEUTRAL_MOUTH_WIDTH = 0.9  # mouth corner distance / inter-ocular distance of a relaxed photographed mouth
WIDTH_PER_SPREAD = 0.22  # relative change of the mouth's width per unit mouth_width (the corpus's factor)
OPEN_EYE_APERTURE = 0.10  # upper-to-lower lid distance / inter-ocular distance: narrower reads as a partial blink
MIN_FACE_PIXELS = 64
PROFILE_WARNING_DEGREES = 60.0
MAX_FACES = 6
DETECT_MAX_SIDE = 1600  # faces are found on a copy at most this large; the aligned crop is measured again


@dataclass
class PhotoAnalysis:
    crop: np.ndarray  # uint8 (S, S, 3) RGB: the aligned square face crop
    size: int
    rest: np.ndarray  # float32 (MOTION_DIM,): the portrait's own expression, pose fields 0
    reference: np.ndarray  # float32 (REFERENCE_DIM,)
    landmarks: np.ndarray  # float32 (478, 3) in crop pixels (x, y, z; z in pixels, negative towards the camera)
    warnings: list[str]
    original: np.ndarray | None  # uint8 (H, W, 3): the photo, for paste-back (None: not kept in memory)
    to_crop: np.ndarray  # float64 (2, 3): affine original pixels -> crop pixels
    colors: dict[str, np.ndarray] = field(default_factory=dict)  # float32 RGB in [0, 1]: lip, skin, sclera, dark
    grain: float = 0.0  # the photo's pixel noise (std of luma high-pass on the cheeks, 0-255 units)
    grey: bool = False  # a greyscale photo: everything drawn stays grey
    name: str = "portrait"
    glasses: np.ndarray | None = None  # uint8 (S, S), 1 on a spectacle frame's pixels (avatar/photo/glasses.py)

    @property
    def iod(self) -> float:
        """Inter-ocular distance (iris centres) in crop pixels."""
        return float(np.linalg.norm(self.landmarks[mesh.RIGHT_IRIS[0], :2] - self.landmarks[mesh.LEFT_IRIS[0], :2]))

    # ---- cache ---------------------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write to `directory` atomically (a temporary sibling directory, then a rename)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        try:
            np.savez(tmp / "arrays.npz", crop=self.crop, rest=self.rest, reference=self.reference,
                     landmarks=self.landmarks, to_crop=self.to_crop,
                     **{f"color_{k}": v for k, v in self.colors.items()},
                     **({} if self.glasses is None else {"glasses": np.packbits(self.glasses.astype(bool))}))
            ok, png = cv2.imencode(".png", cv2.cvtColor(self.original, cv2.COLOR_RGB2BGR))
            if not ok:
                raise EmoteError("could not encode the original photo")
            (tmp / "original.png").write_bytes(png.tobytes())
            meta = {"version": ANALYSIS_VERSION, "size": self.size, "warnings": self.warnings, "grain": self.grain,
                    "grey": self.grey, "name": self.name}
            (tmp / "meta.json").write_text(json.dumps(meta))
            old = None
            if directory.exists():
                old = directory.parent / f".{directory.name}.old.{os.getpid()}"
                os.replace(directory, old)
            os.replace(tmp, directory)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path) -> "PhotoAnalysis":
        directory = Path(directory)
        try:
            meta = json.loads((directory / "meta.json").read_text())
            version = meta.get("version")
            if version not in (1, ANALYSIS_VERSION):
                raise EmoteError(f"the face analysis in {directory} is from an older version; "
                                 "analyse the portrait again")
            with np.load(directory / "arrays.npz") as arrays:
                data = {k: arrays[k] for k in arrays.files}
            original = cv2.imread(str(directory / "original.png"), cv2.IMREAD_COLOR)
            if original is None:
                raise ValueError("original.png is unreadable")
            colors = {k[len("color_"):]: v.astype(np.float32) for k, v in data.items() if k.startswith("color_")}
            size = int(meta["size"])
            frame = None
            if "glasses" in data:
                frame = np.unpackbits(data["glasses"], count=size * size).reshape(size, size)
            elif version == 1:  # written before glasses were looked for: look now (the same crop, the same answer)
                frame = glasses.detect(data["crop"], data["landmarks"].astype(np.float32))
            analysis = cls(crop=data["crop"], size=size, rest=data["rest"].astype(np.float32),
                           reference=data["reference"].astype(np.float32),
                           landmarks=data["landmarks"].astype(np.float32),
                           warnings=list(meta["warnings"]), original=cv2.cvtColor(original, cv2.COLOR_BGR2RGB),
                           to_crop=data["to_crop"].astype(np.float64), colors=colors, grain=float(meta["grain"]),
                           grey=bool(meta["grey"]), name=str(meta.get("name", "portrait")), glasses=frame)
        except EmoteError:
            raise
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise EmoteError(f"the face analysis in {directory} is missing or corrupt ({exc}); "
                             "analyse the portrait again") from None
        if analysis.crop.shape != (analysis.size, analysis.size, 3) or analysis.landmarks.shape != (478, 3):
            raise EmoteError(f"the face analysis in {directory} is corrupt; analyse the portrait again")
        return analysis


# ---- face mesh -----------------------------------------------------------------------------------------------
_MESH_LOCK = threading.Lock()
_MESH = None


def _face_mesh():
    global _MESH
    if _MESH is None:
        import mediapipe as mp

        with quiet_native_stderr():
            mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True,
                                                   max_num_faces=MAX_FACES, min_detection_confidence=0.5)
            mesh.process(np.zeros((64, 64, 3), np.uint8))  # the graph starts (and logs) on its first image
        _MESH = mesh
    return _MESH


@contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """MediaPipe's C++ start-up writes informational lines straight to file descriptor 2, past Python's logging;
    the CLI promises one line on error, so they are dropped while the graph starts (once per process)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _mesh_faces(image: np.ndarray) -> list[np.ndarray]:
    h, w = image.shape[:2]
    with _MESH_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="SymbolDatabase.GetPrototype", category=UserWarning)
        result = _face_mesh().process(np.ascontiguousarray(image))
    return [np.array([[p.x * w, p.y * h, p.z * w] for p in face.landmark], np.float32)
            for face in result.multi_face_landmarks or []]


def _windows(h: int, w: int, side: int) -> list[tuple[int, int]]:
    """Top-left corners of square windows of `side` covering an h x w image with half-window overlap."""
    def starts(length: int) -> list[int]:
        if length <= side:
            return [0]
        count = int(np.ceil((length - side) / (side / 2))) + 1
        return sorted({round(i * (length - side) / (count - 1)) for i in range(count)})
    return [(y, x) for y in starts(h) for x in starts(w)]


def detect_faces(image: np.ndarray) -> list[np.ndarray]:
    """Every face's 478 landmarks as float32 (478, 3) in `image` pixels (z in pixels), largest face first.

    MediaPipe's detector sees the whole picture shrunk to 128 pixels, so a face that is small in a wide or large
    photo goes unseen: when the whole image shows none, overlapping square windows are searched.
    """
    h, w = image.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
    small = image
    if scale < 1.0:
        small = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    faces = _mesh_faces(small)
    side = min(sh, sw)
    while not faces and side >= 192:
        for y, x in _windows(sh, sw, side):
            for face in _mesh_faces(small[y:y + side, x:x + side]):
                face[:, 0] += x
                face[:, 1] += y
                width = np.ptp(face[:, 0])
                if all(np.linalg.norm(face[1, :2] - other[1, :2]) > 0.4 * width for other in faces):
                    faces.append(face)
        side //= 2
    faces = [face / scale for face in faces]
    faces.sort(key=lambda p: -float(np.ptp(p[:, 0]) * np.ptp(p[:, 1])))
    return faces


# ---- measurements --------------------------------------------------------------------------------------------
def _iod(points: np.ndarray) -> float:
    return float(np.linalg.norm(points[mesh.RIGHT_IRIS[0], :2] - points[mesh.LEFT_IRIS[0], :2]))


def _dist(points: np.ndarray, a: int, b: int) -> float:
    return float(np.linalg.norm(points[a, :2] - points[b, :2]))


def eye_aperture(points: np.ndarray) -> float:
    """Mean upper-to-lower lid distance of the two eyes, pixels."""
    return (_dist(points, 159, 145) + _dist(points, 386, 374)) / 2


def reference_embedding(landmarks: np.ndarray) -> np.ndarray:
    """Scale-free face geometry: REFERENCE_DIM ratios of landmark distances (the same on drawn faces and photos)."""
    p = np.asarray(landmarks, np.float32)
    iod = max(_iod(p), 1e-6)
    face_width = max(_dist(p, mesh.RIGHT_CHEEK, mesh.LEFT_CHEEK), 1e-6)
    values = [
        _dist(p, *mesh.MOUTH_CORNERS) / iod,  # mouth width
        _dist(p, mesh.FOREHEAD, mesh.CHIN) / face_width,  # face height / width
        face_width / iod,
        _dist(p, 0, 13) / iod,  # upper lip thickness
        _dist(p, 14, 17) / iod,  # lower lip thickness
        eye_aperture(p) / iod,
        _dist(p, mesh.NOSE_BRIDGE, mesh.NOSE_BOTTOM) / iod,  # nose length
        _dist(p, 17, mesh.CHIN) / iod,  # lower lip to chin
    ]
    assert len(values) == REFERENCE_DIM
    return np.asarray(values, np.float32)


def measure_rest(landmarks: np.ndarray, crop: np.ndarray | None = None) -> np.ndarray:
    """The portrait's own expression in motion units (spec.py), pose fields 0."""
    p = np.asarray(landmarks, np.float32)
    iod = max(_iod(p), 1e-6)
    rest = np.zeros(MOTION_DIM, np.float32)
    gap = _dist(p, *mesh.INNER_LIP_MID) / iod
    rest[INDEX["mouth_open"]] = np.clip(gap / GAP_PER_OPEN, 0.0, 1.0)
    width = _dist(p, *mesh.MOUTH_CORNERS) / iod
    # Only a spread (smiling) mouth is read: a naturally small mouth cannot be told from a pursed one.
    rest[INDEX["mouth_width"]] = np.clip((width / NEUTRAL_MOUTH_WIDTH - 1.0) / WIDTH_PER_SPREAD, 0.0, 1.0)
    rest[INDEX["blink"]] = np.clip(1.0 - eye_aperture(p) / iod / OPEN_EYE_APERTURE, 0.0, 1.0)
    if crop is not None and gap > 0.05:
        rest[INDEX["teeth"]] = _teeth_shown(p, crop)
    return rest


def _polygon_mask(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(points[:, :2] * 4).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=2)
    return mask.astype(bool)


def _inner_mouth_mask(p: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return _polygon_mask(shape, p[list(mesh.UPPER_INNER) + list(mesh.LOWER_INNER[::-1])])


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _teeth_shown(p: np.ndarray, crop: np.ndarray) -> float:
    inner = _inner_mouth_mask(p, crop.shape[:2])
    if inner.sum() < 8:
        return 0.0
    luma = _luma(crop[inner].astype(np.float32))
    skin = _luma(_sample_colors(p, crop)["skin"] * 255)
    return float(np.clip(np.mean(luma > 0.8 * skin) * 1.5, 0.0, 1.0))


def _sample_colors(p: np.ndarray, crop: np.ndarray) -> dict[str, np.ndarray]:
    shape = crop.shape[:2]
    img = crop.astype(np.float32) / 255.0

    def median(mask: np.ndarray, fallback) -> np.ndarray:
        return np.median(img[mask], axis=0).astype(np.float32) if mask.sum() >= 4 else np.asarray(fallback, np.float32)

    outer = _polygon_mask(shape, p[list(mesh.UPPER_OUTER) + list(mesh.LOWER_OUTER[::-1])])
    lips = outer & ~_inner_mouth_mask(p, shape)
    cheeks = np.zeros(shape, bool)
    for patch in (mesh.RIGHT_CHEEK_PATCH, mesh.LEFT_CHEEK_PATCH):
        cheeks |= _polygon_mask(shape, cv2.convexHull(p[list(patch), :2]).reshape(-1, 2))
    skin = median(cheeks, (0.8, 0.6, 0.5))
    lip = median(lips, skin * np.array([0.9, 0.6, 0.6], np.float32))
    eyes = np.zeros(shape, bool)
    for upper, lower in ((mesh.RIGHT_EYE_UPPER, mesh.RIGHT_EYE_LOWER), (mesh.LEFT_EYE_UPPER, mesh.LEFT_EYE_LOWER)):
        eyes |= _polygon_mask(shape, p[list(upper) + list(lower[::-1])])
    if eyes.sum() >= 8:
        eye_pixels = img[eyes]
        bright = _luma(eye_pixels) >= np.percentile(_luma(eye_pixels), 95)
        sclera = np.median(eye_pixels[bright], axis=0).astype(np.float32)
    else:
        sclera = np.clip(skin * 1.15, 0, 1)
    face = _polygon_mask(shape, p[list(mesh.FACE_OVAL)])
    face_pixels = img[face] if face.sum() >= 8 else img.reshape(-1, 3)
    face_luma = _luma(face_pixels)
    dark = np.median(face_pixels[face_luma <= np.percentile(face_luma, 3)], axis=0).astype(np.float32)
    colors = {"lip": lip, "skin": skin, "sclera": sclera, "dark": dark}
    inner = _inner_mouth_mask(p, shape)
    if inner.sum() >= 8:
        mouth_pixels = img[inner]
        luma = _luma(mouth_pixels)
        colors["teeth"] = np.median(mouth_pixels[luma >= np.percentile(luma, 70)], axis=0).astype(np.float32)
    return colors


def _grain(p: np.ndarray, crop: np.ndarray) -> float:
    luma = _luma(crop.astype(np.float32))
    residual = luma - cv2.GaussianBlur(luma, (0, 0), 1.0)
    cheeks = np.zeros(crop.shape[:2], bool)
    for patch in (mesh.RIGHT_CHEEK_PATCH, mesh.LEFT_CHEEK_PATCH):
        cheeks |= _polygon_mask(crop.shape[:2], cv2.convexHull(p[list(patch), :2]).reshape(-1, 2))
    if cheeks.sum() < 16:
        return 1.0
    # Median absolute deviation: edges (a blush, a beard's border) are outliers, not grain.
    values = residual[cheeks]
    return float(min(1.4826 * np.median(np.abs(values - np.median(values))), 8.0))


def _is_grey(image: np.ndarray) -> bool:
    sample = image[:: max(1, image.shape[0] // 256), :: max(1, image.shape[1] // 256)].astype(np.int16)
    chroma = np.abs(sample - sample.mean(axis=2, keepdims=True)).max(axis=2)
    return bool(np.percentile(chroma, 95) <= 6)


def _yaw_degrees(p: np.ndarray) -> float:
    """The head's turn about the vertical axis, from the mesh's depth: the angle by which the line between the face's
    outer eye corners and cheeks leaves the image plane (positive: the nose turned to the image's right)."""
    pairs = ((33, 263), (mesh.RIGHT_CHEEK, mesh.LEFT_CHEEK), (127, 356))  # the subject's right -> left
    across = sum(p[left, :3].astype(np.float64) - p[right, :3] for right, left in pairs)
    return math.degrees(math.atan2(float(across[2]), math.hypot(float(across[0]), float(across[1]))))


def pose_warnings(points: np.ndarray, name: str) -> list[str]:
    """Warnings about the face's pose in the photo, from its landmarks (x, y and z in pixels)."""
    yaw = _yaw_degrees(points)
    if abs(yaw) > PROFILE_WARNING_DEGREES:
        return [f"the face in {name} is turned about {abs(yaw):.0f} degrees; a frontal photo animates better"]
    return []


# ---- the analysis --------------------------------------------------------------------------------------------
def _alignment(points: np.ndarray, size: int) -> np.ndarray:
    """The similarity transform (2, 3) that puts the eyes level, IOD_FRACTION * size apart, centred at EYE_CENTER."""
    right, left = points[mesh.RIGHT_IRIS[0], :2].astype(np.float64), points[mesh.LEFT_IRIS[0], :2].astype(np.float64)
    dx, dy = left - right
    angle = math.atan2(dy, dx)
    scale = IOD_FRACTION * size / max(math.hypot(dx, dy), 1e-6)
    cos, sin = math.cos(-angle) * scale, math.sin(-angle) * scale
    mid = (left + right) / 2
    target = np.array(EYE_CENTER) * size
    rot = np.array([[cos, -sin], [sin, cos]])
    return np.hstack([rot, (target - rot @ mid)[:, None]])


def analyse_portrait(image: np.ndarray, size: int = 512, face: int | None = None,
                     name: str = "portrait") -> PhotoAnalysis:
    """Find the face in `image` (uint8 (H, W, 3) RGB), crop and align it at `size`, and measure it."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise EmoteError(f"{name} must be an RGB image (got an array of shape {list(image.shape)}, {image.dtype})")
    if not 64 <= size <= 2048:
        raise EmoteError(f"the crop size must be 64-2048 pixels, got {size}")
    faces = detect_faces(image)
    if not faces:
        raise EmoteError(f"no face found in {name}")
    warnings: list[str] = []
    if face is None:
        index = 0
        if len(faces) > 1:
            warnings.append(f"{len(faces)} faces found in {name}; using the largest (pick another with --face N)")
    else:
        if not 0 <= face < len(faces):
            raise EmoteError(f"{name} has {len(faces)} face(s); --face {face} does not exist")
        index = face
    points = faces[index]
    h, w = image.shape[:2]
    face_side = max(np.ptp(points[:, 0]), np.ptp(points[:, 1]))
    if face_side < MIN_FACE_PIXELS:
        raise EmoteError(f"the face in {name} is too small ({face_side:.0f} pixels; at least {MIN_FACE_PIXELS} needed)")
    critical = points[list(mesh.CRITICAL), :2]
    tolerance = 0.01 * face_side
    if (critical[:, 0] < -tolerance).any() or (critical[:, 0] > w - 1 + tolerance).any() or \
            (critical[:, 1] < -tolerance).any() or (critical[:, 1] > h - 1 + tolerance).any():
        raise EmoteError(f"the face in {name} is cut off by the image edge "
                         "(its eyes, mouth or chin are outside the photo)")
    warnings += pose_warnings(points, name)

    to_crop = _alignment(points, size)
    scale = math.hypot(to_crop[0, 0], to_crop[1, 0])
    source = image
    pre = 1.0
    if scale < 0.6:  # shrink with area averaging first, so the warp does not alias
        pre = min(1.0, scale * 1.5)
        source = cv2.resize(image, (max(1, round(w * pre)), max(1, round(h * pre))), interpolation=cv2.INTER_AREA)
    warp = to_crop.copy()
    warp[:, :2] /= pre
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64)
    back = cv2.invertAffineTransform(to_crop)
    reach = corners @ back.T
    if (reach[:, 0] < 0).any() or (reach[:, 0] > w).any() or (reach[:, 1] < 0).any() or (reach[:, 1] > h).any():
        warnings.append(f"the face in {name} is near the image edge; the crop is padded")
    crop = cv2.warpAffine(source, warp, (size, size), flags=cv2.INTER_CUBIC if pre == 1.0 else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
    if scale > 2.0:
        warnings.append(f"the face in {name} is small ({_iod(points):.0f} pixels between the eyes): the {size}-pixel "
                        f"crop is upscaled {scale:.1f}x")

    # Measure again on the aligned crop: MediaPipe is more precise on a face that fills its view.
    in_crop = detect_faces(crop)
    if in_crop:
        centre = np.array(EYE_CENTER) * size
        landmarks = min(in_crop, key=lambda p: float(np.linalg.norm(p[168, :2] - centre)))
    else:
        landmarks = points.copy()
        landmarks[:, :2] = points[:, :2] @ to_crop[:, :2].T + to_crop[:, 2]
        landmarks[:, 2] = points[:, 2] * scale
    landmarks = landmarks.astype(np.float32)
    return PhotoAnalysis(
        crop=crop, size=size, rest=measure_rest(landmarks, crop), reference=reference_embedding(landmarks),
        landmarks=landmarks, warnings=warnings, original=image, to_crop=to_crop,
        colors=_sample_colors(landmarks, crop), grain=_grain(landmarks, crop), grey=_is_grey(crop), name=name,
        glasses=glasses.detect(crop, landmarks),
    )
