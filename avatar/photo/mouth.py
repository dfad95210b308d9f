"""The mouth and jaw: per-column lip and jaw lines measured once, a backward map per frame that parts the lips and
drops the jaw (the lower lip, chin and beard move with the jaw; the neck holds), and the interior drawn where the
lips part: a shaded cavity, upper teeth fixed to the skull, lower teeth on the jaw, a tongue, in the photo's colours.

Opening: the inner-lip gap at the mouth's centre is `GAP_PER_OPEN * mouth_open` inter-ocular distances
(avatar/photo/analysis.py). A quarter of a change in the gap lifts the upper lip, three quarters drop the lower lip,
and the chin drops 1.15 times as far as the lower lip (it is further from the jaw's hinge).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from avatar.motion.spec import INDEX
from avatar.photo import mesh
from avatar.photo.analysis import GAP_PER_OPEN, WIDTH_PER_SPREAD, PhotoAnalysis
from avatar.photo.warp import Segment, lookup, piecewise, smoothstep, table

UPPER_LIP_SHARE = 0.25
CHIN_PER_LIP = 1.15
ROUND_NARROWING = 0.38  # the corpus's factors: width * (1 + 0.22 spread - 0.38 round), lips 60 % thicker when round
ROUND_THICKENING = 0.35
TOOTH_HEIGHT = 0.11  # upper incisors shown at teeth = 1, inter-ocular distances
LOWER_TOOTH_HEIGHT = 0.07
UPPER_TEETH_REACH = 0.14  # in a photo's own open mouth, this much below the upper lip belongs to the skull


def _luma(c: np.ndarray) -> float:
    return float(c[0] * 0.299 + c[1] * 0.587 + c[2] * 0.114)


@dataclass
class MouthFrame:
    """One frame's lip and jaw movement (pixels), for the map and the interior."""

    gap_change: float  # at the centre
    width_change: float  # each corner moves out by this much
    round_change: float
    teeth: float
    tongue: float
    opening: float  # commanded mouth_open


class Mouth:
    def __init__(self, analysis: PhotoAnalysis):
        p = analysis.landmarks
        s = analysis.size
        self.size = s
        self.iod = iod = analysis.iod
        self.rest = analysis.rest
        self.upper_outer = table(p[list(mesh.UPPER_OUTER), :2], s)
        self.upper_inner = table(p[list(mesh.UPPER_INNER), :2], s)
        self.lower_inner = table(p[list(mesh.LOWER_INNER), :2], s)
        self.lower_outer = table(p[list(mesh.LOWER_OUTER), :2], s)
        # Keep the four lines ordered in every column (the mesh's lines can cross by a pixel at the corners).
        self.upper_inner = np.maximum(self.upper_inner, self.upper_outer)
        self.lower_inner = np.maximum(self.lower_inner, self.upper_inner)
        self.lower_outer = np.maximum(self.lower_outer, self.lower_inner)
        self.rest_gap = self.lower_inner - self.upper_inner
        left, right = p[mesh.MOUTH_CORNERS[0], :2], p[mesh.MOUTH_CORNERS[1], :2]
        inner_left, inner_right = p[mesh.UPPER_INNER[0], 0], p[mesh.UPPER_INNER[-1], 0]
        self.centre_x = float((inner_left + inner_right) / 2)
        self.half_width = float(max(abs(inner_right - inner_left) / 2, 2.0))
        self.outer_half_width = float(max(abs(right[0] - left[0]) / 2, 2.0))
        self.corner_y = float((left[1] + right[1]) / 2)
        xs = np.arange(s, dtype=np.float32)
        across = (xs - self.centre_x) / self.half_width
        self.profile = np.sqrt(np.clip(1.0 - across ** 2, 0.0, 1.0)).astype(np.float32)
        nose = np.array([p[i, :2] for i in mesh.SUBNASAL_ROW])
        self.top = np.minimum(table(nose, s) + 0.02 * iod, self.upper_outer - 0.05 * iod)
        jaw_points = p[list(mesh.JAW), :2]
        self.jaw = table(jaw_points, s)
        # Columns where the jaw line lies well below the mouth corners: the jaw drops there, fading to the sides.
        low_enough = self.jaw > self.corner_y + 0.25 * iod
        cols = np.nonzero(low_enough)[0]
        if len(cols) < 4:
            reach = self.outer_half_width * 1.5
            cols = np.arange(int(self.centre_x - reach), int(self.centre_x + reach))
        self.x0, self.x1 = int(max(cols.min(), 0)), int(min(cols.max() + 1, s))
        span = max(self.x1 - self.x0, 2)
        rel = (xs - self.x0) / span
        self.jaw_fall = (np.maximum(np.sin(np.clip(rel, 0, 1) * np.pi), 0.0) ** 0.7).astype(np.float32)
        self.jaw = np.maximum(self.jaw, self.lower_outer + 0.05 * iod)
        self.neck = self.jaw + 0.4 * iod
        self.y0 = int(max(np.floor(self.top[self.x0:self.x1].min()) - 1, 0))
        self.y1 = int(min(np.ceil(self.neck[self.x0:self.x1].max()) + 1, s))
        # Rows over which the corners move sideways (width, rounding): most at the mouth line.
        self.width_top = float(self.top[int(self.centre_x)])
        self.width_bottom = float(self.jaw[int(self.centre_x)])
        self.crop = analysis.crop
        self._tables = None
        self.own_interior = bool((self.rest_gap > 0.03 * iod).sum() >= 3)
        self._colours(analysis)

    def _colours(self, analysis: PhotoAnalysis) -> None:
        c = analysis.colors
        lip, skin, sclera, dark = (np.asarray(c[k], np.float32) for k in ("lip", "skin", "sclera", "dark"))
        # A mouth's inside is a deep shade of its lips' own hue (a statue's stays stone, a grey photo grey).
        lip_luma = _luma(lip)
        cavity = np.clip(0.3 * lip_luma + 1.2 * (lip - lip_luma), 0.0, 1.0) * 0.75 + 0.25 * dark
        # Teeth: as light as the eye whites, warmed a little towards the skin's hue (ivory, not blue-grey).
        warm = 0.75 + 0.25 * skin / max(_luma(skin), 1e-3)
        teeth = np.full(3, _luma(sclera), np.float32) * warm.astype(np.float32)
        own = c.get("teeth")
        if own is not None and analysis.rest[INDEX["teeth"]] > 0.3:
            teeth = np.asarray(own, np.float32)  # the photo shows its teeth: match them
        teeth *= min(1.0, 0.92 * _luma(sclera) / max(_luma(teeth), 1e-3))  # never brighter than the eye whites
        tongue = 0.8 * lip + 0.2 * dark
        colours = {"cavity": cavity, "teeth": teeth, "tongue": tongue}
        if analysis.grey:
            colours = {k: np.full(3, _luma(v), np.float32) for k, v in colours.items()}
        self.colours = {k: np.clip(v, 0, 1) * 255.0 for k, v in colours.items()}
        rng = np.random.default_rng(7)  # a fixed grain pattern: drawn pixels carry the photo's noise without flicker
        self.noise = (rng.standard_normal((self.size, self.size)).astype(np.float32) * analysis.grain)

    # ---- per frame ---------------------------------------------------------------------------------------------
    def frame(self, motion: np.ndarray) -> MouthFrame:
        rest = self.rest
        d = lambda name: float(motion[INDEX[name]] - rest[INDEX[name]])  # noqa: E731
        spread, rounding = d("mouth_width"), d("mouth_round")
        width_change = self.outer_half_width * (WIDTH_PER_SPREAD * spread - ROUND_NARROWING * rounding)
        return MouthFrame(gap_change=d("mouth_open") * GAP_PER_OPEN * self.iod, width_change=width_change,
                          round_change=rounding, teeth=float(np.clip(motion[INDEX["teeth"]], 0, 1)),
                          tongue=float(np.clip(motion[INDEX["tongue"]], 0, 1)),
                          opening=float(np.clip(motion[INDEX["mouth_open"]], 0, 1)))

    def is_still(self, f: MouthFrame) -> bool:
        return abs(f.gap_change) < 1e-3 and abs(f.width_change) < 1e-3 and abs(f.round_change) < 1e-4

    def lines(self, x: np.ndarray, f: MouthFrame) -> dict[str, np.ndarray]:
        """Source (rest) and destination lip/jaw lines at head-frame columns x."""
        if self._tables is None:
            self._tables = np.stack([self.profile, self.rest_gap, self.upper_outer, self.upper_inner, self.lower_inner,
                                     self.lower_outer, self.top, self.jaw, self.neck, self.jaw_fall]).astype(np.float32)
        prof, rest_gap, uo, ui, li, lo, top, jaw, neck, jaw_fall = lookup(self._tables, x)
        gap = np.maximum(rest_gap + f.gap_change * prof, 0.0)
        change = gap - rest_gap
        up, down = UPPER_LIP_SHARE * change, (1.0 - UPPER_LIP_SHARE) * change
        chin = CHIN_PER_LIP * (1.0 - UPPER_LIP_SHARE) * f.gap_change * jaw_fall
        pout = ROUND_THICKENING * f.round_change * np.sqrt(prof)  # only on the lips: nothing moves at the sides
        pout_up, pout_down = pout * (ui - uo), pout * (lo - li)
        ui_d = ui - up
        uo_d = np.clip(uo - up - pout_up, top + 1.0, ui_d)
        li_d = li + down
        lo_d = np.maximum(lo + down + pout_down, li_d)
        jaw_d = np.clip(jaw + chin, lo_d + 1.0, neck - 1.0)
        # Where the photo's own lips were apart, a closed mouth still shows a dark seam over the hidden teeth.
        middle = (ui_d + li_d) / 2
        seam = np.where(rest_gap > 1.0, 1.0, 0.0)
        ui_draw, li_draw = np.minimum(ui_d, middle - seam), np.maximum(li_d, middle + seam)
        return {"top": top, "uo": uo, "ui": ui, "li": li, "lo": lo, "jaw": jaw, "neck": neck, "uo_d": uo_d,
                "ui_d": ui_d, "li_d": li_d, "lo_d": lo_d, "jaw_d": jaw_d, "down": down, "prof": prof,
                "ui_draw": ui_draw, "li_draw": li_draw}

    def _width_undo(self, hx: np.ndarray, hy, f: MouthFrame) -> np.ndarray:
        """Undo the corners' sideways move (mouth_width, mouth_round) at head-frame points."""
        if abs(f.width_change) <= 1e-3:
            return hx
        v = smoothstep((hy - self.width_top) / max(self.corner_y - self.width_top, 1.0)) * \
            smoothstep((self.width_bottom - hy) / max(self.width_bottom - self.corner_y, 1.0))
        c, w = self.centre_x, self.outer_half_width
        shift = f.width_change * v
        # The cheeks take up the corners' move, out to 2.2 half-widths or the region's edge, where nothing moves.
        far = max(min(2.2 * w, c - self.x0 - 2, self.x1 - 2 - c), w + abs(f.width_change) + 2)
        return piecewise(hx, [
            Segment(c - far, c - w - shift, c - far, c - w),
            Segment(c - w - shift, c, c - w, c),
            Segment(c, c + w + shift, c, c + w),
            Segment(c + w + shift, c + far, c + w, c + far),
        ])

    def columns(self, hx: np.ndarray, hy: np.ndarray, f: MouthFrame) -> tuple[np.ndarray, dict]:
        """Source columns and the lip/jaw lines at head-frame points. The lines are taken at each column's position
        on the mouth line, so they stay one value per column where the head is still (hx (1, w), hy (h, 1))."""
        sx = self._width_undo(hx, hy, f)
        line_x = self._width_undo(hx, np.float32(self.corner_y), f)
        L = self.lines(line_x, f)
        L["sx"] = sx
        return sx, L

    def backward(self, hx: np.ndarray, hy: np.ndarray, f: MouthFrame) -> tuple[np.ndarray, np.ndarray, dict]:
        """Head-frame destination coordinates -> source coordinates, and the lines used (for the interior)."""
        sx, L = self.columns(hx, hy, f)
        middle = (L["ui_d"] + L["li_d"]) / 2
        sy = piecewise(hy, [
            Segment(L["top"], L["uo_d"], L["top"], L["uo"]),
            Segment(L["uo_d"], L["ui_d"], L["uo"], L["ui"]),
            # Inside the opening (covered by the interior): each lip's own edge.
            Segment(L["ui_d"], middle, L["ui"], L["ui"]),
            Segment(middle, L["li_d"], L["li"], L["li"]),
            Segment(L["li_d"], L["lo_d"], L["li"], L["lo"]),
            Segment(L["lo_d"], L["jaw_d"], L["lo"], L["jaw"]),
            Segment(L["jaw_d"], L["neck"], L["jaw"], L["neck"]),
        ])
        return sx, sy, L

    def interior(self, hx: np.ndarray, hy: np.ndarray, L: dict, f: MouthFrame,
                 rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        """The drawn interior (h, w, 3) float32 0-255 and its coverage (h, w) at head-frame points."""
        iod = self.iod
        ui_d, li_d = L["ui_draw"], L["li_draw"]
        gap = np.maximum(li_d - ui_d, 1e-3)
        cover = np.clip(hy - ui_d + 0.5, 0, 1) * np.clip(li_d - hy + 0.5, 0, 1) * np.clip(gap, 0, 1)
        t = np.clip((hy - ui_d) / gap, 0, 1)
        e = np.clip(np.abs(hx - self.centre_x) / self.half_width, 0, 1)
        depth = (1.0 - e * e) * np.sin(np.pi * t)
        shade = (1.0 - 0.45 * depth) * (0.55 + 0.45 * smoothstep((hy - ui_d) / (0.08 * iod)))
        image = self.colours["cavity"] * shade[..., None]
        prof = L["prof"]
        # Tongue: on the jaw, at the bottom of the opening.
        if f.opening > 0.05:
            tongue_cx = self.centre_x
            tongue_cy = li_d + 0.03 * iod
            rx = 0.6 * self.half_width
            ry = np.maximum(0.25 * (li_d - ui_d) * (0.6 + f.tongue), 1.0)
            r = np.sqrt(((hx - tongue_cx) / rx) ** 2 + ((hy - tongue_cy) / ry) ** 2)
            alpha = np.clip((1.0 - r) * ry, 0, 1) * min(0.35 + f.tongue, 0.95)
            tongue = self.colours["tongue"] * (0.75 + 0.25 * np.clip((hy - tongue_cy + ry) / (2 * ry), 0, 1))[..., None]
            image += (tongue - image) * alpha[..., None]
        if f.teeth > 0.01:
            # Lower teeth: fixed to the jaw, shown as the mouth opens wide.
            lower_h = LOWER_TOOTH_HEIGHT * iod * f.teeth * float(np.clip((f.opening - 0.35) / 0.45, 0, 1)) * \
                prof ** 0.6 * smoothstep((0.8 - np.abs(hx - self.centre_x) / self.half_width) / 0.3)
            bottom = L["li"] + L["down"] + 0.02 * iod
            a = np.clip(hy - (bottom - lower_h) + 0.5, 0, 1) * np.clip(lower_h, 0, 1)
            image += (self.colours["teeth"] * 0.75 * (0.6 + 0.4 * prof)[..., None] - image) * a[..., None]
            # Upper teeth: fixed to the skull, hanging from the rest lip line.
            # Upper teeth: fixed to the skull, hanging from the rest lip line, fading out before the corners.
            e = np.abs(hx - self.centre_x) / self.half_width
            upper_h = TOOTH_HEIGHT * iod * f.teeth * prof ** 0.6 * smoothstep((0.92 - e) / 0.3)
            edge = L["ui"] + upper_h
            a = np.clip(edge - hy + 0.5, 0, 1) * np.clip(upper_h, 0, 1)
            phase = np.abs(((hx - self.centre_x) / (0.1 * iod)) % 1.0 - 0.5) * 2  # 1 at a tooth's edge
            seams = 1.0 - 0.12 * phase ** 10
            lit = (0.7 + 0.3 * prof) * seams * (0.8 + 0.2 * smoothstep((hy - ui_d) / (0.05 * iod)))
            image += (self.colours["teeth"] * lit[..., None] - image) * a[..., None]
        image += self.noise[rows, cols][..., None]
        if self.own_interior:
            image = self._photo_interior(image, hx, hy, L, gap)
        return image, cover

    def _photo_interior(self, image: np.ndarray, hx: np.ndarray, hy: np.ndarray, L: dict, gap) -> np.ndarray:
        """Where the photo shows its own mouth interior, reuse it: the upper half of the photo's opening stays
        with the skull (its upper teeth do not move), the lower half moves with the jaw."""
        ui, li = L["ui"], L["li"]
        middle = np.minimum(ui + UPPER_TEETH_REACH * self.iod, li)  # what hangs from the skull: the upper teeth
        sx = L["sx"]
        valid = lookup(self.rest_gap, sx) > 0.03 * self.iod
        upper = np.clip(hy - ui + 0.5, 0, 1) * np.clip(middle - hy + 0.5, 0, 1)
        jaw_y = hy - L["down"]
        lower = np.clip(jaw_y - middle + 0.5, 0, 1) * np.clip(li - jaw_y + 0.5, 0, 1)
        alpha = np.maximum(upper, lower) * valid * np.clip((gap - 1.0) / 3.0, 0, 1)  # a lips' seam stays dark
        if not alpha.any():
            return image
        src_y = np.where(upper >= lower, hy, jaw_y).astype(np.float32)
        src_x = np.ascontiguousarray(np.broadcast_to(sx, src_y.shape), np.float32)
        photo = cv2.remap(self.crop, src_x, src_y, cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
        return image + (photo - image) * alpha[..., None]
