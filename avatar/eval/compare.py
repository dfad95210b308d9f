"""Teacher against student: the oracle metrics and CPU speed of several (model, steps) rows on the same held-out
clips, as a Markdown table, plus a still strip (PNG) with one row of frames per model under the oracle's row.

`emote eval-table --row teacher=DIR:25:2 --row student=DIR:1 ...` (label=DIR:STEPS[:GUIDANCE]).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from avatar.data.motion import SAMPLE_RATE
from avatar.errors import EmoteError
from avatar.eval.evaluate import EvalClip, OracleView, evaluate_renderer
from avatar.eval.mouth import mouth_opening

STRIP_FRAMES = 8
STRIP_LABEL_WIDTH = 8  # pixels per label character (PIL's default bitmap font is 6 wide)


@dataclass(frozen=True)
class Row:
    label: str
    model_dir: str
    steps: int
    guidance: float = 1.0
    strength: float | None = None  # warm-start strength; None: the model's

    @classmethod
    def parse(cls, text: str) -> "Row":
        """label=DIR:STEPS[:GUIDANCE[:STRENGTH]]"""
        label, sep, rest = text.partition("=")
        fields = rest.split(":")
        if not sep or not label or len(fields) < 2:
            raise EmoteError(f"--row {text!r}: expected label=DIR:STEPS[:GUIDANCE[:STRENGTH]]")
        # DIR may hold colons: the numbers are the trailing numeric fields (at most three), DIR is the rest
        count = 0
        while count < 3 and count < len(fields) - 1 and _is_number(fields[-1 - count]):
            count += 1
        numbers = fields[len(fields) - max(count, 1):]
        model_dir = ":".join(fields[: len(fields) - len(numbers)])
        try:
            steps = int(numbers[0])
            guidance = float(numbers[1]) if len(numbers) > 1 else 1.0
            strength = float(numbers[2]) if len(numbers) > 2 else None
        except ValueError:
            raise EmoteError(f"--row {text!r}: STEPS must be an integer, GUIDANCE and STRENGTH numbers") from None
        if not model_dir:
            raise EmoteError(f"--row {text!r}: DIR is empty")
        if steps < 1 or not math.isfinite(guidance) or guidance < 1:
            raise EmoteError(f"--row {text!r}: STEPS must be at least 1 and GUIDANCE a finite number of at least 1")
        if strength is not None and not 0 < strength <= 1:
            raise EmoteError(f"--row {text!r}: STRENGTH must be in (0, 1]")
        return cls(label, model_dir, steps, guidance, strength)


def check_row(row: Row) -> None:
    """Read the row's model config and sampler (not its weights), so that a bad STEPS/STRENGTH fails before any row
    is evaluated."""
    from avatar.checkpoint import load_scheduler, read_index
    from avatar.config import ModelConfig
    from avatar.schedulers import fresh_scheduler

    try:
        cfg = ModelConfig.from_dict(read_index(row.model_dir)["model"])
        scheduler = load_scheduler(row.model_dir, cfg)
        fresh_scheduler(scheduler, row.steps, strength=cfg.strength if row.strength is None else row.strength)
    except EmoteError as exc:
        raise EmoteError(f"--row {row.label}: {exc}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def strip_indices(clip: EvalClip, count: int = STRIP_FRAMES) -> np.ndarray:
    """Frames spread over the clip's speech that show the widest range of mouth openings (sorted by time)."""
    opening = clip.spec.column("mouth_open")
    n = len(opening)
    segments = np.array_split(np.arange(n), count)
    picks = [int(seg[np.argmax(opening[seg])]) if i % 2 == 0 else int(seg[np.argmin(opening[seg])])
             for i, seg in enumerate(segments) if len(seg)]
    return np.array(sorted(set(picks)))


def evaluate_row(row: Row, clips: list[EvalClip], drift_seconds: float, seed: int = 0,
                 log: Callable[[str], None] | None = None) -> tuple[dict, np.ndarray]:
    """Metrics and CPU fps of one row; also the frames it rendered for the first clip (for the strip)."""
    from avatar.pipeline import AvatarPipeline

    pipe = AvatarPipeline.from_pretrained(row.model_dir, device="cpu")
    strength = pipe.config.strength if row.strength is None else row.strength
    renders: list[tuple[np.ndarray, float]] = []  # (frames, seconds) per call: the clips first, then the drift

    def render(portrait: np.ndarray, audio: np.ndarray):
        start = time.perf_counter()
        frames = np.stack(list(pipe.render(portrait, audio, sample_rate=SAMPLE_RATE, steps=row.steps, seed=seed,
                                           speed=0.0, guidance_scale=row.guidance, strength=strength)))
        renders.append((frames, time.perf_counter() - start))
        return frames

    result = evaluate_renderer(render, int(pipe.resolution), clips, drift_seconds, log)
    clip_renders = renders[: len(clips)]  # fps of the clips alone, so that rows with and without drift compare
    fps = sum(len(f) for f, _ in clip_renders) / max(sum(s for _, s in clip_renders), 1e-9)
    result.update(label=row.label, model=row.model_dir, steps=row.steps, guidance=row.guidance, strength=strength,
                  resolution=int(pipe.resolution), cpu_fps=fps, sampler=pipe.config.sampler)
    return result, renders[0][0]


def vae_ceiling(model_dir: str, clips: list[EvalClip]) -> dict:
    """The oracle's own frames through the model's VAE encoder and its decoder (the PortraitRefiner, reading the
    neutral portrait, if the model has one) and scored: the best any backbone on this autoencoder can reach."""
    import torch

    from avatar import vae as vae_ops
    from avatar.eval.evaluate import score_clips
    from avatar.pipeline import AvatarPipeline

    pipe = AvatarPipeline.from_pretrained(model_dir, device="cpu")
    oracles = [OracleView.of(clip, int(pipe.resolution)) for clip in clips]
    decoded = []
    with torch.no_grad():
        for oracle, clip in zip(oracles, clips):
            latents = vae_ops.encode(pipe.vae, vae_ops.from_uint8(torch.from_numpy(oracle.frames)))
            audio = pipe.audio_windows(pipe.encode_audio(clip.spec.audio, SAMPLE_RATE))[: len(latents)]
            decoded.append(pipe.decode(latents, pipe.prepare_reference(oracle.neutral), audio=audio))
    result = score_clips(decoded, oracles, clips)
    result.update(label="VAE only (oracle frames)", model=model_dir, steps=0, guidance=0.0, sampler="-",
                  resolution=int(pipe.resolution), cpu_fps=None, drift=None)
    return result


def strip_image(rows: list[tuple[str, np.ndarray]], indices: np.ndarray) -> np.ndarray:
    """A grid: one labelled row of frames per entry of `rows` (label, frames [N, S, S, 3]), all at the first row's
    size; a label column of STRIP_LABEL_WIDTH pixels per character."""
    from PIL import Image, ImageDraw

    size = rows[0][1].shape[1]
    label_width = label_column_width([label for label, _ in rows])
    grid = Image.new("RGB", (label_width + size * len(indices), size * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, frames) in enumerate(rows):
        draw.text((6, r * size + size // 2 - 6), label, fill="black")
        for c, index in enumerate(indices):
            frame = Image.fromarray(frames[min(int(index), len(frames) - 1)])
            if frame.size != (size, size):
                frame = frame.resize((size, size), Image.Resampling.LANCZOS)
            grid.paste(frame, (label_width + c * size, r * size))
    return np.asarray(grid)


def label_column_width(labels: list[str]) -> int:
    return STRIP_LABEL_WIDTH * max(len(label) for label in labels) + 12


def markdown_table(results: list[dict]) -> str:
    head = ("| model | sampler | steps | guidance | strength | lip-sync r | offset (frames) | PSNR (dB) | SSIM | drift "
            "| flicker | CPU fps |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in results:
        drift = "n/a" if r.get("drift") is None else f"{r['drift']:.2f} ({r['drift_seconds']:.0f} s)"
        steps = r["steps"] or "-"
        guidance = f"{r['guidance']:g}" if r["guidance"] else "-"
        strength = f"{r['strength']:g}" if r.get("strength") else "-"
        fps = "-" if r["cpu_fps"] is None else f"{r['cpu_fps']:.1f}"
        lines.append(
            f"| {r['label']} | {r['sampler']} | {steps} | {guidance} | {strength} | {r['lip_sync']['r']:.3f} | "
            f"{r['lip_sync']['offset_frames']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {drift} | {r['flicker']:.3f} | "
            f"{fps} |")
    return head + "\n".join(lines) + "\n"


def compare(rows: list[Row], clips: list[EvalClip], drift_seconds: dict[str, float], seed: int = 0,
            log: Callable[[str], None] | None = None, with_vae_ceiling: bool = False) -> tuple[list[dict], np.ndarray]:
    """Evaluate every row on `clips` (drift_seconds per label, 0 = skip); returns the results and the strip.
    `with_vae_ceiling` adds a first row: the oracle frames through the first row's VAE."""
    log = log or (lambda line: None)
    results, strip_rows = [], []
    if with_vae_ceiling:
        log(f"eval-table: VAE ceiling ({rows[0].model_dir})")
        results.append(vae_ceiling(rows[0].model_dir, clips))
    for row in rows:
        strength = "the model's" if row.strength is None else f"{row.strength:g}"
        log(f"eval-table: {row.label} ({row.model_dir}, {row.steps} steps, guidance {row.guidance:g}, "
            f"strength {strength})")
        result, frames = evaluate_row(row, clips, drift_seconds.get(row.label, 0.0), seed, log)
        results.append(result)
        strip_rows.append((f"{row.label} ({row.steps})", frames))
    oracle = OracleView.of(clips[0], strip_rows[0][1].shape[1])
    indices = strip_indices(clips[0])
    measured = mouth_opening(oracle.frames, oracle.neutral, oracle.mouth_box)
    log(f"eval-table: strip frames {indices.tolist()} (oracle mouth measure {np.round(measured[indices], 2).tolist()})")
    return results, strip_image([("oracle", oracle.frames), *strip_rows], indices)
