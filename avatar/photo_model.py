"""The default model: the motion backbone (audio -> per-frame facial motion) with the photo renderer (motion -> the
portrait's own pixels, moved along its face mesh). One `FrameModel` for the streaming engine, and `render_offline`
for `emote render`; both run the same window schedule, so a live session and an offline render of the same audio
with the same seed make the same frames.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import EmoteError
from .frame_model import AvatarHandle, BatchResult, ModelSpec, WindowRequest, WindowResult

MOTION_MODEL_DIR = Path(__file__).resolve().parent / "checkpoints" / "motion"
SIZES = (256, 512)  # the crop's side, pixels: the photo's own resolution, never upscaled from a small model
DEFAULT_SIZE = 512
ANALYSIS_DIR = "photo-analysis"


def check_size(size: int) -> int:
    if not SIZES[0] <= size <= SIZES[1]:
        raise EmoteError(f"--size must be between {SIZES[0]} and {SIZES[1]}, got {size}")
    return size


@dataclass
class PhotoAvatar:
    """What a session's windows need of their avatar: the analysis (its crop, rest state, reference embedding) and
    a renderer built on it."""

    analysis: object  # avatar.photo.analysis.PhotoAnalysis
    renderer: object  # avatar.photo.renderer.PhotoRenderer


class MotionPhotoModel:
    """`FrameModel`: carry = the last M motion frames of the session's previous window."""

    def __init__(self, backbone, size: int = DEFAULT_SIZE, frames_per_window: int = 1, lookahead_frames: int = 1):
        from .motion.audio import FEATURE_DIM
        from .motion.generate import CONTEXT_FRAMES, MotionGenerator

        self.size = check_size(size)
        self.generator = MotionGenerator(backbone)
        self.spec = ModelSpec(
            name=f"motion-photo-{size}", width=size, height=size, frames_per_window=frames_per_window,
            context_frames=CONTEXT_FRAMES, feature_dim=FEATURE_DIM, lookahead_frames=lookahead_frames,
            default_steps=1, min_steps=1,
        )
        self._example: AvatarHandle | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, size: int = DEFAULT_SIZE, **options) -> "MotionPhotoModel":
        from .motion.checkpoint import load_backbone

        return cls(load_backbone(path if path is not None else MOTION_MODEL_DIR), size=size, **options)

    # ---- avatars -------------------------------------------------------------------------------------------------

    def prepare_avatar(self, avatar_id: str, portrait: np.ndarray, cache_dir: Path | None = None,
                       face: int | None = None, name: str = "portrait", keep_original: bool = False) -> AvatarHandle:
        """`keep_original` keeps the whole photo in memory for paste-back (`--full-frame`); live avatars hold only
        their crop, since a served photo can be tens of megapixels."""
        from .photo.analysis import PhotoAnalysis, analyse_portrait
        from .photo.renderer import PhotoRenderer

        analysis = None
        cached = Path(cache_dir) / ANALYSIS_DIR if cache_dir is not None else None
        if cached is not None and cached.is_dir():
            try:
                analysis = PhotoAnalysis.load(cached)
                if analysis.size != self.size:
                    analysis = None
            except EmoteError:  # an old or damaged cache is recomputed from the portrait
                analysis = None
        if analysis is None:
            analysis = analyse_portrait(portrait, size=self.size, face=face, name=name)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                analysis.save(cached)
        if not keep_original:
            analysis = dataclasses.replace(analysis, original=None)
        return AvatarHandle(avatar_id, analysis.crop, PhotoAvatar(analysis, PhotoRenderer(analysis)))

    def example_avatar(self) -> AvatarHandle:
        with self._lock:
            if self._example is None:
                from skimage import data

                self._example = self.prepare_avatar("example", data.astronaut(), name="the astronaut portrait")
            return self._example

    def new_audio_encoder(self):
        from .motion.audio import StreamingMotionAudioEncoder

        return StreamingMotionAudioEncoder()

    # ---- windows -------------------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[WindowRequest], steps: int) -> BatchResult:
        t0 = time.perf_counter()
        motion = self.generate_motion(requests, steps)
        t1 = time.perf_counter()
        results = []
        for request, frames_motion in zip(requests, motion):
            frames = request.avatar.state.renderer.render_many(frames_motion)
            results.append(WindowResult(frames, self.next_carry(request.carry, frames_motion)))
        t2 = time.perf_counter()
        return BatchResult(results, step_seconds=t1 - t0, fixed_seconds=t2 - t1,
                           timings={"motion": t1 - t0, "render": t2 - t1})

    @torch.no_grad()
    def generate_motion(self, requests: Sequence[WindowRequest], steps: int) -> list[np.ndarray]:
        """Motion (F, MOTION_DIM) of each window. Windows with and without a carry are run as separate batches."""
        from .motion.generate import window_generator

        out: list[np.ndarray | None] = [None] * len(requests)
        for has_carry in (False, True):
            group = [i for i, r in enumerate(requests) if (r.carry is not None) == has_carry]
            if not group:
                continue
            batch = [requests[i] for i in group]
            audio = torch.stack([torch.as_tensor(np.asarray(r.audio), dtype=torch.float32) for r in batch])
            reference = torch.stack([torch.from_numpy(r.avatar.state.analysis.reference.astype(np.float32))
                                     for r in batch])
            previous = torch.stack([torch.from_numpy(r.carry) for r in batch]) if has_carry else None
            speaking = torch.from_numpy(np.stack([np.asarray(r.speaking, bool) for r in batch]))
            generators = [window_generator(r.seed, r.index) for r in batch]
            motion = self.generator.generate(audio, reference, previous, speaking, generators, steps=steps)
            for i, m in zip(group, motion.numpy()):
                out[i] = m
        return out  # type: ignore[return-value]

    def next_carry(self, previous: np.ndarray | None, motion: np.ndarray) -> np.ndarray:
        """The carry of a session's next window: the last M motion frames and the pose controller's state (the
        generator's one rule, shared with offline rendering)."""
        return self.generator.next_carry(previous, motion)

    # ---- offline -------------------------------------------------------------------------------------------------

    def render_offline(self, avatar: AvatarHandle, audio: np.ndarray, seed: int = 0, steps: int = 1,
                       full_frame: bool = False, max_side: int | None = None) -> Iterator[np.ndarray]:
        """Frames for a whole audio clip, one window at a time (memory bounded by one window, any length)."""
        from .motion.generate import motion_for_audio

        motion = motion_for_audio(self.generator, audio, avatar.state.analysis.reference, seed=seed, steps=steps,
                                  frames_per_window=self.spec.frames_per_window,
                                  lookahead_frames=self.spec.lookahead_frames)
        renderer = avatar.state.renderer
        for frame_motion in motion:
            frame = renderer.render(frame_motion)
            yield renderer.paste_back(frame, max_side=max_side) if full_frame else frame
