"""Sampling motion windows from a `MotionBackbone`, live (one window at a time) and offline (`motion_for_audio`).

Offline follows the live engine exactly: windows of `frames_per_window` frames, each frame's audio context
t-m..t+m where frames past the window's end (not yet heard live) repeat the window's last frame and frames before
the audio's start repeat frame 0, the previous window's last M frames as continuity, and one noise generator per
window seeded from (seed, window index). So streaming equals offline, and memory is bounded by one window.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from avatar.errors import EmoteError
from avatar.motion import spec
from avatar.motion.audio import (FEATURE_DIM, SAMPLES_PER_FRAME, StreamingMotionAudioEncoder, check_audio)
from avatar.motion.backbone import MotionBackbone

CONTEXT_FRAMES = 2  # m: frame t attends to audio features of t-m..t+m
_LOW = torch.tensor([f.low for f in spec.MOTION_FIELDS])
_HIGH = torch.tensor([f.high for f in spec.MOTION_FIELDS])
_CENTER = torch.tensor([f.center for f in spec.MOTION_FIELDS])
_SCALE = torch.tensor([f.scale for f in spec.MOTION_FIELDS])
_POSE = np.array([spec.INDEX[name] for name in spec.POSE_NAMES])


def _span(names: tuple[str, ...]) -> slice:
    first = spec.INDEX[names[0]]
    assert [spec.INDEX[n] for n in names] == list(range(first, first + len(names))), names
    return slice(first, first + len(names))  # a slice: views, and faster than fancy indexing in the per-frame loop


_POSE_SPAN, _MOUTH_SPAN = _span(spec.POSE_NAMES), _span(spec.MOUTH_NAMES)
_POSE_LOW, _POSE_HIGH = _LOW.numpy()[_POSE_SPAN].copy(), _HIGH.numpy()[_POSE_SPAN].copy()
FPS = 25


def window_generator(seed: int, index: int) -> torch.Generator:
    """The one seeding rule for a session's window `index` (streaming and offline)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, 0x30]).generate_state(2)
    generator = torch.Generator()
    generator.manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return generator


def normalize(motion: torch.Tensor) -> torch.Tensor:
    return (motion - _CENTER) / _SCALE


def denormalize(motion: torch.Tensor) -> torch.Tensor:
    return motion * _SCALE + _CENTER


class MotionGenerator:
    """Few-step sampler around a backbone. `guidance` > 1 applies classifier-free guidance on the audio (used for
    the undistilled teacher; distilled students carry guidance inside and run with 1)."""

    def __init__(self, backbone: MotionBackbone, guidance: float | None = None, pose_leak: float | None = None,
                 pose_cutoff_hz: float | None = None, mouth_noise: float | None = None):
        self.backbone = backbone.eval()
        self.motion_frames: int = int(backbone.config.motion_frames)
        self.guidance = float(getattr(backbone.config, "guidance", 1.0) if guidance is None else guidance)
        self.default_steps = 1
        self._fast = None  # the NumPy forward, built on first use from the weights as they are then
        # Each window continues the head pose of the previous window's tail; over thousands of windows small biases
        # add up and the pose wanders off rest. Scaling the carried pose by (1 - pose_leak) makes it mean-reverting.
        self.pose_leak = float(getattr(backbone.config, "pose_leak", 0.0) if pose_leak is None else pose_leak)
        # pose_cutoff_hz > 0: a slow controller instead. Each frame's head pose is pulled toward rest by a critically
        # damped proportional-integral correction with this natural frequency: it removes any constant bias (the
        # integral term), so the mean pose cannot wander, and leaves motion well above the cutoff alone. The correction
        # is applied to the emitted frames, which are also the carried ones, so the model never sees a drifted head.
        # Its state (the integral of the emitted pose) travels in the carry: see `next_carry`.
        self.pose_cutoff_hz = float(getattr(backbone.config, "pose_cutoff_hz", 0.0)
                                    if pose_cutoff_hz is None else pose_cutoff_hz)
        if not 0.0 <= self.pose_cutoff_hz <= 1.0:
            raise EmoteError(f"pose_cutoff_hz must be 0..1, got {self.pose_cutoff_hz}")
        omega = 2 * np.pi * self.pose_cutoff_hz / FPS
        self._pose_gains = (np.float32(2 * omega), np.float32(omega * omega))  # P and I gains, per frame
        # mouth_noise: the scale of the mouth fields' starting noise, N(0, s^2) (1: the trained distribution). The mouth
        # should follow the audio, not the seed; blinks, brows and head keep full noise and stay seed-dependent.
        self.mouth_noise = float(getattr(backbone.config, "mouth_noise", 1.0) if mouth_noise is None else mouth_noise)
        if not 0.0 <= self.mouth_noise <= 1.0:
            raise EmoteError(f"mouth_noise must be 0..1, got {self.mouth_noise}")

    @property
    def carry_rows(self) -> int:
        """Rows of a carry: the last M motion frames, and with the pose controller on one more row holding its state
        (the integral of the emitted head pose, in the pose fields)."""
        return self.motion_frames + (1 if self.pose_cutoff_hz > 0 else 0)

    def next_carry(self, previous: np.ndarray | None, motion: np.ndarray) -> np.ndarray:
        """The carry of a session's next window, from this window's carry (None for its first) and (F, MOTION_DIM)
        motion: the last M frames (a window shorter than M keeps older frames; a session's first short window
        repeats its first frame), and with the pose controller on its state. The one rule for streaming and
        offline."""
        m, frames = self.motion_frames, len(motion)
        carry = np.empty((self.carry_rows, spec.MOTION_DIM), np.float32)
        if frames >= m:
            carry[:m] = motion[frames - m:]
        else:
            older = np.repeat(motion[:1], m, axis=0) if previous is None else previous[:m]
            carry[:m - frames], carry[m - frames:m] = older[frames:], motion
        if self.pose_cutoff_hz > 0:
            carry[m] = 0.0
            if previous is not None and len(previous) > m:
                carry[m, _POSE_SPAN] = previous[m, _POSE_SPAN]
            carry[m, _POSE_SPAN] += np.add.reduce(motion[:, _POSE_SPAN], axis=0, dtype=np.float32)
        return carry

    def _correct_pose(self, motion: np.ndarray, previous: np.ndarray | None, state: np.ndarray | None) -> np.ndarray:
        """The pose controller over a batch of windows (physical units, in place): frame by frame, the offset grows
        by P * (last emitted pose) + I * (integral of the emitted pose). The carried frames already hold the earlier
        windows' offsets, so each window's offset starts at 0."""
        p_gain, i_gain = self._pose_gains
        batch = motion.shape[0]
        pose = motion[..., _POSE_SPAN]
        last = np.zeros((batch, pose.shape[-1]), np.float32) if previous is None else previous[:, -1, _POSE_SPAN]
        integral = np.zeros_like(last) if state is None else state[:, _POSE_SPAN].copy()
        offset = np.zeros_like(last)
        for t in range(motion.shape[1]):
            offset += p_gain * last + i_gain * integral
            frame = pose[:, t]
            np.subtract(frame, offset, out=frame)
            np.minimum(np.maximum(frame, _POSE_LOW, out=frame), _POSE_HIGH, out=frame)
            last = frame
            integral += frame
        return motion

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "MotionGenerator":
        from avatar.motion.checkpoint import load_backbone

        return cls(load_backbone(path), **kwargs)

    def _x0(self, x: torch.Tensor, t: torch.Tensor, audio, reference, previous, speaking, previous_keep):
        model = self.backbone
        if self.guidance == 1.0:
            return model(x, t, audio, reference, previous, speaking, previous_keep=previous_keep)
        batch = x.shape[0]
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([audio, audio]),
                     torch.cat([reference, reference]), None if previous is None else torch.cat([previous, previous]),
                     torch.cat([speaking, speaking]),
                     audio_keep=torch.cat([torch.ones(batch, dtype=torch.bool), torch.zeros(batch, dtype=torch.bool)]),
                     previous_keep=None if previous_keep is None else torch.cat([previous_keep, previous_keep]))
        cond, uncond = both[:batch], both[batch:]
        return uncond + self.guidance * (cond - uncond)

    def generate(self, audio: torch.Tensor, reference: torch.Tensor, previous: torch.Tensor | None,
                 speaking: torch.Tensor, generators: list[torch.Generator], steps: int = 1) -> torch.Tensor:
        """A batch of windows -> (B, F, MOTION_DIM) motion in physical units, clipped to the spec's ranges.

        audio (B, F, 2m+1, FEATURE_DIM); reference (B, REFERENCE_DIM); previous (B, carry_rows, MOTION_DIM), carries
        from `next_carry` (physical units), or None (a session's first window; a carry of NaN marks one sample
        without a previous window in a mixed batch);
        speaking (B, F) bool; generators: one per window. Deterministic given the generators' states."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 4 or audio.shape[2] != 2 * CONTEXT_FRAMES + 1 or audio.shape[3] != FEATURE_DIM:
            raise EmoteError(f"audio must be (B, F, {2 * CONTEXT_FRAMES + 1}, {FEATURE_DIM}) features, "
                             f"got {list(audio.shape)}")
        batch, frames = audio.shape[:2]
        if frames < 1 or frames > self.backbone.config.max_frames:
            raise EmoteError(f"a window holds 1..{self.backbone.config.max_frames} frames, got {frames}")
        if steps < 1:
            raise EmoteError(f"steps must be at least 1, got {steps}")
        if len(generators) != batch:
            raise EmoteError(f"need one generator per window ({batch}), got {len(generators)}")
        reference = np.asarray(reference, dtype=np.float32).reshape(batch, -1)
        if reference.shape[1] != spec.REFERENCE_DIM:
            raise EmoteError(f"reference must be (B, {spec.REFERENCE_DIM}), got {list(reference.shape)}")
        speaking = np.asarray(speaking).reshape(batch, frames).astype(bool)
        previous_keep, state, carried = None, None, None
        if previous is not None:
            previous = np.asarray(previous, dtype=np.float32)
            if previous.shape != (batch, self.carry_rows, spec.MOTION_DIM):
                raise EmoteError(f"previous must be (B, {self.carry_rows}, {spec.MOTION_DIM}) (a carry from "
                                 f"next_carry), got {list(previous.shape)}")
            if np.isnan(previous).any():
                missing = np.isnan(previous).all(axis=(1, 2))
                previous, previous_keep = np.nan_to_num(previous), ~missing
            if self.pose_cutoff_hz > 0:
                previous, state = previous[:, :self.motion_frames], previous[:, self.motion_frames]
            carried = previous
            if self.pose_leak:  # pull the carried head pose slightly toward rest: see __init__
                previous = previous.copy()
                previous[..., _POSE] *= np.float32(1.0 - self.pose_leak)
            previous = spec.normalize(previous)
        noise = np.stack([torch.randn(frames, spec.MOTION_DIM, generator=g).numpy() for g in generators])
        if self.mouth_noise != 1.0:
            noise[..., _MOUTH_SPAN] *= np.float32(self.mouth_noise)
        if not (np.isfinite(audio).all() and np.isfinite(reference).all()):
            raise EmoteError("audio features and reference must be finite")
        times = np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)
        x = noise
        if self.guidance == 1.0:
            fast = self._fast_model()
            sound = fast.audio_features(audio)
            for i in range(steps):
                x0 = fast(x, np.full(batch, times[i]), audio, reference, previous, speaking, previous_keep, sound)
                x = x0 + (times[i + 1] / times[i]) * (x - x0)
        else:
            with torch.inference_mode():
                args = [torch.from_numpy(audio), torch.from_numpy(reference),
                        None if previous is None else torch.from_numpy(previous), torch.from_numpy(speaking),
                        None if previous_keep is None else torch.from_numpy(previous_keep)]
                xt = torch.from_numpy(x)
                for i in range(steps):
                    t = torch.full((batch,), float(times[i]))
                    x0 = self._x0(xt, t, *args)
                    xt = x0 + float(times[i + 1] / times[i]) * (xt - x0)
                x = xt.numpy()
        motion = spec.clip(spec.denormalize(x))
        if self.pose_cutoff_hz > 0:
            motion = self._correct_pose(motion, carried, state)
        return torch.from_numpy(motion)

    def _fast_model(self):
        if self._fast is None:
            from avatar.motion.fast import FastBackbone

            self._fast = FastBackbone(self.backbone)
        return self._fast


class MotionStream:
    """One session's offline/online state: feeds audio frame by frame and produces motion window by window."""

    def __init__(self, generator: MotionGenerator, reference: np.ndarray, seed: int = 0, steps: int = 1,
                 frames_per_window: int = 4):
        if frames_per_window < 1 or frames_per_window > generator.backbone.config.max_frames:
            raise EmoteError(f"frames_per_window must be 1..{generator.backbone.config.max_frames}, "
                             f"got {frames_per_window}")
        self.generator, self.seed, self.steps, self.window = generator, seed, steps, frames_per_window
        self.reference = np.asarray(reference, np.float32).reshape(1, -1)
        if self.reference.shape[1] != spec.REFERENCE_DIM:
            raise EmoteError(f"reference must have {spec.REFERENCE_DIM} values, got {self.reference.shape[1]}")
        self.encoder = StreamingMotionAudioEncoder()
        self.history = np.zeros((0, FEATURE_DIM), np.float32)  # the last m frames before the current window
        self.previous: np.ndarray | None = None  # (1, carry rows, MOTION_DIM): `MotionGenerator.next_carry`
        self.index = 0

    def window_motion(self, features: np.ndarray, speaking: np.ndarray | None = None,
                      future: np.ndarray | None = None) -> np.ndarray:
        """Motion for one window whose frames have these (F, FEATURE_DIM) features. `future`: features of frames
        after the window that have already been heard (none by default: the engine does not wait for them); context
        frames past what is known repeat the last known frame."""
        frames = len(features)
        ahead = np.zeros((0, FEATURE_DIM), np.float32) if future is None else np.asarray(future, np.float32)
        known = np.concatenate([self.history, features, ahead[:CONTEXT_FRAMES]])
        first = len(self.history)
        offsets = np.arange(-CONTEXT_FRAMES, CONTEXT_FRAMES + 1)
        idx = np.clip(first + np.arange(frames)[:, None] + offsets[None, :], 0, len(known) - 1)
        audio = known[idx][None]
        talking = np.ones((1, frames), bool) if speaking is None else np.asarray(speaking, bool)[None]
        motion = self.generator.generate(audio, self.reference, self.previous, talking,
                                         [window_generator(self.seed, self.index)], self.steps).numpy()[0]
        self.history = known[max(first + frames - CONTEXT_FRAMES, 0):first + frames]
        self.previous = self.generator.next_carry(None if self.previous is None else self.previous[0], motion)[None]
        self.index += 1
        return motion


def motion_for_audio(generator: MotionGenerator, audio: np.ndarray, reference: np.ndarray, seed: int = 0,
                     steps: int = 1, frames_per_window: int = 4, lookahead_frames: int = 0) -> np.ndarray:
    """16 kHz audio -> (ceil(len / 640), MOTION_DIM) motion, windowed and seeded exactly as the live engine.

    `lookahead_frames` (0..CONTEXT_FRAMES): how many frames past a window the engine waits for before generating it
    (0, the engine's default, adds no latency; 2 adds 80 ms and gives every frame its full ±2 context)."""
    samples = check_audio(audio)
    if len(samples) == 0:
        raise EmoteError("audio is empty")
    if not 0 <= lookahead_frames <= CONTEXT_FRAMES:
        raise EmoteError(f"lookahead_frames must be 0..{CONTEXT_FRAMES}, got {lookahead_frames}")
    stream = MotionStream(generator, reference, seed, steps, frames_per_window)
    total = -(-len(samples) // SAMPLES_PER_FRAME)
    out = np.empty((total, spec.MOTION_DIM), np.float32)
    chunk = frames_per_window * SAMPLES_PER_FRAME
    ready = np.zeros((0, FEATURE_DIM), np.float32)
    done = 0
    for start in range(0, len(samples), chunk):
        ready = np.concatenate([ready, stream.encoder.push(samples[start:start + chunk])])
        if start + chunk >= len(samples):
            ready = np.concatenate([ready, stream.encoder.flush()])
            last = True
        else:
            last = False
        while len(ready) >= frames_per_window + lookahead_frames or (last and len(ready)):
            n = min(frames_per_window, len(ready))
            motion = stream.window_motion(ready[:n], future=ready[n:n + lookahead_frames])
            out[done:done + n] = motion
            done += n
            ready = ready[n:]
    return out
