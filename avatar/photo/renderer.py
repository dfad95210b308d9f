"""The photo renderer: a motion frame (avatar/motion/spec.py) -> a frame made of the portrait's own pixels.

Per frame, the jaw/lips and the lids/brows become per-column backward maps inside their regions of the head's own
frame (avatar/photo/mouth.py, `_Eye`); with the head at the photo's pose each region is sampled from the photo by one
`cv2.remap`, and everything else is the crop's own pixels. A head pose adds a smooth backward map (warp.PoseField)
that the regions' maps are composed with, and the frame is sampled by one remap. Then the mouth interior is drawn
where the lips part. The lids need nothing drawn: the upper lid's own skin, lashes at its edge, slides down over the
eye, which it hides. Spectacles (the analysis's glasses mask) stay rigid with the head: while the lids and brows move,
the eye region is sampled from a copy of the photo with the frame painted out, and the frame's own pixels, moved by
the head pose only, go back on top, so a lid closes behind the lens. Motion equal to the photo's `rest` returns the
crop itself.
"""
from __future__ import annotations

import cv2
import numpy as np

from avatar.errors import EmoteError

from avatar.motion.spec import INDEX, MOTION_DIM, POSE_NAMES, clip
from avatar.photo import mesh
from avatar.photo.analysis import PhotoAnalysis
from avatar.photo.mouth import Mouth
from avatar.photo.warp import PoseField, Segment, lookup, piecewise, table

BROW_RAISE = 0.1  # brow lift at brow_raise = 1, inter-ocular distances
LID_OVERSHOOT = 0.015
LASH = 0.035  # the upper lash line's thickness above the mesh's lid line, inter-ocular distances
FRAME_FEATHER = 1.5  # pixels over which a spectacle frame's rigid pixels blend into the moving ones around them
_POSE = [INDEX[n] for n in POSE_NAMES]


class _Eye:
    """One eye and brow: per-column lines, and a backward map that lowers the lid and raises the brow."""

    def __init__(self, p: np.ndarray, upper, lower, brow, size: int, iod: float, x_limits: tuple[float, float]):
        self.upper = table(p[list(upper), :2], size)
        self.lower = np.maximum(table(p[list(lower), :2], size), self.upper)
        brow_points = p[list(brow), :2]
        self.brow = np.minimum(table(brow_points[5:], size), self.upper - 0.08 * iod)  # the brow's lower edge
        self.top = self.brow - 0.45 * iod
        self.bottom = self.lower + 0.12 * iod
        xs = np.concatenate([brow_points[:, 0], p[list(upper), 0]])
        x0 = max(xs.min() - 0.12 * iod, x_limits[0], 0)
        x1 = min(xs.max() + 0.12 * iod, x_limits[1], size)
        self.x0, self.x1 = int(x0), int(np.ceil(x1))
        grid = np.arange(size, dtype=np.float32)
        along = np.clip((grid - x0) / max(x1 - x0, 1), 0, 1)
        self.brow_weight = (np.maximum(np.sin(along * np.pi), 0.0) ** 0.5).astype(np.float32)
        self.y0 = int(max(np.floor(self.top[self.x0:self.x1].min()) - 1, 0))
        self.y1 = int(min(np.ceil(self.bottom[self.x0:self.x1].max()) + 1, size))
        self.iod = iod
        corners = p[[upper[0], upper[-1]], 0]
        inside = ((grid >= corners.min()) & (grid <= corners.max())).astype(np.float32)
        self.tables = np.stack([self.top, self.brow, self.upper, self.lower, self.bottom, self.brow_weight, inside])

    def backward(self, hx: np.ndarray, hy: np.ndarray, close: float, brow: float) -> np.ndarray:
        top, brow_line, upper, lower, bottom, weight, inside = lookup(self.tables, hx)
        brow_d = brow_line - BROW_RAISE * self.iod * brow * weight
        # A closed lid reaches a little past the lower lid's line (the mesh's lid lines sit inside the lashes).
        upper_d = upper + close * (lower - upper + LID_OVERSHOOT * self.iod * inside)
        brow_d = np.clip(brow_d, top + 1.0, upper_d - 1.0)
        # The lid's skin stretches down; its lash line keeps its own thickness at the lid's edge.
        lash = np.minimum(LASH * self.iod, np.maximum(upper - brow_line - 1.0, 0.0))
        lash_d = np.maximum(upper_d - lash, brow_d)
        below = np.maximum(lower, upper_d)
        return piecewise(hy, [
            Segment(top, brow_d, top, brow_line),
            Segment(brow_d, lash_d, brow_line, upper - lash),
            Segment(lash_d, upper_d, upper - lash, upper),
            Segment(upper_d, lower, upper_d, lower),  # what the lid has not reached yet stays where it was
            Segment(below, bottom, below, bottom),
        ])


def _dense(a: np.ndarray, like: np.ndarray) -> np.ndarray:
    """`a` broadcast against `like`, as a contiguous float32 array (what cv2 takes)."""
    return np.ascontiguousarray(np.broadcast_to(a, np.broadcast_shapes(np.shape(a), np.shape(like))), np.float32)


class _Eyes:
    """Both eyes as one region: each column belongs to the eye on its side of the nose."""

    def __init__(self, right: _Eye, left: _Eye, nose_x: float, size: int):
        side = np.arange(size) < nose_x
        self.tables = np.where(side[None, :], right.tables, left.tables).astype(np.float32)
        self.iod = right.iod
        self.box = (min(right.y0, left.y0), max(right.y1, left.y1), right.x0, left.x1)

    backward = _Eye.backward


class _Glasses:
    """A spectacle frame held rigid: the photo with the frame painted out (what the moving lids and brows are sampled
    from) and the frame's alpha, 1 on the mask and fading to 0 over FRAME_FEATHER pixels outside it, so that with no
    movement the frame put back reproduces the photo exactly."""

    def __init__(self, crop: np.ndarray, mask: np.ndarray):
        mask = (np.asarray(mask) > 0).astype(np.uint8)
        outside = cv2.distanceTransform(1 - mask, cv2.DIST_L2, 3)
        self.alpha = np.clip(1.0 - outside / FRAME_FEATHER, 0.0, 1.0).astype(np.float32)
        rows, cols = np.nonzero(self.alpha > 0)
        self.box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
        self.frameless = crop.copy()
        pad = 8
        r = slice(max(self.box[0].start - pad, 0), self.box[0].stop + pad)
        c = slice(max(self.box[1].start - pad, 0), self.box[1].stop + pad)
        self.frameless[r, c] = cv2.inpaint(np.ascontiguousarray(crop[r, c]), mask[r, c], 3, cv2.INPAINT_TELEA)
        rows, cols = self.box
        self.box_alpha = np.ascontiguousarray(self.alpha[rows, cols])
        self.box_rest = 1.0 - self.box_alpha

    def put_back_posed(self, out: np.ndarray, crop: np.ndarray, box: tuple[slice, slice], x: np.ndarray,
                       y: np.ndarray) -> None:
        """The frame's own pixels moved by the head pose only (maps `x`, `y` for the output's `box`)."""
        frame = cv2.remap(crop, x, y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        alpha = cv2.remap(self.alpha, x, y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        out[box] = cv2.blendLinear(frame, out[box], alpha, 1.0 - alpha)

    def put_back(self, out: np.ndarray, crop: np.ndarray) -> None:
        """The frame's own pixels over a frame whose head did not move."""
        rows, cols = self.box
        out[rows, cols] = cv2.blendLinear(crop[rows, cols], out[rows, cols], self.box_alpha, self.box_rest)


class PhotoRenderer:
    def __init__(self, analysis: PhotoAnalysis):
        self.analysis = analysis
        self.size = s = analysis.size
        self.crop = np.ascontiguousarray(analysis.crop)
        self.rest = analysis.rest.astype(np.float32)
        p = analysis.landmarks
        self.iod = iod = analysis.iod
        self.mouth = Mouth(analysis)
        nose_x = float(p[mesh.NOSE_BRIDGE, 0])
        right = _Eye(p, mesh.RIGHT_EYE_UPPER, mesh.RIGHT_EYE_LOWER, mesh.RIGHT_BROW, s, iod, (0, nose_x))
        left = _Eye(p, mesh.LEFT_EYE_UPPER, mesh.LEFT_EYE_LOWER, mesh.LEFT_BROW, s, iod, (nose_x, s))
        self.eyes = _Eyes(right, left, nose_x, s)
        self.pose = PoseField(p, s)
        self.glasses = _Glasses(self.crop, analysis.glasses) if analysis.glasses is not None else None
        self.full_centres = np.arange(s, dtype=np.float32)
        self.half_centres = np.arange(s // 2, dtype=np.float32) * 2 + 0.5  # 2x2 block centres, full-size pixels
        m = self.mouth
        y0, x0 = m.y0 // 2 * 2, m.x0 // 2 * 2
        even = s // 2 * 2
        y1, x1 = min(-(-m.y1 // 2) * 2, even), min(-(-m.x1 // 2) * 2, even)
        self.mouth_box = (y0, y1, x0, x1)
        self.mouth_rows, self.mouth_cols = slice(y0 // 2, y1 // 2), slice(x0 // 2, x1 // 2)
        self._paste = None

    # ---- frames --------------------------------------------------------------------------------------------
    def render(self, motion: np.ndarray) -> np.ndarray:
        """One motion frame (MOTION_DIM,) -> uint8 (S, S, 3)."""
        motion = np.asarray(motion, np.float32).reshape(-1)
        if motion.shape[0] != MOTION_DIM:
            raise ValueError(f"motion must have {MOTION_DIM} values, got {motion.shape[0]}")
        if not np.isfinite(motion).all():
            raise ValueError("motion has non-finite values")
        motion = clip(motion)
        posed = bool(np.any(np.abs(motion[_POSE]) > 1e-4))
        mouth = self.mouth.frame(motion)
        mouth_moves = not self.mouth.is_still(mouth)
        blink_rest = float(self.rest[INDEX["blink"]])
        close = float(np.clip((motion[INDEX["blink"]] - blink_rest) / max(1.0 - blink_rest, 1e-3), 0.0, 1.0))
        brow = float(motion[INDEX["brow_raise"]] - self.rest[INDEX["brow_raise"]])
        eyes_move = close > 1e-3 or abs(brow) > 1e-3
        if not posed and not mouth_moves and not eyes_move:
            return self.crop.copy()

        # The expression's maps are solved in the head's own frame, on the crop's grid: the mouth at half resolution
        # (its map is smooth wherever the output shows it) then upsampled, the small eye region at full resolution
        # (a closing lid's edge is a sharp step in its map).
        regions = []
        if mouth_moves:
            sx, sy, lines = self.mouth.backward(self.half_centres[None, self.mouth_cols],
                                                self.half_centres[self.mouth_rows, None], mouth)
            y0, y1, x0, x1 = self.mouth_box
            size = (x1 - x0, y1 - y0)
            regions.append((self.mouth_box, cv2.resize(_dense(sx, sy), size), cv2.resize(_dense(sy, sx), size)))
            box = self._interior_box(lines)
        else:
            box = None
        if eyes_move:
            y0, y1, x0, x1 = self.eyes.box
            hx, hy = self.full_centres[None, x0:x1], self.full_centres[y0:y1, None]
            sy = self.eyes.backward(hx, hy, close, brow)
            regions.append((self.eyes.box, _dense(hx, sy), _dense(sy, hx)))

        glasses = self.glasses if eyes_move else None
        source = self.crop if glasses is None else glasses.frameless
        if not posed:
            out = self.crop.copy()
            for (y0, y1, x0, x1), sx, sy in regions:
                out[y0:y1, x0:x1] = cv2.remap(source, sx, sy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            if glasses is not None:
                glasses.put_back(out, self.crop)
            if box is not None:
                rows, cols = box
                hx, hy = self.full_centres[None, cols], self.full_centres[rows, None]
                self._draw_interior(out, rows, cols, hx, hy, mouth)
            return out

        # Head pose: the output samples the head frame through the pose map, and the head frame through the
        # expression's maps (identity outside their regions): source = expression(pose(output pixel)).
        X, Y, reach = self.pose.backward(*(float(motion[i]) for i in _POSE))
        margin = int(np.ceil(reach)) + 2
        head = None
        if box is not None:
            rows, cols = self._grow(box, margin)
            hx, hy = X[rows, cols], Y[rows, cols]
            lands = (hx >= box[1].start) & (hx < box[1].stop) & (hy >= box[0].start) & (hy < box[0].stop)
            if lands.any():  # the output pixels that show the head-frame box
                r = np.nonzero(lands.any(axis=1))[0]
                c = np.nonzero(lands.any(axis=0))[0]
                rows = slice(rows.start + r[0], rows.start + r[-1] + 1)
                cols = slice(cols.start + c[0], cols.start + c[-1] + 1)
                head = (rows, cols, X[rows, cols].copy(), Y[rows, cols].copy())
        if glasses is not None:  # the frame moves with the head only: the pose's own map, before the expression's
            frame_box = self._grow(glasses.box, margin)
            frame_x, frame_y = X[frame_box].copy(), Y[frame_box].copy()
        for (y0, y1, x0, x1), sx, sy in regions:
            rows, cols = self._grow((slice(y0, y1), slice(x0, x1)), margin)
            mx, my = X[rows, cols] - x0, Y[rows, cols] - y0
            X[rows, cols] = cv2.remap(sx, mx, my, cv2.INTER_LINEAR, dst=X[rows, cols].copy(),
                                      borderMode=cv2.BORDER_TRANSPARENT)
            Y[rows, cols] = cv2.remap(sy, mx, my, cv2.INTER_LINEAR, dst=Y[rows, cols].copy(),
                                      borderMode=cv2.BORDER_TRANSPARENT)
        out = self.crop.copy()
        rows, cols = self.pose.box
        out[rows, cols] = cv2.remap(source, X[rows, cols], Y[rows, cols], cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_REPLICATE)
        if glasses is not None:
            glasses.put_back_posed(out, self.crop, frame_box, frame_x, frame_y)
        if head is not None:
            self._draw_interior(out, *head, mouth)
        return out

    def _grow(self, box: tuple[slice, slice], margin: int) -> tuple[slice, slice]:
        rows, cols = box
        return (slice(max(rows.start - margin, 0), min(rows.stop + margin, self.size)),
                slice(max(cols.start - margin, 0), min(cols.stop + margin, self.size)))

    def _interior_box(self, lines: dict) -> tuple[slice, slice] | None:
        """The full-resolution box (head frame) where the lips part, from the half-resolution lines."""
        ui_d, li_d = lines["ui_draw"], lines["li_draw"]  # (1, w) per half-resolution column
        parted = (li_d - ui_d > 0.02)[0]
        if not parted.any():
            return None
        c = np.nonzero(parted)[0]
        x0 = self.mouth_box[2]
        top, bottom = float(ui_d[0, parted].min()), float(li_d[0, parted].max())
        rows = slice(max(int(np.floor(top)) - 2, 0), min(int(np.ceil(bottom)) + 3, self.size))
        cols = slice(max(x0 + 2 * c.min() - 2, 0), min(x0 + 2 * c.max() + 4, self.size))
        return rows, cols

    def _draw_interior(self, out: np.ndarray, rows: slice, cols: slice, hx, hy, mouth) -> None:
        _, lines = self.mouth.columns(hx, hy, mouth)
        image, cover = self.mouth.interior(hx, hy, lines, mouth, rows, cols)
        target = out[rows, cols].astype(np.float32)
        target += (image - target) * cover[..., None]
        out[rows, cols] = np.clip(target + 0.5, 0, 255).astype(np.uint8)

    def render_many(self, motion: np.ndarray) -> np.ndarray:
        """(F, MOTION_DIM) -> uint8 (F, S, S, 3)."""
        motion = np.asarray(motion, np.float32)
        if motion.ndim != 2 or motion.shape[1] != MOTION_DIM:
            raise ValueError(f"motion must be [frames, {MOTION_DIM}], got {list(motion.shape)}")
        out = np.empty((len(motion), self.size, self.size, 3), np.uint8)
        for i, row in enumerate(motion):
            out[i] = self.render(row)
        return out

    # ---- paste-back ----------------------------------------------------------------------------------------
    def paste_back(self, frame: np.ndarray, max_side: int | None = None) -> np.ndarray:
        """The frame feathered back into the original photo, downscaled so that its longer side is at most
        `max_side` (sides made even, as yuv420 video needs). Only the crop's footprint is warped and blended."""
        original = self.analysis.original
        if original is None:
            raise EmoteError("this avatar was prepared without its whole photo (keep_original=False): no paste-back")
        h, w = original.shape[:2]
        scale = 1.0 if max_side is None or max(h, w) <= max_side else max_side / max(h, w)
        if self._paste is None or self._paste[0] != scale:
            self._paste = (scale, *self._prepare_paste(scale))
        _, base, back, box, mask = self._paste
        rows, cols = box
        warped = cv2.warpAffine(frame, back, (cols.stop - cols.start, rows.stop - rows.start), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REPLICATE)
        out = base.copy()
        region = out[rows, cols].astype(np.float32)
        region += (warped.astype(np.float32) - region) * mask
        out[rows, cols] = np.clip(region + 0.5, 0, 255).astype(np.uint8)
        return out

    def _prepare_paste(self, scale: float):
        original = self.analysis.original
        h, w = original.shape[:2]
        out_w, out_h = max(2, round(w * scale) // 2 * 2), max(2, round(h * scale) // 2 * 2)
        base = original
        if (out_w, out_h) != (w, h):
            base = cv2.resize(original, (out_w, out_h), interpolation=cv2.INTER_AREA)
        back = cv2.invertAffineTransform(self.analysis.to_crop)  # crop -> original pixels
        back *= np.array([[out_w / w], [out_h / h]])  # -> output pixels
        s = self.size
        corners = np.array([[0, 0, 1], [s, 0, 1], [0, s, 1], [s, s, 1]], np.float64) @ back.T
        x0, y0 = np.floor(corners.min(axis=0)).astype(int)
        x1, y1 = np.ceil(corners.max(axis=0)).astype(int)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, out_w), min(y1, out_h)
        if x1 - x0 < 1 or y1 - y0 < 1:  # cannot happen for a face inside the photo; keep the photo as it is
            x0, y0, x1, y1 = 0, 0, 1, 1
        shifted = back.copy()
        shifted[:, 2] -= (x0, y0)
        pad = max(2, s // 16)
        feather = np.zeros((s, s), np.float32)
        feather[pad:-pad, pad:-pad] = 1.0
        feather = cv2.GaussianBlur(feather, (0, 0), pad / 2)
        mask = cv2.warpAffine(feather, shifted, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR)[..., None]
        return np.ascontiguousarray(base), shifted, (slice(y0, y1), slice(x0, x1)), mask


def benchmark(analysis: PhotoAnalysis, frames: int = 200, seed: int = 0, pose: bool = True) -> dict[str, float]:
    """Milliseconds per frame of `render` on this thread (CPU time and wall time) over speech-like motion: the
    mouth, lips and brows move every frame, with blinks, and the head moves when `pose`. Paste-back aside."""
    import time

    rng = np.random.default_rng(seed)
    motion = np.tile(analysis.rest, (frames, 1))
    motion[:, INDEX["mouth_open"]] = rng.random(frames)
    motion[:, INDEX["mouth_width"]] = rng.uniform(-0.5, 0.5, frames)
    motion[:, INDEX["mouth_round"]] = rng.random(frames) * 0.5
    motion[:, INDEX["teeth"]] = rng.random(frames)
    motion[:, INDEX["blink"]] = (rng.random(frames) < 0.3) * rng.random(frames)
    motion[:, INDEX["brow_raise"]] = rng.normal(0, 0.3, frames)
    if pose:
        for name, spread in (("yaw", 6.0), ("pitch", 3.0), ("roll", 3.0), ("tx", 0.015), ("ty", 0.01)):
            motion[:, INDEX[name]] = rng.normal(0, spread, frames)
    renderer = PhotoRenderer(analysis)
    renderer.render(motion[0])
    cpu, wall = time.process_time(), time.perf_counter()
    for row in motion:
        renderer.render(row)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_ms": cpu / frames * 1000, "wall_ms": wall / frames * 1000}

