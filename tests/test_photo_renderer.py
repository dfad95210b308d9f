"""The photo renderer (avatar.photo.renderer) on scikit-image's astronaut and on a drawn corpus face: the photo's
own state reproduces the crop, the lips part and close as commanded (read back by the face mesh), blinks cover the
eyes, what is drawn takes the photo's colours, head turns keep the body still, and paste-back lands in the photo."""
import cv2
import numpy as np
import pytest
import skimage.data

from avatar.data.face import FaceRenderer, FaceState, identity_for
from avatar.motion.spec import INDEX, MOTION_DIM
from avatar.photo import PhotoRenderer, analyse_portrait, mesh
from avatar.photo.analysis import GAP_PER_OPEN, PhotoAnalysis, detect_faces

SIZE = 512


@pytest.fixture(scope="module")
def astronaut() -> PhotoAnalysis:
    return analyse_portrait(skimage.data.astronaut(), SIZE, name="astronaut")


@pytest.fixture(scope="module")
def renderer(astronaut) -> PhotoRenderer:
    return PhotoRenderer(astronaut)


def _motion(analysis: PhotoAnalysis, **fields) -> np.ndarray:
    motion = analysis.rest.copy()
    for name, value in fields.items():
        motion[INDEX[name]] = value
    return motion


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def _gap(frame: np.ndarray) -> float:
    """The inner-lip gap read back by the face mesh, in inter-ocular distances."""
    faces = detect_faces(frame)
    assert faces, "the rendered frame must still show a face"
    p = faces[0]
    iod = np.linalg.norm(p[mesh.RIGHT_IRIS[0], :2] - p[mesh.LEFT_IRIS[0], :2])
    return float(np.linalg.norm(p[13, :2] - p[14, :2]) / iod)


def test_the_photos_own_state_reproduces_the_crop(astronaut, renderer):
    frame = renderer.render(astronaut.rest)
    assert frame.shape == (SIZE, SIZE, 3) and frame.dtype == np.uint8
    assert np.array_equal(frame, astronaut.crop)
    # A tiny expression change still leaves the photo essentially untouched.
    nudged = renderer.render(_motion(astronaut, mouth_open=astronaut.rest[INDEX["mouth_open"]] + 0.002))
    assert _psnr(nudged, astronaut.crop) >= 40


def test_mouth_motion_leaves_forehead_hair_and_background_alone(astronaut, renderer):
    frame = renderer.render(_motion(astronaut, mouth_open=1.0, teeth=0.8))
    nose_y = int(astronaut.landmarks[mesh.NOSE_TIP, 1])
    assert np.array_equal(frame[: nose_y - 10], astronaut.crop[: nose_y - 10])
    assert not np.array_equal(frame, astronaut.crop)


def test_the_lower_lip_moves_down_as_the_mouth_opens(astronaut, renderer):
    opens = [0.0, 0.25, 0.5, 0.75, 1.0]
    gaps = [_gap(renderer.render(_motion(astronaut, mouth_open=o, teeth=0.5))) for o in opens]
    assert all(b > a for a, b in zip(gaps, gaps[1:])), gaps
    commanded = GAP_PER_OPEN * np.asarray(opens)
    slope = np.polyfit(commanded, gaps, 1)[0]
    assert 0.8 <= slope <= 1.25, (slope, gaps)
    assert np.corrcoef(commanded, gaps)[0, 1] >= 0.95
    assert gaps[0] < 0.05  # her smiling, open mouth closes
    # Measured in pixels too: the lower inner lip's row goes down.
    lower = [detect_faces(renderer.render(_motion(astronaut, mouth_open=o)))[0][14, 1] for o in (0.2, 0.9)]
    assert lower[1] - lower[0] > 0.15 * astronaut.iod


def _iris_pixels(frame: np.ndarray, analysis: PhotoAnalysis) -> int:
    """Dark pixels in the middle of the photo's own irises (where no lash line lands when the lid closes)."""
    mask = np.zeros(frame.shape[:2], np.uint8)
    for iris in (mesh.RIGHT_IRIS, mesh.LEFT_IRIS):
        centre = analysis.landmarks[iris[0], :2]
        radius = np.mean(np.linalg.norm(analysis.landmarks[list(iris[1:]), :2] - centre, axis=1))
        cv2.circle(mask, (int(round(centre[0])), int(round(centre[1]))), int(round(0.6 * radius)), 1, -1)
    luma = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    return int(((luma < 90) & (mask > 0)).sum())


def test_blink_covers_the_eye(astronaut, renderer):
    open_dark = _iris_pixels(renderer.render(astronaut.rest), astronaut)
    half = _iris_pixels(renderer.render(_motion(astronaut, blink=0.5)), astronaut)
    closed_frame = renderer.render(_motion(astronaut, blink=1.0))
    closed = _iris_pixels(closed_frame, astronaut)
    assert open_dark > 20
    assert closed < 0.1 * open_dark and closed <= half <= open_dark
    mouth_y = int(astronaut.landmarks[13, 1])
    assert np.array_equal(closed_frame[mouth_y - 5:], astronaut.crop[mouth_y - 5:])


def test_drawn_interior_takes_the_photos_colours():
    # A closed-mouth face with nothing inside to reuse: a drawn corpus face, and the same face in grey.
    face = FaceRenderer(identity_for(0, 5), SIZE).render(FaceState())
    grey_face = cv2.cvtColor(cv2.cvtColor(face, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    for image, grey in ((face, False), (grey_face, True)):
        analysis = analyse_portrait(image, SIZE, name="drawn")
        renderer = PhotoRenderer(analysis)
        frame = renderer.render(_motion(analysis, mouth_open=0.9, teeth=1.0, tongue=0.5))
        changed = np.any(frame != analysis.crop, axis=2)
        assert changed.sum() > 200
        luma = frame[changed].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        sclera = analysis.colors["sclera"] @ np.array([0.299, 0.587, 0.114]) * 255
        assert luma.max() <= sclera + 6  # drawn teeth are never brighter than the eye whites
        if grey:
            assert np.ptp(frame.astype(int), axis=2).max() <= 1  # a grey photo stays grey
        else:
            assert _gap(frame) > 0.25


def test_head_pose_turns_the_face_and_holds_the_body(astronaut, renderer):
    turned = renderer.render(_motion(astronaut, yaw=15.0))
    assert np.isfinite(turned).all()
    nose = detect_faces(turned)[0][mesh.NOSE_TIP, 0]
    assert nose - astronaut.landmarks[mesh.NOSE_TIP, 0] > 2  # positive yaw turns the nose to the image's right
    bottom = slice(SIZE - 40, SIZE)
    assert np.abs(turned[bottom].astype(int) - astronaut.crop[bottom]).mean() < 1.0
    tilted = renderer.render(_motion(astronaut, roll=10.0, tx=0.05, ty=-0.03, pitch=5.0))
    assert _psnr(tilted[bottom], astronaut.crop[bottom]) > 30
    assert _psnr(tilted, astronaut.crop) < 30


def test_render_many_and_paste_back(astronaut, renderer):
    motion = np.stack([astronaut.rest, _motion(astronaut, mouth_open=0.8, teeth=0.5)])
    frames = renderer.render_many(motion)
    assert frames.shape == (2, SIZE, SIZE, 3)
    assert np.array_equal(frames[1], renderer.render(motion[1]))
    with pytest.raises(ValueError):
        renderer.render_many(np.zeros((2, MOTION_DIM + 1), np.float32))
    original = astronaut.original
    full = renderer.paste_back(frames[1])
    assert full.shape[0] == original.shape[0] // 2 * 2 and full.shape[1] == original.shape[1] // 2 * 2
    assert np.abs(full[-20:, -20:].astype(int) - original[-20:, -20:]).max() <= 1  # far from the face: the photo
    mouth = astronaut.landmarks[13, :2]
    back = cv2.invertAffineTransform(astronaut.to_crop) @ np.array([mouth[0], mouth[1], 1.0])
    y, x = int(back[1]), int(back[0])
    patch = (slice(y - 3, y + 4), slice(x - 8, x + 9))
    assert np.abs(full[patch].astype(int) - original[patch]).mean() > 10  # the opened mouth is in the photo
    small = renderer.paste_back(frames[1], max_side=301)
    assert max(small.shape[:2]) <= 301 and small.shape[0] % 2 == 0 and small.shape[1] % 2 == 0


def test_extreme_head_motion_never_folds_the_warp(astronaut, renderer):
    # Every pose field at the ends of its range at once: the backward map must stay one-to-one (monotone along
    # rows and columns), or the face would show twice.
    for pose in ((30.0, 20.0, 20.0, 0.2, 0.2), (-30.0, -20.0, -20.0, -0.2, -0.2), (30.0, -20.0, 20.0, -0.2, 0.2)):
        X, Y, reach = renderer.pose.backward(*pose)
        assert reach > 10
        assert (np.diff(X, axis=1) > 0).all() and (np.diff(Y, axis=0) > 0).all()
    with pytest.raises(ValueError, match="non-finite"):
        renderer.render(np.full(MOTION_DIM, np.nan, np.float32))
