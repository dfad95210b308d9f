"""Training the motion backbone (flow matching, x0-prediction) and distilling it to 1-2 steps.

Batches are windows cut from corpus clips: F in 1..max_window frames, the M frames before as continuity (dropped
at a clip's start and at random), the audio context truncated at the window's end most of the time (the live engine
does not wait for future audio), the audio dropped at random for guidance. Audio is re-augmented every
`refresh_every` steps: gain ±20 dB, a microphone noise floor, non-speech clips with a closed mouth.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from avatar.motion import spec
from avatar.motion.audio import FEATURE_DIM, encode_audio
from avatar.motion.backbone import MotionBackbone
from avatar.motion.data import MotionClip, corrected_motion
from avatar.motion.generate import CONTEXT_FRAMES, MotionGenerator

# Loss weight per motion field: the mouth opening is what lip sync is judged on.
FIELD_WEIGHTS = np.array([4.0, 1.5, 1.5, 1.0, 1.0] + [1.0] * 7, np.float32)


@dataclass
class TrainConfig:
    steps: int = 3000
    batch: int = 64
    lr: float = 1e-3
    max_window: int = 12
    audio_drop: float = 0.1
    previous_drop: float = 0.15
    reference_drop: float = 0.1
    truncate_future: float = 0.8  # share of windows whose future context stops at the window's end
    refresh_every: int = 1000
    seed: int = 0
    log_every: int = 100


def augment(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gain ±20 dB and, most of the time, a noise floor between -85 and -50 dBFS (white or low-passed)."""
    out = audio.astype(np.float64) * 10 ** (rng.uniform(-20, 20) / 20)
    if rng.random() < 0.7:
        noise = rng.normal(0, 1, len(audio))
        if rng.random() < 0.5:
            from scipy.signal import lfilter

            noise = lfilter([1.0], [1.0, -0.9], noise)
            noise /= noise.std() + 1e-12
        out += noise * 10 ** (rng.uniform(-85, -50) / 20)
    return out.astype(np.float32)


class WindowSampler:
    """Random training windows from a set of clips (features re-encoded with fresh augmentation on `refresh`)."""

    def __init__(self, clips: list[MotionClip], motion_frames: int, references: np.ndarray | None = None,
                 seed: int = 0):
        """`references`: (identities, REFERENCE_DIM) embeddings of training faces; each clip gets a random one,
        jittered (a clip's motion does not depend on the face, so the model learns to tolerate any plausible face),
        or zeros (no analysis) at the `reference_drop` rate."""
        self.clips = [c for c in clips if len(c.motion) >= 2]
        self.motion_frames = motion_frames
        self.rng = np.random.default_rng(seed)
        self.motion = np.concatenate([spec.normalize(c.motion) for c in self.clips])
        self.lengths = np.array([len(c.motion) for c in self.clips])
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.nonspeech = np.array([c.kind.startswith("nonspeech") or c.kind in ("aug-nonspeech", "aug-silence")
                                   for c in self.clips])
        self.pre_augmented = np.array([c.kind.startswith("aug-") for c in self.clips])
        self.references = (np.zeros((1, spec.REFERENCE_DIM), np.float32) if references is None
                           else np.asarray(references, np.float32))
        self.reference_jitter = self.references.std(axis=0) * 2 + 1e-3 if len(self.references) > 1 else 0.0
        self.features = np.zeros((len(self.motion), FEATURE_DIM), np.float32)
        self.refresh()

    def refresh(self) -> None:
        """Re-encode every clip with fresh augmentation (clips from the augment module get only a mild gain)."""
        for clip, start, n, done in zip(self.clips, self.starts, self.lengths, self.pre_augmented):
            audio = clip.audio * np.float32(10 ** (self.rng.uniform(-6, 6) / 20)) if done else augment(clip.audio,
                                                                                                      self.rng)
            self.features[start:start + n] = encode_audio(audio)[:n]

    def sample(self, batch: int, frames: int, cfg: TrainConfig) -> dict[str, torch.Tensor]:
        rng, m = self.rng, self.motion_frames
        ok = np.flatnonzero(self.lengths >= frames)
        which = ok[rng.choice(len(ok), batch, p=self.lengths[ok] / self.lengths[ok].sum())]
        length = self.lengths[which]
        s = (rng.random(batch) * (length - frames + 1)).astype(int)
        if rng.random() < 0.1:
            s[:] = 0
        base = self.starts[which]
        t_idx = s[:, None] + np.arange(frames)[None]
        end = np.where(rng.random(batch) < cfg.truncate_future, s + frames,
                       np.minimum(s + frames + rng.integers(1, CONTEXT_FRAMES + 1, batch), length))
        ctx = t_idx[:, :, None] + np.arange(-CONTEXT_FRAMES, CONTEXT_FRAMES + 1)[None, None]
        ctx = np.clip(ctx, 0, (end - 1)[:, None, None])
        p_idx = np.clip(s[:, None] - m + np.arange(m)[None], 0, None)
        previous = self.motion[base[:, None] + p_idx]
        previous = previous + rng.normal(0, 0.03, previous.shape).astype(np.float32)
        previous_keep = (s >= m) & (rng.random(batch) >= cfg.previous_drop)
        speaking = np.ones((batch, frames), bool)
        quiet = self.nonspeech[which]
        speaking[quiet] = rng.random((int(quiet.sum()), 1)) < 0.5
        reference = self.references[rng.integers(len(self.references), size=batch)]
        reference = reference + rng.normal(0, 1, reference.shape) * self.reference_jitter
        reference = reference * (rng.random(batch) >= cfg.reference_drop)[:, None]
        return {
            "x0": torch.from_numpy(self.motion[base[:, None] + t_idx]),
            "audio": torch.from_numpy(self.features[base[:, None, None] + ctx]),
            "previous": torch.from_numpy(previous.astype(np.float32)),
            "previous_keep": torch.from_numpy(previous_keep),
            "audio_keep": torch.from_numpy(rng.random(batch) >= cfg.audio_drop),
            "speaking": torch.from_numpy(speaking),
            "reference": torch.from_numpy(reference.astype(np.float32)),
        }


def weighted_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (((pred - target) ** 2) * torch.from_numpy(FIELD_WEIGHTS)).mean() / float(FIELD_WEIGHTS.mean())


def _lr(step: int, total: int, peak: float) -> float:
    warm = min(1.0, (step + 1) / 100)
    return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0))))


def _save_state(path: Path, model: MotionBackbone, optimizer, step: int, extra: dict) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".pt")
    os.close(fd)
    torch.save({"model": model.state_dict(), "config": dict(model.config), "optimizer": optimizer.state_dict(),
                "step": step, **extra}, tmp)
    os.replace(tmp, path)


def _resume(state_path: Path | None, phase: str, model: MotionBackbone, optimizer, log) -> tuple[int, list[float]]:
    """(first step, loss curve so far): from `state_path` when it holds this phase's state, else (0, [])."""
    if state_path is None or not state_path.is_file():
        return 0, []
    state = torch.load(state_path, weights_only=False)
    if state.get("phase") != phase:
        return 0, []
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log(f"{phase}: resumed at step {state['step']}")
    return state["step"], state.get("losses", [])


def _optimise(model: MotionBackbone, optimizer, loss: torch.Tensor, lr: float) -> float:
    """One clipped AdamW step at `lr`; the loss as a float."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


def _progress(phase: str, step: int, cfg: TrainConfig, losses: list[float], began: float, log, state_path,
              model: MotionBackbone, optimizer) -> None:
    """The log line every `log_every` steps and the resumable state every 500."""
    if (step + 1) % cfg.log_every == 0:
        recent = float(np.mean(losses[-cfg.log_every:]))
        log(f"{phase} step {step + 1}/{cfg.steps} loss {recent:.4f} ({time.perf_counter() - began:.0f} s)")
    if state_path is not None and (step + 1) % 500 == 0:
        _save_state(state_path, model, optimizer, step + 1, {"phase": phase, "losses": losses})


def _next_batch(sampler, step: int, cfg) -> dict:
    """A batch of windows of a random length (1..max_window); the augmented clips are re-drawn every refresh_every."""
    if step and step % cfg.refresh_every == 0:
        sampler.refresh()
    frames = int(sampler.rng.integers(1, cfg.max_window + 1))
    return sampler.sample(cfg.batch, frames, cfg)


def train_teacher(model: MotionBackbone, sampler: WindowSampler, cfg: TrainConfig,
                  state_path: Path | None = None, log: Callable[[str], None] = print) -> list[float]:
    """Flow-matching training; resumes from `state_path` when it holds a teacher state. Returns the loss curve."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    start, losses = _resume(state_path, "teacher", model, optimizer, log)
    model.train()
    generator = torch.Generator().manual_seed(cfg.seed)
    began = time.perf_counter()
    for step in range(start, cfg.steps):
        b = _next_batch(sampler, step, cfg)
        # density 2t: few-step sampling only visits t = 1 and 0.5, where the audio matters most
        t = torch.rand(cfg.batch, generator=generator).sqrt()
        noise = torch.randn(b["x0"].shape, generator=generator)
        x_t = (1 - t[:, None, None]) * b["x0"] + t[:, None, None] * noise
        pred = model(x_t, t, b["audio"], b["reference"], b["previous"], b["speaking"],
                     audio_keep=b["audio_keep"], previous_keep=b["previous_keep"])
        loss = weighted_mse(pred, b["x0"])
        losses.append(_optimise(model, optimizer, loss, _lr(step, cfg.steps, cfg.lr)))
        _progress("teacher", step, cfg, losses, began, log, state_path, model, optimizer)
    model.eval()
    return losses


def teacher_targets(teacher: MotionBackbone, batch: dict, noise: torch.Tensor, guidance: float,
                    steps: int) -> torch.Tensor:
    """The teacher's guided ODE solution (normalised x0) from `noise`, for the window in `batch`."""
    sampler = MotionGenerator(teacher, guidance=guidance)
    times = torch.linspace(1.0, 0.0, steps + 1)
    x = noise
    keep = batch["previous_keep"]
    with torch.no_grad():
        for i in range(steps):
            t = times[i].expand(len(x))
            x0 = sampler._x0(x, t, batch["audio"], batch["reference"], batch["previous"], batch["speaking"], keep)
            x = x0 + (times[i + 1] / times[i]) * (x - x0)
    return x


def distill(teacher: MotionBackbone, sampler: WindowSampler, cfg: TrainConfig, guidance: float = 2.0,
            teacher_steps: int = 8, state_path: Path | None = None,
            log: Callable[[str], None] = print) -> tuple[MotionBackbone, list[float]]:
    """An ODE-trajectory student with guidance folded in: from noise (t = 1) or from the 2-step sampler's midpoint
    (t = 0.5: half the teacher's answer, half the same noise) it predicts the teacher's guided solution, so it
    samples in 1 or 2 steps and keeps the teacher's seed-to-seed variation (blinks, head) for the same audio."""
    config = dict(teacher.config)
    config["guidance"] = 1.0
    student = MotionBackbone.from_config(config)
    student.load_state_dict(teacher.state_dict())
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr * 0.5, weight_decay=0.01)
    start, losses = _resume(state_path, "student", student, optimizer, log)
    teacher.eval()
    student.train()
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    began = time.perf_counter()
    for step in range(start, cfg.steps):
        b = _next_batch(sampler, step, cfg)
        b["audio_keep"] = torch.ones(cfg.batch, dtype=torch.bool)
        noise = torch.randn(b["x0"].shape, generator=generator)
        target = teacher_targets(teacher, b, noise, guidance, teacher_steps)
        half = torch.rand(cfg.batch, generator=generator) < 0.5
        t = torch.where(half, 0.5, 1.0)
        x_t = torch.where(half[:, None, None], 0.5 * target + 0.5 * noise, noise)
        pred = student(x_t, t, b["audio"], b["reference"], b["previous"], b["speaking"],
                       previous_keep=b["previous_keep"])
        loss = weighted_mse(pred, target)
        losses.append(_optimise(student, optimizer, loss, _lr(step, cfg.steps, cfg.lr * 0.5)))
        _progress("student", step, cfg, losses, began, log, state_path, student, optimizer)
    student.eval()
    return student, losses


def write_summary(path: Path, summary: dict) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(summary, handle, indent=1, sort_keys=True)
    os.replace(tmp, path)




def load_training_clips(cache: Path, count: int, nonspeech: int, augmented: int, seed: int,
                        log: Callable[[str], None] = print) -> list[MotionClip]:
    """`count` train-split corpus clips, `augmented` clips from `avatar.data.augment` (real-voice widening; both
    cached as npz files in `cache`) and `nonspeech` closed-mouth clips."""
    from avatar.motion.data import augmented_clips, build_cache, load_clips, nonspeech_clip, save_clips

    path = cache / f"train-{count}.npz"
    if not path.is_file():
        log(f"data: generating {count} corpus clips into {path}")
        build_cache(path, "train", count, log=log)
    clips = load_clips(path)[:count]
    if augmented:
        aug_path = cache / f"aug-{augmented}.npz"
        if not aug_path.is_file():
            log(f"data: generating {augmented} augmented clips into {aug_path}")
            save_clips(aug_path, augmented_clips(augmented, log=log))
        clips += load_clips(aug_path)
    clips += [nonspeech_clip(seed, i) for i in range(nonspeech)]
    return clips


def training_references(cache: Path, log: Callable[[str], None] = print) -> np.ndarray | None:
    """Reference embeddings of the training identities (measured like a photo's), cached; None if the photo
    analysis is unavailable."""
    from avatar.data.corpus import is_heldout_identity
    from avatar.data.face import identity_for
    from avatar.motion.data import TRAIN_IDENTITIES, TRAIN_SEED
    from avatar.motion.evaluate import corpus_reference

    path = cache / f"references-{TRAIN_SEED}.npy"
    if path.is_file():
        return np.load(path)
    try:
        refs = np.stack([corpus_reference(identity_for(TRAIN_SEED, i)) for i in range(TRAIN_IDENTITIES)
                         if not is_heldout_identity(i, TRAIN_IDENTITIES)])
    except Exception as exc:  # the photo analysis may be missing or fail on a face: train without references
        log(f"references: unavailable ({exc.__class__.__name__}: {exc}); training with zeros")
        return None
    if not refs.any():
        return None
    np.save(path, refs)
    return refs


def run_training(out: Path, steps: int = 4000, distill_steps: int = 2000, clips: int = 600, augmented: int = 800,
                 seed: int = 0,
                 guidance: float = 2.0, cache: Path | None = None, width: int = 96, layers: int = 4,
                 batch: int = 64, teacher_steps: int = 4, nonspeech: int | None = None, pose_leak: float = 0.05,
                 log: Callable[[str], None] = print) -> dict:
    """Train the teacher (saved in out/teacher), distil the 1-2 step student (saved in `out`: config.json +
    safetensors). Resumable: rerun with the same `out` and it continues from out/train-state-*.pt."""
    from avatar.motion.checkpoint import load_backbone, save_backbone

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    cache = cache or out
    began = time.perf_counter()
    data = load_training_clips(cache, clips, nonspeech if nonspeech is not None else max(clips // 5, 6), augmented,
                               seed, log)
    for clip in data:  # pauses between utterances: closed, not the nearest phoneme's shape (see fill_silences)
        clip.motion = corrected_motion(clip)
    sampler = WindowSampler(data, motion_frames=4, references=training_references(cache, log), seed=seed)
    log(f"data: {len(data)} clips, {len(sampler.motion)} frames")
    teacher_dir = out / "teacher"
    if (teacher_dir / "config.json").is_file():
        teacher = load_backbone(teacher_dir)
        log("teacher: loaded the finished teacher")
        teacher_losses: list[float] = []
    else:
        teacher = MotionBackbone(width=width, layers=layers, heads=4, motion_frames=4)
        cfg = TrainConfig(steps=steps, batch=batch, seed=seed)
        teacher_losses = train_teacher(teacher, sampler, cfg, out / "train-state-teacher.pt", log)
        teacher.register_to_config(guidance=guidance)
        save_backbone(teacher, teacher_dir)
    teacher_seconds = time.perf_counter() - began
    cfg = TrainConfig(steps=distill_steps, batch=batch, seed=seed)
    student, student_losses = distill(teacher, sampler, cfg, guidance, teacher_steps, out / "train-state-student.pt",
                                      log)
    student.register_to_config(pose_leak=pose_leak)
    save_backbone(student, out)
    summary = {"clips": len(data), "corpus_clips": clips, "augmented_clips": augmented,
               "nonspeech_clips": len(data) - clips - augmented, "frames": int(len(sampler.motion)),
               "teacher_steps": steps, "distill_steps": distill_steps, "guidance": guidance,
               "distill_teacher_steps": teacher_steps, "batch": batch, "seed": seed, "pose_leak": pose_leak,
               "teacher_loss_end": float(np.mean(teacher_losses[-100:])) if teacher_losses else None,
               "student_loss_end": float(np.mean(student_losses[-100:])) if student_losses else None,
               "teacher_seconds": round(teacher_seconds, 1),
               "total_seconds": round(time.perf_counter() - began, 1), "threads": torch.get_num_threads()}
    write_summary(out / "training.json", summary)
    log(f"done: {summary}")
    return summary
