"""Spectacles in the aligned face crop: found once per avatar (avatar/photo/analysis.py), held rigid by the renderer.

A heuristic on the photo's own pixels. A frame is a thin line darker (or brighter) than the skin on both sides of it.
Rays from each eye's centre look for such a line forming a smooth ring around the eye (the rims), and a horizontal one
must cross the nose between the eyes (the bridge). Wrinkles, freckles, hair and lashes do not make a closed ring, and
the brows and the eyes themselves are left out of the search. What is found becomes a mask of the frame's pixels.
"""
from __future__ import annotations

import cv2
import numpy as np

from avatar.photo import mesh

WORK_IOD = 43.0  # the search runs on the crop scaled to this inter-ocular distance (pixels)
RAYS = 36
RIM_REACH = (0.16, 0.68)  # the rims are searched this far from an eye's centre, inter-ocular distances
RING_STEP = 0.05  # a ring's radius changes at most this much from one ray to the next (inter-ocular distances)
RING_CAP = 80.0  # a ring is scored by its line strength up to this (luma): a few strong spots do not make a ring
EYE_SKIP = 0.06  # the eye's opening, grown by this much (inter-ocular distances), is never searched nor masked,
CREASE = 0.05  # ... nor this much above it (the lid's crease)
BAND = 0.12  # the mask keeps line pixels this close to a found ring or bridge (inter-ocular distances), joined to it
FRAME_SHARE = 0.4  # ... that stand out by at least this share of the ring's own strength
BROW_FRAME_CONTRAST = 40.0  # a rim in a brow is told from the brow by colour only if they differ this much (RGB)
MIN_CONTRAST = 18.0  # luma (0-255) a frame's line stands out from the skin on both sides, at least


def _luma(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.float32)


def _shifted(padded: np.ndarray, pad: int, dy: int, dx: int, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    return padded[pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def line_response(luma: np.ndarray, directions=((0, 1), (1, 0), (1, 1), (1, -1)), widths=(1, 2, 3, 4),
                  dark: bool = True, bright: bool = True) -> np.ndarray:
    """How far each pixel stands out, darker (`dark`) or brighter (`bright`), from the pixels on both sides of it at
    a distance of `widths` along any of `directions`: high on thin lines, near zero on flat skin and on steps."""
    pad = max(widths)
    padded = cv2.copyMakeBorder(luma, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    best = np.zeros_like(luma)
    for dy, dx in directions:
        for d in widths:
            a = _shifted(padded, pad, dy * d, dx * d, luma.shape)
            b = _shifted(padded, pad, -dy * d, -dx * d, luma.shape)
            if dark:
                np.maximum(best, np.minimum(a, b) - luma, out=best)
            if bright:
                np.maximum(best, luma - np.maximum(a, b), out=best)
    return best


def _polygon(shape: tuple[int, int], points: np.ndarray, grow: float) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(points[:, :2] * 4).astype(np.int32)], 1, shift=2)
    if grow > 0:
        k = int(np.ceil(grow)) * 2 + 1
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    return mask.astype(bool)


def _ring(response: np.ndarray, centre: np.ndarray, iod: float) -> tuple[np.ndarray, np.ndarray]:
    """The smoothest strong ring around `centre`: per ray (RAYS angles, clockwise from the image's right), the radius
    of the ring and the line strength there. Found by dynamic programming over the rays, the radius changing by at
    most RING_STEP from one ray to the next, so a ring only follows a line that goes all the way round."""
    angles = np.linspace(0, 2 * np.pi, RAYS, endpoint=False, dtype=np.float32)
    radii = np.arange(RIM_REACH[0] * iod, RIM_REACH[1] * iod, 0.5, dtype=np.float32)
    mx = (centre[0] + np.cos(angles)[:, None] * radii[None, :]).astype(np.float32)
    my = (centre[1] + np.sin(angles)[:, None] * radii[None, :]).astype(np.float32)
    samples = cv2.remap(response, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    gain = np.minimum(samples, RING_CAP)
    step = max(int(round(RING_STEP * iod / 0.5)), 1)
    n = len(radii)
    # Half a turn more than a full one: the last RAYS rays' path has forgotten where it started (a closed ring).
    order = [k % RAYS for k in range(RAYS + RAYS // 2)]
    score = gain[order[0]].copy()
    back = []
    for k in order[1:]:
        padded = np.concatenate([np.full(step, -np.inf, np.float32), score, np.full(step, -np.inf, np.float32)])
        options = np.stack([padded[i:i + n] for i in range(2 * step + 1)])
        choice = options.argmax(axis=0)
        back.append(choice - step)
        score = options[choice, np.arange(n)] + gain[k]
    j = int(score.argmax())
    path = [j]
    for moves in reversed(back):
        j = j + int(moves[j])
        path.append(j)
    path = path[::-1][-RAYS:]
    rays = order[-RAYS:]
    radius = np.empty(RAYS, np.float32)
    strength = np.empty(RAYS, np.float32)
    for k, j in zip(rays, path):
        radius[k], strength[k] = radii[j], samples[k, j]
    return radius, strength


def detect(crop: np.ndarray, landmarks: np.ndarray, details: dict | None = None) -> np.ndarray | None:
    """The frame's pixels as a uint8 (S, S) mask (1 on the frame) if the face in `crop` wears glasses, else None."""
    p = np.asarray(landmarks, np.float32)
    iod_crop = float(np.linalg.norm(p[mesh.RIGHT_IRIS[0], :2] - p[mesh.LEFT_IRIS[0], :2]))
    if iod_crop < 8:
        return None
    scale = WORK_IOD / iod_crop
    size = crop.shape[0]
    side = max(int(round(size * scale)), 8)
    small = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    luma = cv2.GaussianBlur(_luma(small.astype(np.float32)), (0, 0), 0.6)
    q = p[:, :2] * scale
    iod = WORK_IOD
    lines = line_response(luma)
    eyes = np.zeros(luma.shape, bool)
    for upper, lower in ((mesh.RIGHT_EYE_UPPER, mesh.RIGHT_EYE_LOWER), (mesh.LEFT_EYE_UPPER, mesh.LEFT_EYE_LOWER)):
        eyes |= _polygon(luma.shape, q[list(upper) + list(lower[::-1])], EYE_SKIP * iod)
    lift = int(round(CREASE * iod))  # and the lid's crease above it
    eyes[:-lift] |= eyes[lift:]
    lines[eyes] = 0.0  # the lids and lashes move: never part of a frame
    brows = np.zeros(luma.shape, bool)
    for brow in (mesh.RIGHT_BROW, mesh.LEFT_BROW):
        brows |= _polygon(luma.shape, q[list(brow[:5]) + list(brow[5:][::-1])], 0.03 * iod)
    search = np.where(brows, 0.0, lines).astype(np.float32)

    rings = []
    for upper, lower in ((mesh.RIGHT_EYE_UPPER, mesh.RIGHT_EYE_LOWER), (mesh.LEFT_EYE_UPPER, mesh.LEFT_EYE_LOWER)):
        centre = q[list(upper) + list(lower)].mean(axis=0)
        rings.append((centre, *_ring(search, centre, iod)))
    below = np.sin(np.linspace(0, 2 * np.pi, RAYS, endpoint=False)) > -0.2  # under and beside the eye
    rim = [float(np.percentile(strength[below], 25)) for _, _, strength in rings]
    whole = [float(np.percentile(strength, 25)) for _, _, strength in rings]

    # The bridge: a horizontal line across the nose, between the eyes, about at their height.
    nose_x = float(q[mesh.NOSE_BRIDGE, 0])
    eye_y = float((q[mesh.RIGHT_IRIS[0], 1] + q[mesh.LEFT_IRIS[0], 1]) / 2)
    x0, x1 = max(int(round(nose_x - 0.07 * iod)), 0), int(round(nose_x + 0.07 * iod)) + 1
    y0, y1 = max(int(round(eye_y - 0.4 * iod)), 0), int(round(eye_y + 0.2 * iod)) + 1
    vertical = line_response(luma, directions=((1, 0),))[y0:y1, x0:x1]
    vertical = cv2.dilate(vertical, np.ones((3, 1), np.uint8))  # a sloping bridge: allow a row either way
    rows = np.percentile(vertical, 25, axis=1) if vertical.size else np.zeros(1, np.float32)
    bridge_row = int(np.argmax(rows))
    bridge = float(rows[bridge_row])
    if details is not None:
        details.update(rim=rim, whole=whole, bridge=bridge)
    if min(rim) < MIN_CONTRAST or min(whole) < 0.5 * MIN_CONTRAST or bridge < MIN_CONTRAST:
        return None
    core = _frame_lines(luma, eyes, brows, rings, (x0, x1, y0 + bridge_row), bridge, iod)
    mask = _frame_pixels(crop, core, eyes, brows, iod_crop)
    return mask if mask.any() else None


def _frame_lines(luma: np.ndarray, eyes: np.ndarray, brows: np.ndarray, rings, bridge: tuple[int, int, int],
          bridge_strength: float, iod: float) -> np.ndarray:
    """The frame's lines at the search scale: the line pixels joined to the rings and the bridge found (so the eyes'
    own outlines and wrinkles near a rim stay out), outside the brows. Only lines as dark (or as light) as the frame
    count: the skin between a dark rim and a dark brow is a light line that would join them."""
    seeds = np.zeros(luma.shape, np.uint8)
    near = np.zeros(luma.shape, np.uint8)
    half = max(int(round(BAND * iod)), 1)
    angles = np.linspace(0, 2 * np.pi, RAYS, endpoint=False)
    inner = []
    strengths = []
    for centre, radius, strength in rings:
        points = np.round(np.stack([centre[0] + np.cos(angles) * radius, centre[1] + np.sin(angles) * radius],
                                   axis=1) * 4).astype(int)
        on = strength >= MIN_CONTRAST
        for i in range(RAYS):
            j = (i + 1) % RAYS
            if on[i] and on[j]:
                a, b = tuple(points[i]), tuple(points[j])
                cv2.line(seeds, a, b, 1, thickness=1, shift=2)
                cv2.line(near, a, b, 1, thickness=2 * half + 1, shift=2)
        inner.append(points / 4.0)
        strengths.append(float(np.median(strength[on])) if on.any() else bridge_strength)
    x0, x1, row = bridge
    right_inner, left_inner = inner[0][0], inner[1][RAYS // 2]  # the rays towards the nose
    bx0, bx1 = int(max(min(right_inner[0], x0), 0)), int(np.ceil(max(left_inner[0], x1)))
    seeds[row, bx0:bx1 + 1] = 1
    near[max(row - half, 0):row + half + 1, bx0:bx1 + 1] = 1
    dark, light = (line_response(luma, dark=d, bright=not d) for d in (True, False))
    on_seeds = seeds > 0
    lines = dark if np.median(dark[on_seeds]) >= np.median(light[on_seeds]) else light
    lines[eyes] = 0.0
    strong = (near > 0) & (lines >= FRAME_SHARE * min(min(strengths), bridge_strength)) & ~brows
    count, labels = cv2.connectedComponents(strong.astype(np.uint8), connectivity=8)
    touched = np.unique(labels[(seeds > 0) & strong])
    return np.isin(labels, touched[touched > 0]).astype(np.uint8)


def _frame_pixels(crop: np.ndarray, core: np.ndarray, eyes: np.ndarray, brows: np.ndarray, iod: float) -> np.ndarray:
    """The frame's pixels at the crop's own scale: near the lines found at the search scale, those that stand out
    from their surroundings (a morphological black-hat, or top-hat for a light frame) as much as the lines do. Where
    a rim runs through a brow: the brow's pixels nearer the frame's colour than the hair's and the skin's, joined to
    the frame."""
    size = crop.shape[0]
    up = lambda m: cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0  # noqa: E731
    core_up = cv2.resize(core.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR) > 0.5
    if not core_up.any():
        return np.zeros((size, size), np.uint8)
    reach = max(int(round(0.05 * iod)), 1)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    near = cv2.dilate(core_up.astype(np.uint8), disc) > 0
    brows_up = up(brows)
    rows, cols = np.nonzero(near)
    pad = int(round(0.25 * iod)) + 2
    y0, y1 = max(rows.min() - pad, 0), min(rows.max() + pad + 1, size)
    x0, x1 = max(cols.min() - pad, 0), min(cols.max() + pad + 1, size)
    box = (slice(y0, y1), slice(x0, x1))
    pixels = crop[box].astype(np.float32)
    luma = _luma(pixels)
    k = max(int(round(0.2 * iod)), 3) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    dark = cv2.morphologyEx(luma, cv2.MORPH_BLACKHAT, kernel)
    light = cv2.morphologyEx(luma, cv2.MORPH_TOPHAT, kernel)
    on_core = core_up[box]
    hat = dark if np.median(dark[on_core]) >= np.median(light[on_core]) else light
    level = float(np.median(hat[on_core]))
    in_brow = brows_up[box]
    frame = (near[box] & (hat >= FRAME_SHARE * level) | on_core) & ~in_brow
    if in_brow.sum() >= 8 and frame.any():
        # The brow's area holds skin, hair and perhaps a rim: three colours, the frame's known from its lines.
        frame_colour = np.median(pixels[on_core], axis=0)
        brow = pixels[in_brow]
        order = np.argsort(np.linalg.norm(brow - frame_colour, axis=1))
        hair_colour = np.median(brow[order[len(order) * 2 // 5:len(order) * 7 // 10]], axis=0)
        skin_colour = np.median(brow[order[-len(order) // 4:]], axis=0)
        for _ in range(4):
            centres = np.stack([frame_colour, hair_colour, skin_colour])
            nearest = np.linalg.norm(brow[:, None] - centres[None], axis=2).argmin(axis=1)
            if (nearest == 1).any():
                hair_colour = np.median(brow[nearest == 1], axis=0)
            if (nearest == 2).any():
                skin_colour = np.median(brow[nearest == 2], axis=0)
        if np.linalg.norm(hair_colour - frame_colour) >= BROW_FRAME_CONTRAST:
            centres = np.stack([frame_colour, hair_colour, skin_colour])
            nearest = np.linalg.norm(pixels[..., None, :] - centres, axis=-1).argmin(axis=-1)
            candidates = (in_brow & (nearest == 0)).astype(np.uint8)
            # A rim is as thin as the frame's lines; what is thicker is the brow itself (as dark as the frame).
            inside = cv2.distanceTransform(frame.astype(np.uint8), cv2.DIST_L2, 3)[frame]
            opening = int(np.ceil(2.0 * float(np.percentile(inside, 90)))) + 3
            disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (opening, opening))
            thick = cv2.morphologyEx(candidates, cv2.MORPH_OPEN, disc)
            candidates &= cv2.dilate(thick, np.ones((3, 3), np.uint8)) == 0
            joined = (frame | (candidates > 0)).astype(np.uint8)
            count, labels = cv2.connectedComponents(joined, connectivity=8)
            touched = np.unique(labels[frame])
            frame = np.isin(labels, touched[touched > 0])
    out = np.zeros((size, size), np.uint8)
    out[box] = frame
    out[up(eyes)] = 0
    out = cv2.morphologyEx(out, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    return cv2.dilate(out, np.ones((3, 3), np.uint8))  # and the antialiased edge
