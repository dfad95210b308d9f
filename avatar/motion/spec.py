"""The per-frame motion vector: the one interface between audio -> motion models and every renderer.

A motion frame is a float32 vector of `MOTION_DIM` values in `MOTION_NAMES` order, in the units below (the corpus's
own per-frame state, `avatar.data.face.FaceState`, uses the same names and units).

Expression fields are absolute: 0 is a closed, relaxed mouth and open eyes. Pose fields are relative to the portrait's
own rest pose. A renderer analyses its portrait once and finds the portrait's own expression (`rest`: a smile, an
open mouth); it then draws the *difference* between a motion frame and `rest`, so that rendering `rest` with the pose
fields at 0 reproduces the portrait exactly, and `mouth_open = 0` closes a mouth that is open in the photo.

Models work on normalised motion, `(value - center) / scale`, which puts every field at roughly unit spread.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MotionField:
    name: str
    low: float
    high: float
    center: float  # normalisation: (value - center) / scale
    scale: float
    relative: bool  # relative to the portrait's rest pose (pose fields) rather than absolute (expression)
    unit: str


MOTION_FIELDS: tuple[MotionField, ...] = (
    MotionField("mouth_open", 0.0, 1.0, 0.25, 0.25, False, "0 closed .. 1 widest (jaw drop and lip parting)"),
    MotionField("mouth_width", -1.0, 1.0, 0.0, 0.3, False, "-1 pursed .. 0 relaxed .. 1 spread (smile, /i/)"),
    MotionField("mouth_round", 0.0, 1.0, 0.15, 0.2, False, "0 none .. 1 rounded, protruded lips (/u/, /o/)"),
    MotionField("teeth", 0.0, 1.0, 0.2, 0.25, False, "0 hidden .. 1 fully shown (/f/, /s/, /i/)"),
    MotionField("tongue", 0.0, 1.0, 0.05, 0.2, False, "0 hidden .. 1 tip visible (/l/, /th/)"),
    MotionField("blink", 0.0, 1.0, 0.05, 0.2, False, "0 open .. 1 both eyelids closed"),
    MotionField("brow_raise", -1.0, 1.0, 0.0, 0.3, False, "-1 frown .. 1 raised"),
    MotionField("yaw", -30.0, 30.0, 0.0, 6.0, True, "degrees, positive turns the face to its left"),
    MotionField("pitch", -20.0, 20.0, 0.0, 3.0, True, "degrees, positive nods down"),
    MotionField("roll", -20.0, 20.0, 0.0, 3.0, True, "degrees, positive tilts clockwise on screen"),
    MotionField("tx", -0.2, 0.2, 0.0, 0.015, True, "horizontal shift, in units of half the face crop"),
    MotionField("ty", -0.2, 0.2, 0.0, 0.01, True, "vertical shift (down positive), in units of half the crop"),
)
MOTION_NAMES: tuple[str, ...] = tuple(f.name for f in MOTION_FIELDS)
MOTION_DIM = len(MOTION_FIELDS)
MOUTH_NAMES: tuple[str, ...] = ("mouth_open", "mouth_width", "mouth_round", "teeth", "tongue")
POSE_NAMES: tuple[str, ...] = ("yaw", "pitch", "roll", "tx", "ty")
INDEX = {name: i for i, name in enumerate(MOTION_NAMES)}

_LOW = np.array([f.low for f in MOTION_FIELDS], np.float32)
_HIGH = np.array([f.high for f in MOTION_FIELDS], np.float32)
_CENTER = np.array([f.center for f in MOTION_FIELDS], np.float32)
_SCALE = np.array([f.scale for f in MOTION_FIELDS], np.float32)

# The avatar reference embedding: face geometry measured on the portrait's landmarks (the same function on corpus
# faces and on photos), so that a model can fit the motion's amplitude to the face. See avatar/photo/analysis.py.
REFERENCE_DIM = 8


def neutral() -> np.ndarray:
    """The rest motion frame: closed relaxed mouth, open eyes, rest pose."""
    return np.zeros(MOTION_DIM, np.float32)


def clip(motion: np.ndarray) -> np.ndarray:
    """Clamp every field to its range ([..., MOTION_DIM])."""
    return np.clip(motion, _LOW, _HIGH).astype(np.float32)


def normalize(motion: np.ndarray) -> np.ndarray:
    return ((np.asarray(motion, np.float32) - _CENTER) / _SCALE).astype(np.float32)


def denormalize(normalized: np.ndarray) -> np.ndarray:
    return (np.asarray(normalized, np.float32) * _SCALE + _CENTER).astype(np.float32)


def column(motion: np.ndarray, name: str) -> np.ndarray:
    """One field of a [..., MOTION_DIM] array."""
    return np.asarray(motion)[..., INDEX[name]]


def check(motion: np.ndarray) -> np.ndarray:
    """A float32 [F, MOTION_DIM] array, or ValueError naming what is wrong."""
    array = np.asarray(motion, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != MOTION_DIM:
        raise ValueError(f"motion must be [frames, {MOTION_DIM}], got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError("motion has non-finite values")
    return array
