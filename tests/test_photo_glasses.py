"""Spectacles (avatar/photo/glasses.py, renderer.py): found on the photo once per avatar, kept in its cache, and held
rigid by the renderer while brows and lids move, the lid closing behind the lens. Glasses are drawn onto scikit-image's
astronaut and our drawn portrait here; Grace Hopper's portrait (matplotlib's sample data) wears real ones."""
import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from matplotlib import cbook

from avatar.data.face import FaceRenderer, FaceState, identity_for
from avatar.media import load_image
from avatar.motion.spec import INDEX
from avatar.photo import PhotoRenderer, analyse_portrait, mesh
from avatar.photo.analysis import PhotoAnalysis, detect_faces

SIZE = 512
DRAWN = Path(__file__).resolve().parents[1] / "avatar" / "assets" / "default_portrait.png"
FRAME = (20, 20, 20)


def draw_glasses(image: np.ndarray, thickness: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Two elliptic rims around the eyes and a bridge over the nose, dark lines `thickness` pixels wide; the photo
    with them and the mask of the pixels drawn."""
    p = detect_faces(image)[0]
    right, left = p[mesh.RIGHT_IRIS[0], :2], p[mesh.LEFT_IRIS[0], :2]
    iod = float(np.linalg.norm(left - right))
    axes = (round(0.38 * iod * 16), round(0.28 * iod * 16))
    centres = [right + (-0.03 * iod, 0.02 * iod), left + (0.03 * iod, 0.02 * iod)]
    bridge_y = (centres[0][1] + centres[1][1]) / 2 - 0.1 * iod
    ends = [(centres[0][0] + 0.37 * iod, bridge_y), (centres[1][0] - 0.37 * iod, bridge_y)]
    out, mask = image.copy(), np.zeros(image.shape[:2], np.uint8)
    for target, value in ((out, FRAME), (mask, 255)):
        for c in centres:
            cv2.ellipse(target, tuple(int(round(v * 16)) for v in c), axes, 0, 0, 360, value, thickness, cv2.LINE_AA,
                        shift=4)
        cv2.line(target, *(tuple(int(round(v * 16)) for v in e) for e in ends), value, thickness, cv2.LINE_AA, shift=4)
    return out, mask > 127


def _portraits() -> dict[str, np.ndarray]:
    return {"astronaut": skimage.data.astronaut(), "drawn": load_image(DRAWN)}


@pytest.fixture(scope="module")
def worn() -> dict[str, tuple[PhotoAnalysis, np.ndarray]]:
    """Each portrait with glasses drawn on: its analysis, and the drawn frame's pixels in the crop."""
    out = {}
    for name, image in _portraits().items():
        with_glasses, drawn = draw_glasses(image)
        analysis = analyse_portrait(with_glasses, SIZE, name=name)
        rim = cv2.warpAffine(drawn.astype(np.uint8), analysis.to_crop, (SIZE, SIZE), flags=cv2.INTER_NEAREST) > 0
        out[name] = (analysis, rim)
    return out


def test_glasses_are_found_where_worn_and_nowhere_else(worn):
    for name, image in _portraits().items():
        assert analyse_portrait(image, SIZE, name=name).glasses is None, name
    for name, (analysis, rim) in worn.items():
        mask = analysis.glasses
        assert mask is not None and mask.shape == (SIZE, SIZE), name
        assert (mask[rim] > 0).mean() > 0.95, name  # the whole frame
        near_rim = cv2.dilate(rim.astype(np.uint8), np.ones((15, 15), np.uint8)) > 0
        assert (mask[~near_rim] > 0).sum() < 0.15 * rim.sum(), name  # and little else
        eyes = np.zeros((SIZE, SIZE), np.uint8)
        for upper, lower in ((mesh.RIGHT_EYE_UPPER, mesh.RIGHT_EYE_LOWER), (mesh.LEFT_EYE_UPPER, mesh.LEFT_EYE_LOWER)):
            cv2.fillPoly(eyes, [np.round(analysis.landmarks[list(upper) + list(lower[::-1]), :2]).astype(np.int32)], 1)
        assert not (mask[eyes > 0]).any(), name  # the lids stay free to close
    # A real photograph with real spectacles, and drawn corpus faces with and without them.
    hopper = np.asarray(load_image(Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))))
    assert analyse_portrait(hopper, SIZE, name="grace_hopper.jpg").glasses is not None
    for index in (0, 15, 1, 2, 3):  # identities 0 and 15 of corpus seed 1 wear round and square glasses
        identity = identity_for(1, index)
        face = FaceRenderer(identity, SIZE).render(FaceState())
        assert (analyse_portrait(face, SIZE).glasses is not None) == bool(identity.glasses), index


def test_the_cache_keeps_the_mask_and_older_caches_gain_one(worn, tmp_path):
    analysis, _ = worn["drawn"]
    target = tmp_path / "analysis"
    analysis.save(target)
    assert np.array_equal(PhotoAnalysis.load(target).glasses, analysis.glasses)
    # A cache written before glasses were looked for (version 1, no mask): loading it finds them.
    meta = json.loads((target / "meta.json").read_text())
    meta["version"] = 1
    (target / "meta.json").write_text(json.dumps(meta))
    with np.load(target / "arrays.npz") as arrays:
        kept = {k: arrays[k] for k in arrays.files if k != "glasses"}
    np.savez(target / "arrays.npz", **kept)
    assert np.array_equal(PhotoAnalysis.load(target).glasses, analysis.glasses)
    bare = dataclasses.replace(analysis, glasses=None)
    bare.save(target)
    assert PhotoAnalysis.load(target).glasses is None


def _motion(analysis: PhotoAnalysis, **fields) -> np.ndarray:
    motion = analysis.rest.copy()
    for name, value in fields.items():
        motion[INDEX[name]] = value
    return motion


def _frame_coloured(image: np.ndarray) -> np.ndarray:
    return np.abs(image.astype(int) - FRAME).max(axis=2) < 40


@pytest.mark.parametrize("name", ["astronaut", "drawn"])
def test_frames_stay_rigid_while_brows_and_lids_move(worn, name):
    analysis, rim = worn[name]
    renderer = PhotoRenderer(analysis)
    crop = analysis.crop
    assert np.array_equal(renderer.render(analysis.rest), crop)
    y0, y1, x0, x1 = renderer.eyes.box
    region = np.zeros((SIZE, SIZE), bool)
    region[y0:y1, x0:x1] = True
    eyes = np.zeros((SIZE, SIZE), np.uint8)
    for upper, lower in ((mesh.RIGHT_EYE_UPPER, mesh.RIGHT_EYE_LOWER), (mesh.LEFT_EYE_UPPER, mesh.LEFT_EYE_LOWER)):
        cv2.fillPoly(eyes, [np.round(analysis.landmarks[list(upper) + list(lower[::-1]), :2]).astype(np.int32)], 1)
    free = region & ~(cv2.dilate(eyes, np.ones((9, 9), np.uint8)) > 0)  # away from the lids and lashes
    core = free & (cv2.erode(rim.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)
    grow = lambda m, px: cv2.dilate(m.astype(np.uint8), np.ones((2 * px + 1,) * 2, np.uint8)) > 0  # noqa: E731
    outline, _ = cv2.findContours(rim.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    glasses = cv2.drawContours(np.zeros((SIZE, SIZE), np.uint8), outline, -1, 1, thickness=cv2.FILLED) > 0
    # Just outside the frame (not in the lenses, where the lids move): where a dragged rim would show.
    beside = free & grow(rim, 6) & ~grow(glasses, 1) & ~_frame_coloured(crop)
    around = region & ~grow(rim, 3) & (eyes == 0)

    def changes(frame: np.ndarray) -> tuple[float, float, int, int]:
        """Mean change on the rims and around them; frame-coloured pixels beside the rims (a rim moved off its place
        by more than a pixel), and rim pixels no longer frame-coloured within a pixel."""
        diff = np.abs(frame.astype(int) - crop).mean(axis=2)
        now = _frame_coloured(frame)
        return (float(diff[core].mean()), float(diff[around].mean()), int((now & beside).sum()),
                int((core & ~grow(now, 1)).sum()))

    moved = _motion(analysis, brow_raise=1.0, blink=1.0)
    inside, outside, _, lost = changes(renderer.render(moved))
    assert outside > 2 and inside < outside / 4, (inside, outside)
    raised = _motion(analysis, brow_raise=1.0)
    _, _, ghost, _ = changes(renderer.render(raised))
    assert ghost < 0.01 * core.sum() and lost < 0.01 * core.sum(), (ghost, lost, core.sum())
    # The test can fail: without the mask the brows and lids drag the frame along.
    bare = PhotoRenderer(dataclasses.replace(analysis, glasses=None))
    bare_inside, bare_outside, _, bare_lost = changes(bare.render(moved))
    bare_ghost = changes(bare.render(raised))[2]
    assert bare_inside > outside / 4 and bare_ghost + bare_lost > 0.1 * core.sum(), (bare_inside, bare_ghost, bare_lost)
    # The lid closes behind the lens: the eye's own pixels change.
    closed = renderer.render(_motion(analysis, blink=1.0))
    assert np.abs(closed.astype(int) - crop)[eyes > 0].mean() > 25
    # A movement too small to see changes nothing visible, the frame put back included.
    tiny = renderer.render(_motion(analysis, blink=analysis.rest[INDEX["blink"]] + 0.002))
    assert np.abs(tiny.astype(int) - crop).max() <= 8


def test_frames_move_with_the_head_only(worn):
    analysis, rim = worn["astronaut"]
    renderer = PhotoRenderer(analysis)
    pose = {"yaw": 10.0, "roll": 5.0, "pitch": 3.0}
    head_only = renderer.render(_motion(analysis, **pose))
    everything = renderer.render(_motion(analysis, brow_raise=1.0, blink=1.0, **pose))
    frame = _frame_coloured(head_only)
    frame = cv2.erode(frame.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    y0, y1, x0, x1 = renderer.eyes.box
    frame[:y0 - 30] = frame[y1 + 30:] = False
    assert frame.sum() > 0.5 * rim.sum()  # the turned frame is there
    diff = np.abs(everything.astype(int) - head_only).mean(axis=2)
    assert diff[frame].mean() < 2.0 and diff[y0:y1, x0:x1].mean() > 5
