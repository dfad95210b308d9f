"""The procedural face renderer: determinism, diversity, antialiasing, pose and expression."""
from __future__ import annotations

import numpy as np
import pytest

from avatar.data.face import FaceRenderer, FaceState, Identity, identity_for, render_frames, still_head


def test_same_identity_and_state_render_identical_bytes():
    a = FaceRenderer(identity_for(7, 3), 96).render(FaceState(mouth_open=0.5, yaw=10))
    b = FaceRenderer(identity_for(7, 3), 96).render(FaceState(mouth_open=0.5, yaw=10))
    assert a.dtype == np.uint8 and a.shape == (96, 96, 3)
    assert np.array_equal(a, b)


def test_distinct_identities_look_distinct():
    frames = [FaceRenderer(identity_for(0, i), 64).render() for i in range(40)]
    flat = np.stack(frames).reshape(40, -1).astype(np.float32)
    distances = np.abs(flat[:, None, :] - flat[None, :, :]).mean(-1)
    off_diagonal = distances[~np.eye(40, dtype=bool)]
    assert off_diagonal.min() > 3.0  # mean absolute difference in 0-255 units between any two faces
    assert len({identity_for(0, i) for i in range(500)}) == 500
    assert identity_for(0, 1) != identity_for(1, 1)


def test_identity_round_trips_through_dict():
    identity = identity_for(3, 5)
    assert Identity.from_dict(identity.to_dict()) == identity


def test_edges_are_antialiased():
    frame = FaceRenderer(identity_for(0, 2), 128).render()
    # A hard-edged renderer would only produce a handful of colours; blended edge pixels give many.
    assert len(np.unique(frame.reshape(-1, 3), axis=0)) > 500


@pytest.mark.parametrize("size", [32, 200])
def test_any_resolution(size):
    assert FaceRenderer(identity_for(0, 0), size).render().shape == (size, size, 3)


def test_expression_and_pose_change_the_right_pixels():
    renderer = FaceRenderer(identity_for(0, 4), 128)
    neutral = renderer.render()
    r0, r1, c0, c1 = renderer.mouth_box()
    opened = renderer.render(FaceState(mouth_open=1.0))
    diff = np.abs(opened.astype(int) - neutral.astype(int)).sum(-1)
    assert diff[r0:r1, c0:c1].sum() > 0.9 * diff.sum() > 0  # opening the mouth only changes the mouth
    blinked = renderer.render(FaceState(blink=1.0))
    assert np.abs(blinked.astype(int) - neutral.astype(int)).sum() > 0
    turned = renderer.render(FaceState(yaw=20, roll=10))
    assert np.abs(turned.astype(int) - neutral.astype(int)).mean() > 1
    assert np.array_equal(renderer.render(still_head(FaceState(mouth_open=0.4, yaw=20, tx=0.1))),
                          renderer.render(FaceState(mouth_open=0.4)))


def test_face_box_follows_the_head():
    renderer = FaceRenderer(identity_for(0, 1), 64)
    x0, y0, x1, y1 = renderer.face_box(FaceState())
    assert 0 < x0 < x1 < 1 and 0 < y0 < y1 < 1
    assert renderer.face_box(FaceState(tx=0.2))[0] > x0


def test_render_frames_stacks_states():
    frames = render_frames(identity_for(0, 0), [FaceState(), FaceState(mouth_open=1.0)], 48)
    assert frames.shape == (2, 48, 48, 3) and not np.array_equal(frames[0], frames[1])
