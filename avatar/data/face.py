"""Procedural stylised faces: identity parameters, per-frame state, and a fast antialiased renderer.

Everything is drawn from signed-distance approximations of ellipses, evaluated only inside each shape's
bounding box, with coverage = clamp(0.5 - distance / pixel) for antialiasing. Coordinates are normalised:
the frame spans [-1, 1] on both axes, y pointing down. Head features live in head-local 3-D coordinates
(x, y, depth) and are projected orthographically after yaw, pitch and roll, so the same identity renders at
any resolution and any pose.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from avatar.motion.spec import MOTION_NAMES

HAIR_STYLES = ("short", "long", "bun", "bald", "curly", "side", "bob")
NOSE_STYLES = ("button", "long", "wide")
PATTERNS = ("plain", "stripes", "dots", "vignette", "split")
GLASSES_SHAPES = ("round", "square")

HEAD_CENTER = (0.0, -0.12)  # head centre in the frame at rest
HEAD_SCALE = 0.5  # head-local unit -> frame units


# The yes/no traits of an identity (a glasses style counts as yes), by which evaluation breaks results down and
# training may oversample: they change what surrounds the mouth (a beard's dark frame hides a dark mouth's opening).
IDENTITY_TRAITS = ("beard", "glasses", "earrings")


@dataclass(frozen=True)
class Identity:
    """Everything that makes one face look like itself. Colours are RGB in [0, 1]."""

    face_width: float
    face_height: float
    chin_taper: float
    skin: tuple[float, float, float]
    blush: float
    hair_style: str
    hair_color: tuple[float, float, float]
    hair_volume: float
    eye_spacing: float
    eye_height: float
    eye_size: float
    eye_aspect: float
    iris_color: tuple[float, float, float]
    brow_thickness: float
    brow_tilt: float
    nose_style: str
    nose_length: float
    nose_width: float
    mouth_width: float
    mouth_height: float
    lip_color: tuple[float, float, float]
    lip_thickness: float
    glasses: str | None
    glasses_color: tuple[float, float, float]
    beard: bool
    beard_color: tuple[float, float, float]
    earrings: bool
    earring_color: tuple[float, float, float]
    clothing_color: tuple[float, float, float]
    collar_color: tuple[float, float, float]
    neckline: str
    background_a: tuple[float, float, float]
    background_b: tuple[float, float, float]
    background_pattern: str

    def traits(self) -> tuple[str, ...]:
        """The `IDENTITY_TRAITS` this identity has."""
        return tuple(t for t in IDENTITY_TRAITS if getattr(self, t))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Identity":
        values = {}
        for f in fields(cls):
            value = data[f.name]
            values[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Identity":
        return sample_identity(rng)


def _color(rng: np.random.Generator, base, spread: float) -> tuple[float, float, float]:
    c = np.clip(np.asarray(base, dtype=float) + rng.normal(0.0, spread, 3), 0.0, 1.0)
    return tuple(round(float(v), 4) for v in c)


def _mix(a, b, t: float) -> tuple[float, float, float]:
    return tuple(round(float(x + (y - x) * t), 4) for x, y in zip(a, b))


SKIN_LIGHT = (0.98, 0.85, 0.74)
SKIN_DARK = (0.30, 0.19, 0.13)
HAIR_PALETTE = (
    (0.08, 0.06, 0.05), (0.25, 0.15, 0.08), (0.45, 0.28, 0.14), (0.85, 0.70, 0.40),
    (0.65, 0.25, 0.10), (0.70, 0.70, 0.72), (0.20, 0.30, 0.75), (0.85, 0.35, 0.60),
)
IRIS_PALETTE = ((0.30, 0.18, 0.08), (0.20, 0.40, 0.70), (0.25, 0.50, 0.30), (0.45, 0.45, 0.45), (0.55, 0.35, 0.15))


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draw a random identity; continuous parameters make practically every draw distinct."""
    skin = _mix(SKIN_LIGHT, SKIN_DARK, float(rng.beta(1.3, 1.6)))
    skin = _color(rng, skin, 0.025)
    hair_idx = int(rng.choice(len(HAIR_PALETTE), p=[0.22, 0.22, 0.16, 0.13, 0.09, 0.1, 0.04, 0.04]))
    hair = _color(rng, HAIR_PALETTE[hair_idx], 0.05)
    bg_a = _color(rng, rng.uniform(0.15, 0.95, 3), 0.0)
    bg_b = _color(rng, np.asarray(bg_a) * rng.uniform(0.5, 1.1), 0.08)
    clothing = _color(rng, rng.uniform(0.05, 0.95, 3), 0.0)
    bearded = bool(rng.random() < 0.2)
    return Identity(
        face_width=round(float(rng.uniform(0.70, 0.92)), 4),
        face_height=round(float(rng.uniform(0.95, 1.15)), 4),
        chin_taper=round(float(rng.uniform(0.0, 0.35)), 4),
        skin=skin,
        blush=round(float(rng.uniform(0.0, 0.35)), 4),
        hair_style=HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))],
        hair_color=hair,
        hair_volume=round(float(rng.uniform(0.9, 1.15)), 4),
        eye_spacing=round(float(rng.uniform(0.28, 0.38)), 4),
        eye_height=round(float(rng.uniform(-0.18, -0.05)), 4),
        eye_size=round(float(rng.uniform(0.10, 0.15)), 4),
        eye_aspect=round(float(rng.uniform(0.45, 0.8)), 4),
        iris_color=_color(rng, IRIS_PALETTE[int(rng.integers(len(IRIS_PALETTE)))], 0.05),
        brow_thickness=round(float(rng.uniform(0.025, 0.055)), 4),
        brow_tilt=round(float(rng.uniform(-0.25, 0.25)), 4),
        nose_style=NOSE_STYLES[int(rng.integers(len(NOSE_STYLES)))],
        nose_length=round(float(rng.uniform(0.14, 0.24)), 4),
        nose_width=round(float(rng.uniform(0.06, 0.11)), 4),
        mouth_width=round(float(rng.uniform(0.30, 0.42)), 4),
        mouth_height=round(float(rng.uniform(0.46, 0.56)), 4),
        lip_color=_color(rng, _mix(skin, (0.75, 0.25, 0.30), float(rng.uniform(0.35, 0.8))), 0.03),
        lip_thickness=round(float(rng.uniform(0.025, 0.05)), 4),
        glasses=GLASSES_SHAPES[int(rng.integers(2))] if rng.random() < 0.25 else None,
        glasses_color=_color(rng, (0.1, 0.1, 0.1), 0.15),
        beard=bearded,
        beard_color=_color(rng, np.asarray(hair) * 0.9, 0.03),
        earrings=bool(rng.random() < 0.25),
        earring_color=_color(rng, (0.9, 0.75, 0.3) if rng.random() < 0.6 else (0.8, 0.8, 0.85), 0.03),
        clothing_color=clothing,
        collar_color=_color(rng, 1.0 - np.asarray(clothing), 0.1),
        neckline=("round", "v", "collar")[int(rng.integers(3))],
        background_a=bg_a,
        background_b=bg_b,
        background_pattern=PATTERNS[int(rng.integers(len(PATTERNS)))],
    )


def identity_for(seed: int, index: int) -> Identity:
    """The identity number `index` of a corpus seeded with `seed`."""
    return sample_identity(np.random.default_rng([seed, 0x1D, index]))


@dataclass
class FaceState:
    """Per-frame pose and expression. Mouth values are in [0, 1] except width in [-1, 1]; angles in degrees."""

    mouth_open: float = 0.0
    mouth_width: float = 0.0
    mouth_round: float = 0.0
    teeth: float = 0.0
    tongue: float = 0.0
    blink: float = 0.0
    brow_raise: float = 0.0
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    tx: float = 0.0
    ty: float = 0.0


STATE_FIELDS: tuple[str, ...] = MOTION_NAMES  # the motion spec (avatar/motion/spec.py) is the one source of names
assert tuple(f.name for f in fields(FaceState)) == MOTION_NAMES


def states_from_array(array: np.ndarray) -> list[FaceState]:
    """Rows of a [F, len(STATE_FIELDS)] array (columns in STATE_FIELDS order) -> FaceState objects."""
    return [FaceState(*map(float, row)) for row in np.asarray(array, dtype=np.float64)]


def states_to_array(states: list[FaceState]) -> np.ndarray:
    return np.array([[getattr(s, name) for name in STATE_FIELDS] for s in states], dtype=np.float32)


def still_head(state: FaceState) -> FaceState:
    """The same expression with the head held still (the evaluation mode)."""
    return FaceState(state.mouth_open, state.mouth_width, state.mouth_round, state.teeth, state.tongue,
                     state.blink, state.brow_raise)


class _Canvas:
    """A float image plus the helpers that composite antialiased shapes into it."""

    def __init__(self, image: np.ndarray, xs: np.ndarray, ys: np.ndarray, pixel: float):
        self.image = image
        self.xs = xs  # pixel-centre x coordinates, one per column
        self.ys = ys
        self.pixel = pixel
        self.size = image.shape[0]

    def _window(self, cx: float, cy: float, radius: float):
        n, p = self.size, self.pixel
        c0 = max(int((cx - radius + 1.0) / p - 1.0), 0)
        c1 = min(int((cx + radius + 1.0) / p + 2.0), n)
        r0 = max(int((cy - radius + 1.0) / p - 1.0), 0)
        r1 = min(int((cy + radius + 1.0) / p + 2.0), n)
        if c0 >= c1 or r0 >= r1:
            return None
        return r0, r1, c0, c1

    def ellipse_coverage(self, cx, cy, rx, ry, angle=0.0, soft=1.0, window=None, taper=0.0, ring=0.0):
        """Coverage in [0, 1] of a rotated ellipse over `window` (or its own bounding box)."""
        rx, ry = max(rx, 1e-4), max(ry, 1e-4)
        if window is None:
            window = self._window(cx, cy, max(rx, ry) + ring + soft * self.pixel)
            if window is None:
                return None, None
        r0, r1, c0, c1 = window
        dx = self.xs[c0:c1][None, :] - cx
        dy = self.ys[r0:r1][:, None] - cy
        if angle:
            ca, sa = math.cos(angle), math.sin(angle)
            u = dx * ca + dy * sa
            v = dy * ca - dx * sa
        else:
            u, v = dx, dy
        if taper:
            # Narrower towards +v (a chin); only the lower half is squeezed.
            u = u / (1.0 - taper * np.clip(v / ry, 0.0, 1.0))
        a2, b2 = rx * rx, ry * ry
        f = u * u / a2 + v * v / b2 - 1.0
        grad = 2.0 * np.sqrt(u * u / (a2 * a2) + v * v / (b2 * b2)) + 1e-6
        dist = f / grad
        if ring:
            dist = np.abs(dist) - ring
        cov = np.clip(0.5 - dist / (self.pixel * soft), 0.0, 1.0)
        return cov, window

    def paint(self, cov, window, color, alpha: float = 1.0) -> None:
        if cov is None:
            return
        r0, r1, c0, c1 = window
        region = self.image[r0:r1, c0:c1]
        weight = cov[..., None] if alpha == 1.0 else (cov * alpha)[..., None]
        region += weight * (np.asarray(color, dtype=np.float32) - region)

    def ellipse(self, cx, cy, rx, ry, color, angle=0.0, alpha=1.0, soft=1.0, taper=0.0, ring=0.0):
        cov, window = self.ellipse_coverage(cx, cy, rx, ry, angle, soft, taper=taper, ring=ring)
        self.paint(cov, window, color, alpha)
        return cov, window

    def clip_below(self, cov, window, cx, cy, angle, offset, above: bool = False):
        """Multiply coverage by a half-plane (in the rotated frame): keep v > offset, or v < offset if above."""
        if cov is None:
            return None
        r0, r1, c0, c1 = window
        dx = self.xs[c0:c1][None, :] - cx
        dy = self.ys[r0:r1][:, None] - cy
        v = dy * math.cos(angle) - dx * math.sin(angle) - offset
        if above:
            v = -v
        return cov * np.clip(0.5 + v / self.pixel, 0.0, 1.0)


class FaceRenderer:
    """Renders one identity at one square resolution. Reuse it across frames: the background is cached."""

    def __init__(self, identity: Identity, size: int = 128):
        if size < 16:
            raise ValueError(f"frame size must be at least 16 pixels, got {size}")
        self.identity = identity
        self.size = int(size)
        pixel = 2.0 / self.size
        coords = (np.arange(self.size, dtype=np.float32) + 0.5) * pixel - 1.0
        self._xs = coords
        self._ys = coords
        self._pixel = pixel
        self._background = self._render_background()

    # ---- static layers -------------------------------------------------------------------------------------
    def _render_background(self) -> np.ndarray:
        idn = self.identity
        n = self.size
        y = self._ys[:, None]
        x = self._xs[None, :]
        a = np.asarray(idn.background_a, np.float32)
        b = np.asarray(idn.background_b, np.float32)
        t = np.broadcast_to((y + 1.0) / 2.0, (n, n))
        pattern = idn.background_pattern
        if pattern == "stripes":
            t = t * 0.6 + 0.4 * (np.sin((x + y * 0.3) * 14.0) > 0)
        elif pattern == "dots":
            t = t * 0.5 + 0.5 * np.clip(1.5 - (np.hypot(((x * 6) % 1) - 0.5, ((y * 6) % 1) - 0.5) / 0.2) ** 2, 0, 1)
        elif pattern == "vignette":
            t = np.clip(np.hypot(x, y) / 1.3, 0, 1)
        elif pattern == "split":
            t = np.clip(0.5 + (x - 0.35) / (2 * self._pixel), 0, 1) * 0.8 + 0.1 * t
        image = (a + (b - a) * np.asarray(t, np.float32)[..., None]).astype(np.float32)
        canvas = _Canvas(image, self._xs, self._ys, self._pixel)
        self._draw_torso(canvas)
        return canvas.image

    def _draw_torso(self, canvas: _Canvas) -> None:
        idn = self.identity
        cx, cy = HEAD_CENTER
        s = HEAD_SCALE
        skin = idn.skin
        shade = tuple(c * 0.8 for c in skin)
        canvas.ellipse(cx, cy + 0.95 * s, 0.27 * s, 0.6 * s, shade)  # neck
        body_y = cy + 2.05 * s
        canvas.ellipse(cx, body_y, 1.75 * s, 0.85 * s, idn.clothing_color)
        if idn.neckline == "v":
            for side in (-1, 1):
                canvas.ellipse(cx + side * 0.12 * s, body_y - 0.7 * s, 0.05 * s, 0.3 * s, skin, angle=side * 0.5)
        elif idn.neckline == "round":
            cov, win = canvas.ellipse_coverage(cx, body_y - 0.82 * s, 0.36 * s, 0.22 * s)
            canvas.paint(cov, win, shade)
        else:
            for side in (-1, 1):
                canvas.ellipse(cx + side * 0.22 * s, body_y - 0.78 * s, 0.25 * s, 0.09 * s, idn.collar_color,
                               angle=side * -0.45)
        canvas.ellipse(cx, body_y + 0.1 * s, 1.2 * s, 0.5 * s, tuple(c * 0.88 for c in idn.clothing_color),
                       alpha=0.35, soft=12.0)

    # ---- projection ----------------------------------------------------------------------------------------
    def _projector(self, state: FaceState):
        yaw, pitch, roll = (math.radians(a) for a in (state.yaw, state.pitch, state.roll))
        cyw, syw, cp, sp, cr, sr = (math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch),
                                    math.cos(roll), math.sin(roll))
        hx, hy = HEAD_CENTER[0] + state.tx, HEAD_CENTER[1] + state.ty
        s = HEAD_SCALE

        def project(x: float, y: float, z: float = 0.0) -> tuple[float, float]:
            x1 = x * cyw + z * syw
            z1 = z * cyw - x * syw
            y1 = y * cp - z1 * sp
            return hx + s * (x1 * cr - y1 * sr), hy + s * (x1 * sr + y1 * cr)

        return project, cyw, cp, roll

    def face_box(self, state: FaceState) -> tuple[float, float, float, float]:
        """Face bounding box (hair excluded) as (x0, y0, x1, y1) in [0, 1] image coordinates."""
        project, _, _, _ = self._projector(state)
        idn = self.identity
        pts = [project(sx * idn.face_width, sy * idn.face_height)
               for sx, sy in ((-1, 0), (1, 0), (0, -1), (0, 1), (-0.7, -0.7), (0.7, -0.7), (-0.7, 0.7), (0.7, 0.7))]
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        return tuple(float(np.clip((v + 1.0) / 2.0, 0.0, 1.0)) for v in (min(xs), min(ys), max(xs), max(ys)))

    def mouth_box(self) -> tuple[int, int, int, int]:
        """Pixel box (r0, r1, c0, c1) that contains the mouth at any opening, head still."""
        idn = self.identity
        s = HEAD_SCALE
        cx, cy = HEAD_CENTER[0], HEAD_CENTER[1] + idn.mouth_height * s
        half_w = (idn.mouth_width * 0.65 + idn.lip_thickness) * s * 1.1
        up = (idn.lip_thickness + 0.06) * s
        down = (0.26 + idn.lip_thickness + 0.04) * s
        to_px = lambda v: (v + 1.0) / 2.0 * self.size  # noqa: E731
        return (max(int(to_px(cy - up)), 0), min(int(math.ceil(to_px(cy + down))), self.size),
                max(int(to_px(cx - half_w)), 0), min(int(math.ceil(to_px(cx + half_w))), self.size))

    # ---- frame ---------------------------------------------------------------------------------------------
    def render(self, state: FaceState | None = None) -> np.ndarray:
        """One uint8 [size, size, 3] frame."""
        state = state or FaceState()
        canvas = _Canvas(self._background.copy(), self._xs, self._ys, self._pixel)
        project, cyaw, cpitch, roll_deg = self._projector(state)
        roll = math.radians(roll_deg)
        idn = self.identity
        s = HEAD_SCALE
        fw, fh = idn.face_width, idn.face_height
        hair = idn.hair_color
        style = idn.hair_style
        vol = idn.hair_volume

        # Hair behind the head.
        if style == "long":
            cx, cy = project(0.0, 0.25, -0.3)
            canvas.ellipse(cx, cy, (fw + 0.2) * s * vol, (fh + 0.3) * s, hair, angle=roll)
        elif style == "curly":
            cx, cy = project(0.0, -0.15, -0.3)
            canvas.ellipse(cx, cy, (fw + 0.35) * s * vol, (fh + 0.25) * s * vol, hair, angle=roll)
            for k in range(7):
                a = math.pi * (0.9 + 1.2 * k / 6.0)
                bx, by = project(math.cos(a) * (fw + 0.3) * vol, -0.15 + math.sin(a) * (fh + 0.2) * vol, -0.3)
                canvas.ellipse(bx, by, 0.2 * s, 0.2 * s, hair)
        elif style == "bob":
            cx, cy = project(0.0, 0.0, -0.3)
            canvas.ellipse(cx, cy, (fw + 0.2) * s * vol, (fh + 0.12) * s, hair, angle=roll)
        elif style == "bun":
            cx, cy = project(0.0, -fh - 0.15, -0.2)
            canvas.ellipse(cx, cy, 0.3 * s, 0.26 * s, hair)

        # Ears and earrings.
        for side in (-1, 1):
            ex, ey = project(side * fw * 0.98, -0.02, -0.2)
            canvas.ellipse(ex, ey, 0.11 * s * (0.6 + 0.4 * cyaw), 0.19 * s, tuple(c * 0.92 for c in idn.skin),
                           angle=roll)
            if idn.earrings:
                rx_, ry_ = project(side * fw * 0.98, 0.2, -0.2)
                canvas.ellipse(rx_, ry_, 0.045 * s, 0.045 * s, idn.earring_color)

        # Face with soft shading.
        fcx, fcy = project(0.0, 0.0, 0.0)
        canvas.ellipse(fcx, fcy, fw * s, fh * s, idn.skin, angle=roll, taper=idn.chin_taper)
        lx, ly = project(-0.15, -0.2, 0.5)
        canvas.ellipse(lx, ly, fw * 0.65 * s, fh * 0.7 * s, tuple(min(c * 1.08, 1.0) for c in idn.skin),
                       angle=roll, alpha=0.6, soft=10.0)
        if idn.blush > 0.05:
            for side in (-1, 1):
                bx, by = project(side * fw * 0.55, idn.mouth_height - 0.18, 0.5)
                canvas.ellipse(bx, by, 0.16 * s, 0.1 * s, (0.9, 0.45, 0.45), angle=roll, alpha=idn.blush, soft=6.0)

        if idn.beard:
            cov, win = canvas.ellipse_coverage(fcx, fcy, fw * 1.01 * s, fh * 1.02 * s, roll, taper=idn.chin_taper)
            bx, by = project(0.0, idn.mouth_height + 0.12, 0.0)
            lower, _ = canvas.ellipse_coverage(bx, by, fw * 0.9 * s, 0.5 * s, roll, window=win)
            canvas.paint(cov * lower, win, idn.beard_color, 0.95)

        # Hair in front (fringe / cap).
        if style != "bald":
            cov, win = canvas.ellipse_coverage(fcx, fcy - 0.12 * fh * s, (fw + 0.06) * s * vol, (fh + 0.06) * s * vol,
                                               roll)
            fringe = -0.55 if style in ("long", "bob", "side") else -0.62
            cov = canvas.clip_below(cov, win, fcx, fcy, roll, fringe * fh * s, above=True)
            canvas.paint(cov, win, hair)
            if style == "side":
                sx, sy = project(-0.35 * fw, -0.62 * fh, 0.6)
                canvas.ellipse(sx, sy, 0.45 * fw * s, 0.16 * s, hair, angle=roll + 0.45)
            elif style == "short":
                for side in (-1, 1):
                    sx, sy = project(side * 0.93 * fw, -0.35 * fh, 0.1)
                    canvas.ellipse(sx, sy, 0.1 * s, 0.28 * s, hair, angle=roll)

        self._draw_eyes(canvas, state, project, cyaw, roll)
        self._draw_nose(canvas, project, cyaw, roll)
        self._draw_mouth(canvas, state, project, cyaw, roll)
        if idn.glasses:
            self._draw_glasses(canvas, project, cyaw, roll)
        return (np.clip(canvas.image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def _draw_eyes(self, canvas: _Canvas, state: FaceState, project, cyaw: float, roll: float) -> None:
        idn = self.identity
        s = HEAD_SCALE
        rx = idn.eye_size * s * cyaw
        ry = idn.eye_size * idn.eye_aspect * s
        blink = min(max(state.blink, 0.0), 1.0)
        brow_dark = tuple(c * 0.85 for c in idn.hair_color) if idn.hair_style != "bald" else (0.25, 0.2, 0.15)
        for side in (-1, 1):
            ex, ey = project(side * idn.eye_spacing, idn.eye_height, 0.75)
            white, win = canvas.ellipse(ex, ey, rx, ry, (0.97, 0.97, 0.95), angle=roll)
            if white is None:
                continue
            iris_r = ry * 0.95
            ix, iy = project(side * idn.eye_spacing, idn.eye_height, 0.85)
            cov, _ = canvas.ellipse_coverage(ix, iy, iris_r * cyaw, iris_r, roll, window=win)
            canvas.paint(cov * white, win, idn.iris_color)
            cov, _ = canvas.ellipse_coverage(ix, iy, iris_r * 0.45 * cyaw, iris_r * 0.45, roll, window=win)
            canvas.paint(cov * white, win, (0.03, 0.03, 0.03))
            hx, hy = ix - 0.3 * iris_r, iy - 0.35 * iris_r
            canvas.ellipse(hx, hy, iris_r * 0.2, iris_r * 0.2, (1.0, 1.0, 1.0), alpha=0.9)
            # Upper lid: a skin ellipse whose lower edge descends with the blink, with a lash line under it.
            lid_shift = -1.85 * (1.0 - blink) * ry
            lcx = ex - math.sin(roll) * lid_shift
            lcy = ey + math.cos(roll) * lid_shift
            grown, _ = canvas.ellipse_coverage(ex, ey, rx * 1.08, ry * 1.15, roll, window=win)
            lash, _ = canvas.ellipse_coverage(lcx, lcy, rx * 1.25, ry * 1.0 + 0.012 * s, roll, window=win)
            canvas.paint(lash * grown, win, (0.08, 0.05, 0.05))
            lid, _ = canvas.ellipse_coverage(lcx, lcy, rx * 1.25, ry * 1.0, roll, window=win)
            canvas.paint(lid * grown, win, idn.skin)
            # Brow.
            raise_ = 0.05 * state.brow_raise
            bx, by = project(side * idn.eye_spacing, idn.eye_height - idn.eye_size * 0.95 - 0.08 - raise_, 0.8)
            canvas.ellipse(bx, by, idn.eye_size * 1.25 * s * cyaw, idn.brow_thickness * s, brow_dark,
                           angle=roll + side * (idn.brow_tilt - 0.12 * state.brow_raise))

    def _draw_nose(self, canvas: _Canvas, project, cyaw: float, roll: float) -> None:
        idn = self.identity
        s = HEAD_SCALE
        shade = tuple(c * 0.78 for c in idn.skin)
        tip_y = idn.eye_height + 0.1 + idn.nose_length
        if idn.nose_style == "long":
            cx, cy = project(0.03, tip_y - idn.nose_length * 0.5, 1.0)
            canvas.ellipse(cx, cy, 0.025 * s, idn.nose_length * 0.55 * s, shade, angle=roll, alpha=0.7, soft=2.5)
        tx, ty = project(0.0, tip_y, 1.1)
        canvas.ellipse(tx, ty, idn.nose_width * s * cyaw, idn.nose_width * 0.6 * s, shade, angle=roll, alpha=0.55,
                       soft=3.0)
        if idn.nose_style != "button":
            for side in (-1, 1):
                nx, ny = project(side * idn.nose_width * 0.55, tip_y + 0.02, 1.0)
                canvas.ellipse(nx, ny, 0.022 * s, 0.014 * s, tuple(c * 0.45 for c in idn.skin), angle=roll)
        else:
            canvas.ellipse(tx, ty - 0.02 * s, idn.nose_width * 0.45 * s, 0.025 * s,
                           tuple(min(c * 1.12, 1.0) for c in idn.skin), angle=roll, alpha=0.6, soft=2.0)

    def _draw_mouth(self, canvas: _Canvas, state: FaceState, project, cyaw: float, roll: float) -> None:
        idn = self.identity
        s = HEAD_SCALE
        opening = min(max(state.mouth_open, 0.0), 1.0)
        rounding = min(max(state.mouth_round, 0.0), 1.0)
        spread = min(max(state.mouth_width, -1.0), 1.0)
        half_w = idn.mouth_width * 0.5 * (1.0 + 0.22 * spread - 0.38 * rounding) * s * cyaw
        half_h = 0.13 * opening * s
        lip = idn.lip_thickness * (1.0 + 0.6 * rounding) * s
        mx, my = project(0.0, idn.mouth_height + 0.13 * opening * 0.5, 0.9)
        canvas.ellipse(mx, my, half_w + lip * 0.6, half_h + lip, idn.lip_color, angle=roll)
        inner, win = canvas.ellipse(mx, my, half_w, half_h + 0.006 * s, (0.28, 0.06, 0.08), angle=roll)
        if inner is None or opening < 0.02:
            return
        up_x, up_y = mx + math.sin(roll) * half_h, my - math.cos(roll) * half_h
        teeth_h = min(max(state.teeth, 0.0), 1.0) * min(half_h * 0.8, 0.035 * s)
        if teeth_h > 0:
            cov, _ = canvas.ellipse_coverage(up_x, up_y, half_w * 0.85, teeth_h, roll, window=win)
            canvas.paint(cov * inner, win, (0.96, 0.95, 0.9))
        tongue = min(max(state.tongue, 0.0), 1.0)
        if tongue > 0:
            lo_x, lo_y = mx - math.sin(roll) * half_h, my + math.cos(roll) * half_h
            cov, _ = canvas.ellipse_coverage(lo_x, lo_y, half_w * 0.6, half_h * (0.3 + 0.4 * tongue), roll, window=win)
            canvas.paint(cov * inner, win, (0.85, 0.35, 0.4), alpha=0.9)

    def _draw_glasses(self, canvas: _Canvas, project, cyaw: float, roll: float) -> None:
        idn = self.identity
        s = HEAD_SCALE
        r = idn.eye_size * 1.6 * s
        squash = 0.75 if idn.glasses == "square" else 1.0
        centers = []
        for side in (-1, 1):
            gx, gy = project(side * idn.eye_spacing, idn.eye_height, 1.0)
            centers.append((gx, gy))
            canvas.ellipse(gx, gy, r * cyaw, r * squash, (0.85, 0.9, 1.0), angle=roll, alpha=0.12)
            canvas.ellipse(gx, gy, r * cyaw, r * squash, idn.glasses_color, angle=roll, ring=0.012 * s)
        (ax, ay), (bx, by) = centers
        canvas.ellipse((ax + bx) / 2, (ay + by) / 2, max(abs(bx - ax) / 2 - r * cyaw, 0.01), 0.012 * s,
                       idn.glasses_color, angle=roll)


def render_frames(identity: Identity, states: list[FaceState], size: int = 128) -> np.ndarray:
    """Render a sequence of states into a uint8 [F, size, size, 3] array."""
    renderer = FaceRenderer(identity, size)
    out = np.empty((len(states), renderer.size, renderer.size, 3), dtype=np.uint8)
    for i, state in enumerate(states):
        out[i] = renderer.render(state)
    return out


def benchmark(size: int = 128, frames: int = 500, seed: int = 0) -> float:
    """Frames per second of the renderer on this machine, over varied identities and moving states."""
    import time

    rng = np.random.default_rng(seed)
    renderers = [FaceRenderer(identity_for(seed, i), size) for i in range(10)]
    states = [FaceState(mouth_open=float(rng.random()), mouth_round=float(rng.random()), teeth=0.5, tongue=0.3,
                        blink=float(rng.random() < 0.1), yaw=float(rng.normal(0, 8)), pitch=float(rng.normal(0, 5)),
                        roll=float(rng.normal(0, 4)), tx=float(rng.normal(0, 0.03))) for _ in range(frames)]
    start = time.perf_counter()
    for i, state in enumerate(states):
        renderers[i % len(renderers)].render(state)
    return frames / (time.perf_counter() - start)
