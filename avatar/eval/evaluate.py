"""Score a model, or an existing render, against the oracle on held-out clips.

Evaluation is in still-head mode: the model gets the held-out identity's neutral frame (mouth closed, head still,
eyes open) and the clip's audio, with head speed 0; the oracle re-renders the clip's expression parameters with
the head held still, at the model's resolution. The oracle is the same generator that wrote the corpus, so the
ground truth is exact.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from avatar.data.corpus import ClipSpec, CorpusReader, write_corpus
from avatar.data.face import FaceRenderer, FaceState, Identity, still_head
from avatar.data.motion import FPS, SAMPLE_RATE
from avatar.eval import metrics
from avatar.eval.mouth import mouth_opening

EVAL_SEED = 2402  # the built-in evaluation set (EMO is arXiv 2402.17485)
EVAL_IDENTITIES = 40  # identities 9, 19, 29, 39 are held out
EVAL_SET_VERSION = "v1"
DRIFT_WINDOW_S = 10.0

Renderer = Callable[[np.ndarray, np.ndarray], Iterable[np.ndarray]]  # (portrait, audio) -> frames


@dataclass
class EvalClip:
    spec: ClipSpec
    identity: Identity


def default_cache_dir() -> Path:
    """Where the built-in evaluation set lives: $EMOTE_CACHE_DIR, else $XDG_CACHE_HOME/emote, else ~/.cache/emote."""
    if os.environ.get("EMOTE_CACHE_DIR"):
        return Path(os.environ["EMOTE_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "emote"


def builtin_eval_set(cache_dir: Path | None = None, log: Callable[[str], None] | None = None) -> Path:
    """The small deterministic held-out set (8 clips, 4 identities), written on first use."""
    root = (cache_dir or default_cache_dir()) / f"eval-{EVAL_SET_VERSION}"
    if not (root / "index.json").is_file():
        # About 8 held-out clips; frames are stored small because evaluation re-renders them from parameters.
        write_corpus(root, identities=EVAL_IDENTITIES, hours=50.0 / 3600, seed=EVAL_SEED, size=64,
                     only_split="test", log=log or (lambda line: None))
    return root


def load_eval_clips(data_dir: str | os.PathLike | None, max_clips: int | None = None,
                    log: Callable[[str], None] | None = None) -> list[EvalClip]:
    reader = CorpusReader(data_dir if data_dir is not None else builtin_eval_set(log=log))
    ids = reader.clip_ids("test")
    if max_clips:
        ids = ids[:max_clips]
    return [EvalClip(spec := reader.spec(cid), reader.identity(spec.identity_index)) for cid in ids]


def find_clip(data_dir: str | os.PathLike | None, clip_id: str) -> EvalClip:
    reader = CorpusReader(data_dir if data_dir is not None else builtin_eval_set())
    spec = reader.spec(clip_id)  # KeyError names the clip
    return EvalClip(spec, reader.identity(spec.identity_index))


@dataclass
class OracleView:
    """The oracle's still-head rendering of one clip at one resolution."""

    renderer: FaceRenderer
    neutral: np.ndarray
    frames: np.ndarray
    mouth_box: tuple[int, int, int, int]

    @classmethod
    def of(cls, clip: EvalClip, size: int) -> "OracleView":
        renderer = FaceRenderer(clip.identity, size)
        frames = np.stack([renderer.render(still_head(s)) for s in clip.spec.states()])
        return cls(renderer, renderer.render(FaceState()), frames, renderer.mouth_box())

    def identity_region(self) -> np.ndarray:
        """Face box minus the mouth box: where identity lives and speech does not."""
        size = self.renderer.size
        x0, y0, x1, y1 = (int(round(v * size)) for v in self.renderer.face_box(FaceState()))
        region = np.zeros((size, size), bool)
        region[y0:y1, x0:x1] = True
        r0, r1, c0, c1 = self.mouth_box
        region[r0:r1, c0:c1] = False
        return region


def score_clips(rendered: list[np.ndarray], oracles: list[OracleView], clips: list[EvalClip]) -> dict:
    """Metrics over clips: rendered[i] are the frames produced for clips[i] (uint8 [F, R, R, 3])."""
    measured, reference, params, per_clip = [], [], [], []
    squared, pixels, ssims, flickers, frames_total = 0.0, 0, [], [], 0
    for frames, oracle, clip in zip(rendered, oracles, clips):
        n = min(len(frames), len(oracle.frames))
        frames, truth = frames[:n], oracle.frames[:n]
        measured.append(mouth_opening(frames, oracle.neutral, oracle.mouth_box))
        reference.append(mouth_opening(truth, oracle.neutral, oracle.mouth_box))
        params.append(clip.spec.column("mouth_open")[:n])
        per_clip.append({"clip": clip.spec.clip_id, "identity": clip.spec.identity_index,
                         "traits": list(clip.identity.traits()), "frames": n,
                         "r": metrics.pearson(measured[-1], reference[-1]), "psnr": metrics.psnr(frames, truth)})
        squared += metrics.mse(frames, truth) * truth.size
        pixels += truth.size
        ssims.append(metrics.ssim(frames, truth) * n)
        flickers.append(metrics.flicker(frames, metrics.static_mask(truth)) * n)
        frames_total += n
    sync = metrics.lip_sync(measured, reference)
    sync["r_param"] = metrics.lip_sync(measured, params)["r"]
    mean_squared = squared / max(pixels, 1)
    psnr = metrics.PSNR_CAP if mean_squared <= 0 else min(10 * np.log10(255.0 ** 2 / mean_squared), metrics.PSNR_CAP)
    return {
        "lip_sync": sync,
        "psnr": float(psnr),
        "ssim": float(sum(ssims) / max(frames_total, 1)),
        "flicker": float(sum(flickers) / max(frames_total, 1)),
        "clips": len(clips),
        "frames": frames_total,
        "per_clip": per_clip,  # lip sync varies far more between identities than between models
    }


def drift_audio(clips: list[EvalClip], seconds: float) -> np.ndarray:
    """`seconds` of held-out audio: the clips' audio, cycled."""
    needed = int(seconds * SAMPLE_RATE)
    pieces, total = [], 0
    while total < needed:
        for clip in clips:
            pieces.append(clip.spec.audio)
            total += len(clip.spec.audio)
            if total >= needed:
                break
    return np.concatenate(pieces)[:needed].astype(np.float32)


def score_drift(frames: np.ndarray, oracle: OracleView) -> float:
    return metrics.drift(frames, oracle.identity_region(), FPS, DRIFT_WINDOW_S)


def evaluate_renderer(render: Renderer, size: int, clips: list[EvalClip], drift_seconds: float = 120.0,
                      log: Callable[[str], None] | None = None) -> dict:
    """Render every clip with `render(portrait, audio)` and score it; then the long render for drift."""
    log = log or (lambda line: None)
    oracles = [OracleView.of(clip, size) for clip in clips]
    rendered = []
    for i, (clip, oracle) in enumerate(zip(clips, oracles)):
        log(f"eval: rendering clip {i + 1}/{len(clips)} ({clip.spec.clip_id}, {clip.spec.num_frames} frames)")
        rendered.append(np.stack(list(render(oracle.neutral, clip.spec.audio))))
    result = score_clips(rendered, oracles, clips)
    result["drift"] = None
    if drift_seconds and drift_seconds >= 2 * DRIFT_WINDOW_S:
        log(f"eval: rendering {drift_seconds:.0f} s for drift")
        frames = np.stack(list(render(oracles[0].neutral, drift_audio(clips, drift_seconds))))
        result["drift"] = score_drift(frames, oracles[0])
        result["drift_seconds"] = float(drift_seconds)
    return result


def evaluate_model(model_dir: str | None, steps: int | None, clips: list[EvalClip], drift_seconds: float = 120.0,
                   seed: int = 0, log: Callable[[str], None] | None = None, strength: float | None = None) -> dict:
    from avatar.pipeline import AvatarPipeline

    pipe = AvatarPipeline.from_pretrained(model_dir, device="cpu")
    steps = steps or pipe.default_steps
    strength = pipe.config.strength if strength is None else strength

    def render(portrait: np.ndarray, audio: np.ndarray) -> Iterable[np.ndarray]:
        return pipe.render(portrait, audio, sample_rate=SAMPLE_RATE, steps=steps, seed=seed, speed=0.0,
                           strength=strength)

    result = evaluate_renderer(render, int(pipe.resolution), clips, drift_seconds, log)
    result.update(model=model_dir or "bundled default", steps=int(steps), strength=float(strength),
                  warm_start=pipe.config.warm_start, noise=pipe.config.noise, resolution=int(pipe.resolution))
    return result


def evaluate_video(frames: np.ndarray, clip: EvalClip) -> dict:
    """Score an existing render (uint8 [F, S, S, 3]) of `clip`; the oracle is drawn at the video's size."""
    if frames.shape[1] != frames.shape[2]:
        raise ValueError(f"the video must be square, got {frames.shape[2]}x{frames.shape[1]}")
    oracle = OracleView.of(clip, int(frames.shape[1]))
    result = score_clips([frames], [oracle], [clip])
    result["drift"] = score_drift(frames, oracle) if len(frames) >= 2 * DRIFT_WINDOW_S * FPS else None
    result.update(clip=clip.spec.clip_id, resolution=int(frames.shape[1]), expected_frames=clip.spec.num_frames)
    return result
