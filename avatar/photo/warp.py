"""Backward warp pieces: 1-D piecewise-linear maps along columns or rows (the jaw, lips, lids and brows of an
upright, aligned face), and the smooth head-pose field (yaw/pitch from the mesh's depth, roll, translation) with the
neck, body and background held still.

Every map goes from output (destination) pixels back to the photo (source), which is what one `cv2.remap` needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from avatar.photo import mesh

MAX_YAW = 20.0  # degrees: a 2-D warp of one photo cannot turn a head further without showing what it lacks
MAX_PITCH = 12.0
MAX_ROLL = 10.0
MAX_SHIFT = 0.08  # tx, ty: units of half the crop
MAX_STRETCH = 0.7  # the pose field's largest gradient: above it the head is moved less, so the warp never folds


@dataclass
class Segment:
    """Destination interval [d0, d1) maps linearly onto source interval [s0, s1] (arrays broadcast together)."""

    d0: np.ndarray
    d1: np.ndarray
    s0: np.ndarray
    s1: np.ndarray


def piecewise(values: np.ndarray, segments: list[Segment]) -> np.ndarray:
    """Map destination coordinates through `segments`; coordinates in no segment are left as they are."""
    # Every caller's segments share one shape (knot arrays or numbers): the first end and last start tell it.
    shape = np.broadcast_shapes(values.shape, np.shape(segments[0].d1), np.shape(segments[-1].d0),
                                np.shape(segments[0].s1))
    out = np.array(np.broadcast_to(values, shape), np.float32)
    for seg in segments:
        span = seg.d1 - seg.d0
        inside = (values >= seg.d0) & (values < seg.d1)
        scale = (seg.s1 - seg.s0) / np.maximum(span, 1e-3)
        np.copyto(out, seg.s0 + (values - seg.d0) * scale, where=inside)
    return out


def table(points: np.ndarray, size: int) -> np.ndarray:
    """A polyline (N, 2) as y = f(x) sampled at every integer x of [0, size), constant beyond its ends."""
    order = np.argsort(points[:, 0], kind="stable")
    xs, ys = points[order, 0], points[order, 1]
    return np.interp(np.arange(size, dtype=np.float32), xs, ys).astype(np.float32)


def lookup(tab: np.ndarray, x: np.ndarray) -> np.ndarray:
    """`tab` (size,) or (K, size) at float coordinates x (nearest integer), clamped to the table."""
    return np.take(tab, (x + 0.5).astype(np.int32), axis=-1, mode="clip")


def smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


class PoseField:
    """Head yaw/pitch/roll/translation as a smooth backward map, solved on a coarse grid and upsampled.

    Points move by their mesh depth (yaw and pitch turn the nose more than the cheeks); a weight that is 1 on the
    head and fades to 0 over the neck and background keeps the body and the room still, and stretches the
    background beside the head instead of tearing it.
    """

    def __init__(self, landmarks: np.ndarray, size: int, grid: int = 96):
        self.size = size
        self.grid = grid
        step = size / grid
        coords = (np.arange(grid, dtype=np.float32) + 0.5) * step - 0.5
        self.gx, self.gy = np.meshgrid(coords, coords)
        p = np.asarray(landmarks, np.float32)
        oval = p[list(mesh.FACE_OVAL)]
        cx, cy = oval[:, 0].mean(), oval[:, 1].mean()
        rx, ry = np.ptp(oval[:, 0]) / 2, np.ptp(oval[:, 1]) / 2
        r = np.sqrt(((self.gx - cx) / rx) ** 2 + ((self.gy - cy) / ry) ** 2)
        weight = smoothstep((1.9 - r) / 0.75)
        # Below the chin the weight fades faster: the neck and collar stay put.
        chin_y = p[mesh.CHIN, 1]
        iod = float(np.linalg.norm(p[mesh.RIGHT_IRIS[0], :2] - p[mesh.LEFT_IRIS[0], :2]))
        weight *= 1.0 - smoothstep((self.gy - chin_y) / (0.6 * iod))
        self.weight = weight.astype(np.float32)
        self.depth = self._depth_map(p, oval, iod).astype(np.float32)
        self.pivot_depth = float(np.median(-oval[:, 2]))
        self.centre = np.array([cx, cy], np.float32)
        self.roll_pivot = np.array([cx, chin_y + 0.4 * iod], np.float32)
        pixels = np.arange(size, dtype=np.float32)
        self.ident_x, self.ident_y = np.meshgrid(pixels, pixels)
        # The pixels any pose can move: the cells with weight, grown by a cell for the upsampling.
        rows = np.nonzero(weight.max(axis=1) > 0)[0]
        cols = np.nonzero(weight.max(axis=0) > 0)[0]
        cell = int(np.ceil(step))
        self.box = (slice(max(int(rows.min() * step) - cell, 0), min(int((rows.max() + 1) * step) + cell, size)),
                    slice(max(int(cols.min() * step) - cell, 0), min(int((cols.max() + 1) * step) + cell, size)))

    def _depth_map(self, p: np.ndarray, oval: np.ndarray, iod: float) -> np.ndarray:
        """The mesh's depth (towards the camera positive) spread over the grid by normalised Gaussian splatting;
        away from the face it settles at the face edge's depth, so the background does not turn."""
        edge = float(np.median(-oval[:, 2]))
        to_grid = self.grid / self.size
        ix = np.clip(np.round((p[:, 0] + 0.5) * to_grid - 0.5).astype(int), 0, self.grid - 1)
        iy = np.clip(np.round((p[:, 1] + 0.5) * to_grid - 0.5).astype(int), 0, self.grid - 1)
        total = np.zeros((self.grid, self.grid), np.float64)
        count = np.zeros((self.grid, self.grid), np.float64)
        np.add.at(total, (iy, ix), -p[:, 2] - edge)
        np.add.at(count, (iy, ix), 1.0)
        sigma = max(0.2 * iod * to_grid, 0.8)
        total = cv2.GaussianBlur(total, (0, 0), sigma)
        count = cv2.GaussianBlur(count, (0, 0), sigma)
        floor = count.max() * 0.05
        return edge + total / np.maximum(count, floor)

    def forward(self, yaw: float, pitch: float, roll: float, tx: float, ty: float) -> np.ndarray:
        """Forward displacement (grid, grid, 2) in pixels at the grid points."""
        yaw = math.radians(float(np.clip(yaw, -MAX_YAW, MAX_YAW)))
        pitch = math.radians(float(np.clip(pitch, -MAX_PITCH, MAX_PITCH)))
        roll = math.radians(float(np.clip(roll, -MAX_ROLL, MAX_ROLL)))
        rel_depth = self.depth - self.pivot_depth
        x = self.centre[0] + (self.gx - self.centre[0]) * math.cos(yaw) + rel_depth * math.sin(yaw)
        y = self.centre[1] + (self.gy - self.centre[1]) * math.cos(pitch) + rel_depth * math.sin(pitch)
        px, py = self.roll_pivot
        cos, sin = math.cos(roll), math.sin(roll)
        xr = px + (x - px) * cos - (y - py) * sin
        yr = py + (x - px) * sin + (y - py) * cos
        half = self.size / 2
        tx, ty = (float(np.clip(v, -MAX_SHIFT, MAX_SHIFT)) for v in (tx, ty))
        dx = (xr + tx * half - self.gx) * self.weight
        dy = (yr + ty * half - self.gy) * self.weight
        step = self.size / self.grid
        stretch = max(float(np.abs(np.diff(d, axis=axis)).max()) for d in (dx, dy) for axis in (0, 1)) / step
        if stretch > MAX_STRETCH:
            dx, dy = dx * (MAX_STRETCH / stretch), dy * (MAX_STRETCH / stretch)
        return np.dstack([dx, dy]).astype(np.float32)

    def backward(self, yaw: float, pitch: float, roll: float, tx: float, ty: float,
                 iterations: int = 4) -> tuple[np.ndarray, np.ndarray, float]:
        """Source maps (X, Y) float32 for the pose at full size, and the largest displacement in pixels. Outside
        `self.box` (rows, cols) nothing moves and the maps are the identity."""
        field = self.forward(yaw, pitch, roll, tx, ty)
        to_grid = self.grid / self.size
        dx, dy = field[..., 0], field[..., 1]
        for _ in range(iterations):  # fixed point of s = x - F(s): converges, the field is smooth and small
            mx = (self.gx - dx + 0.5) * to_grid - 0.5
            my = (self.gy - dy + 0.5) * to_grid - 0.5
            sampled = cv2.remap(field, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            dx, dy = sampled[..., 0], sampled[..., 1]
        # Upsample the displacement, not the coordinates: it is 0 at the borders, so the edges stay exact.
        full = (self.size, self.size)
        X = self.ident_x - cv2.resize(np.ascontiguousarray(dx), full, interpolation=cv2.INTER_LINEAR)
        Y = self.ident_y - cv2.resize(np.ascontiguousarray(dy), full, interpolation=cv2.INTER_LINEAR)
        return X, Y, float(np.abs(field).max())
