"""Face analysis (avatar.photo.analysis) on a real photograph that ships in a registry package (scikit-image's
astronaut), on drawn corpus faces, on everyday file variants, and on every bad input the issue lists."""
import io
import json
import re

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from avatar.data.face import FaceRenderer, FaceState, identity_for
from avatar.errors import EmoteError
from avatar.media import load_portrait
from avatar.motion.spec import INDEX, MOTION_DIM, REFERENCE_DIM, clip
from avatar.photo import mesh
from avatar.photo.analysis import (EYE_CENTER, IOD_FRACTION, PROFILE_WARNING_DEGREES, PhotoAnalysis, _yaw_degrees,
                                   analyse_portrait, detect_faces, pose_warnings)

SIZE = 256


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def analysis(astronaut) -> PhotoAnalysis:
    return analyse_portrait(astronaut, SIZE, name="astronaut")


def _eyes(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return landmarks[mesh.RIGHT_IRIS[0], :2], landmarks[mesh.LEFT_IRIS[0], :2]


def test_astronaut_is_cropped_level_at_the_corpus_layout(analysis):
    assert analysis.crop.shape == (SIZE, SIZE, 3) and analysis.crop.dtype == np.uint8
    assert analysis.landmarks.shape == (478, 3)
    right, left = _eyes(analysis.landmarks)
    assert abs(right[1] - left[1]) < 0.02 * SIZE  # eyes level
    assert abs(np.linalg.norm(left - right) / SIZE - IOD_FRACTION) < 0.02
    mid = (right + left) / 2 / SIZE
    assert np.allclose(mid, EYE_CENTER, atol=0.03)
    # The crop is the photo: the face's skin sits where the mesh says, with the photo's own colours.
    cheek = analysis.crop[int(analysis.landmarks[205, 1]), int(analysis.landmarks[205, 0])].astype(int)
    assert cheek[0] > cheek[2] + 20  # warm skin, not grey
    assert analysis.reference.shape == (REFERENCE_DIM,) and np.isfinite(analysis.reference).all()
    assert analysis.rest.shape == (MOTION_DIM,) and np.array_equal(clip(analysis.rest), analysis.rest)
    assert analysis.rest[INDEX["mouth_open"]] > 0.2  # she smiles with her teeth showing
    assert analysis.rest[INDEX["mouth_width"]] > 0.1
    assert analysis.rest[INDEX["blink"]] < 0.3
    assert not analysis.grey


def test_cache_round_trip_and_bad_caches(analysis, tmp_path):
    target = tmp_path / "avatar" / "analysis"
    analysis.save(target)
    analysis.save(target)  # replacing an existing cache works too
    loaded = PhotoAnalysis.load(target)
    assert np.array_equal(loaded.crop, analysis.crop)
    assert np.array_equal(loaded.landmarks, analysis.landmarks)
    assert np.array_equal(loaded.rest, analysis.rest)
    assert np.array_equal(loaded.original, analysis.original)
    assert loaded.warnings == analysis.warnings
    assert sorted(p.name for p in target.parent.iterdir()) == ["analysis"]  # no temporary left behind
    meta = json.loads((target / "meta.json").read_text())
    meta["version"] = 0
    (target / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(EmoteError, match="older version"):
        PhotoAnalysis.load(target)
    (target / "meta.json").write_text("{not json")
    with pytest.raises(EmoteError, match="missing or corrupt"):
        PhotoAnalysis.load(target)
    with pytest.raises(EmoteError, match="missing or corrupt"):
        PhotoAnalysis.load(tmp_path / "nothing-here")


def test_drawn_corpus_faces_are_found():
    # The motion model measures its training faces with the same function: drawn faces must be found at 256.
    for index in range(3):
        frame = FaceRenderer(identity_for(0, index), 256).render(FaceState())
        analysis = analyse_portrait(frame, 256, name=f"corpus {index}")
        assert np.isfinite(analysis.reference).all()
        assert analysis.rest[INDEX["mouth_open"]] < 0.15  # a closed drawn mouth reads closed


def _jpeg_with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


def test_exif_rotated_alpha_and_greyscale_photos(astronaut, analysis):
    # A phone stores the photo sideways and says so in EXIF: stored rotated 90 degrees, orientation 8 turns it back.
    sideways = np.ascontiguousarray(np.rot90(astronaut, k=-1))
    upright = load_portrait(_jpeg_with_orientation(sideways, 8), "phone.jpg")
    assert upright.shape == astronaut.shape
    rotated = analyse_portrait(upright, SIZE, name="phone.jpg")
    assert np.abs(rotated.crop.astype(int) - analysis.crop).mean() < 8  # the same upright face, JPEG aside

    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    rgba[:, :60, 3] = 0  # a transparent strip
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    opaque = load_portrait(buffer.getvalue(), "cutout.png")
    assert (opaque[:, :60] == 255).all()
    assert analyse_portrait(opaque, SIZE, name="cutout.png").crop.shape == (SIZE, SIZE, 3)

    grey = cv2.cvtColor(cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    grey_analysis = analyse_portrait(grey, SIZE, name="grey.png")
    assert grey_analysis.grey
    assert all(np.ptp(c) < 0.01 for c in grey_analysis.colors.values())


def test_no_face(tmp_path):
    with pytest.raises(EmoteError, match="no face found in blank.png"):
        analyse_portrait(np.full((300, 300, 3), 200, np.uint8), name="blank.png")


def test_tiny_face(astronaut):
    small = cv2.resize(astronaut, (180, 180), interpolation=cv2.INTER_AREA)
    with pytest.raises(EmoteError, match="too small"):
        analyse_portrait(small, SIZE, name="small.png")


def test_face_cut_off_by_the_edge(astronaut):
    chin_y = int(detect_faces(astronaut)[0][mesh.CHIN, 1])
    with pytest.raises(EmoteError, match="cut off"):
        analyse_portrait(np.ascontiguousarray(astronaut[: chin_y - 12]), SIZE, name="cut.png")


def test_face_touching_the_edge_is_padded(astronaut):
    face = detect_faces(astronaut)[0]
    top, left = int(face[:, 1].min()) + 4, int(face[:, 0].min()) - 2  # the forehead and a cheek's margin are gone
    analysis = analyse_portrait(np.ascontiguousarray(astronaut[top:, left:]), SIZE, name="edge.png")
    assert any("padded" in w for w in analysis.warnings)
    assert analysis.crop.shape == (SIZE, SIZE, 3)


def test_several_faces_take_the_largest_or_the_one_asked_for(astronaut):
    smaller = np.zeros_like(astronaut)
    smaller[56:, 56:] = cv2.resize(astronaut, (456, 456), interpolation=cv2.INTER_AREA)
    group = np.hstack([smaller, astronaut])
    first = analyse_portrait(group, SIZE, name="group.jpg")
    assert any("2 faces" in w for w in first.warnings)
    back = cv2.invertAffineTransform(first.to_crop)
    centre = back @ np.array([SIZE / 2, SIZE / 2, 1.0])
    assert centre[0] > astronaut.shape[1]  # the largest face: the full-size astronaut on the right
    second = analyse_portrait(group, SIZE, face=1, name="group.jpg")
    assert (cv2.invertAffineTransform(second.to_crop) @ np.array([SIZE / 2, SIZE / 2, 1.0]))[0] < astronaut.shape[1]
    with pytest.raises(EmoteError, match="--face 5"):
        analyse_portrait(group, SIZE, face=5, name="group.jpg")


def _turned(points: np.ndarray, degrees: float) -> np.ndarray:
    """Landmarks (x, y, z pixels) turned about the vertical axis through their centre; positive turns the nose to
    the image's right."""
    t = np.radians(degrees)
    centre = points.mean(axis=0)
    x, z = points[:, 0] - centre[0], points[:, 2] - centre[2]
    out = points.copy()
    out[:, 0] = centre[0] + x * np.cos(t) - z * np.sin(t)
    out[:, 2] = centre[2] + x * np.sin(t) + z * np.cos(t)
    return out


def test_a_profile_is_warned_about_and_a_three_quarter_view_is_not(astronaut):
    points = detect_faces(astronaut)[0]
    assert abs(_yaw_degrees(points)) < 6  # she faces the camera
    for degrees in (-70, -45, -30, 30, 45, 70):
        turned = _turned(points, degrees)
        assert np.sign(turned[mesh.NOSE_TIP, 0] - points[mesh.NOSE_TIP, 0]) == np.sign(degrees)
        assert abs(_yaw_degrees(turned) - degrees) < 5, degrees
        warned = pose_warnings(turned, "turned.png")
        assert bool(warned) == (abs(degrees) > PROFILE_WARNING_DEGREES), (degrees, warned)
    (warning,) = pose_warnings(_turned(points, 70), "turned.png")
    assert re.fullmatch(r"the face in turned.png is turned about (6[6-9]|7[0-4]) degrees; .*", warning), warning


def test_a_drawn_face_turned_30_degrees_is_no_profile():
    # Real pixels the face mesh reads: a corpus face drawn turned both ways. Its turn reads with its sign, and
    # analysing it warns about nothing (the nose-to-cheek measure used before read this face as 90 degrees).
    renderer = FaceRenderer(identity_for(0, 3), 256)
    for yaw in (-30.0, 30.0):
        image = renderer.render(FaceState(yaw=yaw))
        read = _yaw_degrees(detect_faces(image)[0])
        assert 15 <= read * np.sign(yaw) <= 50, (yaw, read)
        analysis = analyse_portrait(image, SIZE, name="three-quarter.png")
        assert not any("degrees" in w for w in analysis.warnings), analysis.warnings
