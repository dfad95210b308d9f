"""Scoring the motion model on held-out clips: motion metrics against the corpus's exact motion, and the pixel
lip-sync measure on frames the corpus renderer draws from the predicted motion (the keys `emote eval` has always
reported).

Definitions (all on held-out identities speaking held-out sentences):
- mouth r / offset: Pearson of predicted vs true mouth_open per clip (frame-weighted), and the lag of the peak of the
  mean cross-correlation (positive: the predicted mouth is late). "True" is the corpus's mouth track recomputed with
  pauses between utterances closed (`avatar.motion.data.fill_silences`: the corpus's own track holds the nearest
  phoneme's shape through those pauses); `*_vs_corpus_track` scores against the corpus's track as stored.
- amplitude ratio: std of the predicted mouth_open over the std of the true one.
- bilabial closure: share of frames whose centre lies inside an /m b p/ phoneme with mouth_open < CLOSED.
- silence / non-speech: mean mouth_open over frames 0.2 s or more from any phoneme (or over a non-speech clip),
  divided by the mean over phoneme frames of speech.
- seam jerk ratio: mean |third difference| of the normalised motion across window boundaries over the same inside
  windows.
- seeds: mouth r between any two of 5 seeds (min), and how much blinks and head paths differ between seeds.
- head spread: std of yaw/pitch/roll per clip; `head_spread_speech_deg` the same after a 0.5 Hz high-pass (motion at
  speech rhythms, without the slow drift a short clip also counts as spread).
- long run (`long_run_stats`, a benchmark: `python -m avatar.motion.evaluate --minutes 10`): held-out clips joined
  into one long audio, first vs last minute: mean pose, mouth mean, blinks, head spread.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from avatar.motion import spec
from avatar.motion.data import MotionClip, corrected_motion, nonspeech_audio
from avatar.motion.generate import MotionGenerator, motion_for_audio

CLOSED = 0.1  # mouth_open below this counts as closed (the spec's 0..1 scale)
BILABIALS = ("m", "b", "p")
FPS = 25


def _frame_centres(n: int) -> np.ndarray:
    return (np.arange(n) + 0.5) / FPS


def phoneme_mask(clip: MotionClip, names: tuple[str, ...] | None = None, margin: float = 0.0) -> np.ndarray:
    """Frames whose centre lies within `margin` seconds of a phoneme span (of these names; silences excluded)."""
    centres = _frame_centres(len(clip.motion))
    mask = np.zeros(len(centres), bool)
    for name, start, end in clip.phonemes:
        if name.startswith("_") or name in ("|", "||"):
            continue
        if names is not None and name not in names:
            continue
        mask |= (centres >= start - margin) & (centres < end + margin)
    return mask


def blink_onsets(blink: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    above = blink >= threshold
    return np.flatnonzero(above[1:] & ~above[:-1]) + 1


def seam_jerk_ratio(motion: np.ndarray, window: int) -> float:
    """Mean |x[t+1] - 3x[t] + 3x[t-1] - x[t-2]| where the step t-1 -> t crosses a window boundary, over the rest."""
    x = spec.normalize(motion).astype(np.float64)
    if len(x) < window * 3:
        return float("nan")
    jerk = np.abs(x[3:] - 3 * x[2:-1] + 3 * x[1:-2] - x[:-3]).mean(axis=1)
    t = np.arange(2, len(x) - 1)
    at_seam = (t % window) == 0
    return float(jerk[at_seam].mean() / max(jerk[~at_seam].mean(), 1e-12))


def speech_band_spread(motion: np.ndarray, cutoff_hz: float = 0.5) -> np.ndarray:
    """Std of yaw, pitch, roll after a zero-phase 2nd-order Butterworth high-pass at `cutoff_hz`."""
    from scipy.signal import butter, sosfiltfilt

    head = [spec.INDEX[n] for n in ("yaw", "pitch", "roll")]
    if len(motion) < 16:
        return np.full(3, np.nan)
    sos = butter(2, cutoff_hz, "highpass", fs=FPS, output="sos")
    return sosfiltfilt(sos, np.asarray(motion, np.float64)[:, head], axis=0).std(axis=0)


def long_run_stats(generator: MotionGenerator, clips: list[MotionClip], reference: np.ndarray, minutes: float = 10.0,
                   steps: int = 1, seed: int = 0, window: int = 4, lookahead: int = 0) -> dict:
    """Held-out clips joined (repeated as needed) into `minutes` of audio, generated in one run: per-minute mean head
    pose (the largest |mean| of any minute) and first vs last minute statistics."""
    samples = int(minutes * 60 * 16000)
    pieces, total, i = [], 0, 0
    while total < samples:
        pieces.append(clips[i % len(clips)].audio)
        total += len(pieces[-1])
        i += 1
    began = time.perf_counter()
    motion = motion_for_audio(generator, np.concatenate(pieces)[:samples], reference, seed, steps, window, lookahead)
    seconds = time.perf_counter() - began
    minute = 60 * FPS
    spans = [motion[i:i + minute] for i in range(0, len(motion) - minute + 1, minute)]

    def stats(part: np.ndarray) -> dict:
        return {"mouth_mean": float(spec.column(part, "mouth_open").mean()),
                "blinks": int(len(blink_onsets(spec.column(part, "blink")))),
                "head_spread_speech_deg": [float(v) for v in speech_band_spread(part)],
                "mean_pose": {n: float(spec.column(part, n).mean()) for n in spec.POSE_NAMES}}

    return {"minutes": minutes, "window_frames": window, "lookahead_frames": lookahead, "seconds": seconds,
            "max_abs_minute_mean_pose": {n: float(max(abs(spec.column(p, n).mean()) for p in spans))
                                         for n in spec.POSE_NAMES},
            "first_minute": stats(spans[0]), "last_minute": stats(spans[-1])}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    from avatar.eval.metrics import pearson

    return pearson(a, b)


def motion_metrics(generator: MotionGenerator, clips: list[MotionClip], references: list[np.ndarray],
                   steps: int = 1, seed: int = 0, window: int = 4, seeds: int = 5,
                   log: Callable[[str], None] | None = None) -> tuple[dict, list[np.ndarray]]:
    """Motion metrics over held-out clips; also returns the predictions (seed `seed`) for rendering."""
    from avatar.eval.metrics import lip_sync

    log = log or (lambda line: None)
    preds = []
    for i, (clip, ref) in enumerate(zip(clips, references)):
        preds.append(motion_for_audio(generator, clip.audio, ref, seed, steps, window))
    corpus_open = [spec.column(c.motion, "mouth_open") for c in clips]
    true_open = [spec.column(corrected_motion(c), "mouth_open") for c in clips]
    pred_open = [spec.column(p, "mouth_open") for p in preds]
    sync = lip_sync(pred_open, true_open)
    sync_corpus = lip_sync(pred_open, corpus_open)
    all_true, all_pred = np.concatenate(true_open), np.concatenate(pred_open)
    speech = [phoneme_mask(c) for c in clips]
    quiet = [~phoneme_mask(c, margin=0.2) for c in clips]
    bilabial = [phoneme_mask(c, BILABIALS) for c in clips]
    speech_mean = float(np.concatenate([p[m] for p, m in zip(pred_open, speech)]).mean())
    true_speech_mean = float(np.concatenate([t[m] for t, m in zip(true_open, speech)]).mean())
    bil_pred = np.concatenate([p[m] for p, m in zip(pred_open, bilabial)])
    bil_true = np.concatenate([t[m] for t, m in zip(true_open, bilabial)])
    quiet_pred = np.concatenate([p[m] for p, m in zip(pred_open, quiet)])
    minutes_pred = sum(len(p) for p in preds) / FPS / 60
    blinks_pred = sum(len(blink_onsets(spec.column(p, "blink"))) for p in preds) / minutes_pred
    blinks_true = sum(len(blink_onsets(spec.column(c.motion, "blink"))) for c in clips) / minutes_pred
    head = [spec.INDEX[n] for n in ("yaw", "pitch", "roll")]
    spread_pred = np.mean([p[:, head].std(axis=0) for p in preds], axis=0)
    spread_true = np.mean([c.motion[:, head].std(axis=0) for c in clips], axis=0)
    band_pred = np.nanmean([speech_band_spread(p) for p in preds], axis=0)
    band_true = np.nanmean([speech_band_spread(c.motion) for c in clips], axis=0)
    result = {
        "mouth_r": sync["r"], "mouth_offset_frames": sync["offset_frames"],
        "mouth_r_pooled": _pearson(all_pred, all_true),
        "amplitude_ratio": float(all_pred.std() / max(all_true.std(), 1e-9)),
        "mouth_r_vs_corpus_track": sync_corpus["r"], "mouth_offset_vs_corpus_track": sync_corpus["offset_frames"],
        "amplitude_ratio_vs_corpus_track": float(all_pred.std() / max(np.concatenate(corpus_open).std(), 1e-9)),
        "speech_mean_open": speech_mean, "speech_mean_open_truth": true_speech_mean,
        "bilabial_closure": float((bil_pred < CLOSED).mean()) if len(bil_pred) else None,
        "bilabial_closure_truth": float((bil_true < CLOSED).mean()) if len(bil_true) else None,
        "bilabial_frames": int(len(bil_pred)),
        "silence_open_ratio": float(quiet_pred.mean() / max(speech_mean, 1e-9)),
        "blink_rate_per_min": float(blinks_pred), "blink_rate_per_min_truth": float(blinks_true),
        "head_spread_deg": dict(zip(("yaw", "pitch", "roll"), map(float, spread_pred))),
        "head_spread_deg_truth": dict(zip(("yaw", "pitch", "roll"), map(float, spread_true))),
        "head_spread_speech_deg": dict(zip(("yaw", "pitch", "roll"), map(float, band_pred))),
        "head_spread_speech_deg_truth": dict(zip(("yaw", "pitch", "roll"), map(float, band_true))),
        "seam_jerk_ratio": float(np.nanmean([seam_jerk_ratio(p, window) for p in preds])),
        "seam_jerk_ratio_truth": float(np.nanmean([seam_jerk_ratio(c.motion, window) for c in clips])),
        "window_frames": window, "steps": steps,
    }
    log("eval: motion metrics done; gain, non-speech, seeds, cost")
    result["gain"] = gain_changes(generator, clips, references, speech, speech_mean, steps, seed, window)
    result["nonspeech_open_ratio"] = nonspeech_ratios(generator, references[0], speech_mean, steps, seed, window)
    result["seeds"] = seed_variation(generator, clips[:4], references[:4], steps, seeds, window)
    result["cost_ms_per_25_frames"] = cost_per_25_frames(generator, clips[0].audio, references[0], steps, window)
    return result, preds


def gain_changes(generator, clips, references, speech, speech_mean, steps, seed, window) -> dict:
    out = {}
    for db in (-12, 12):
        opens = [spec.column(motion_for_audio(generator, c.audio * 10 ** (db / 20), r, seed, steps, window),
                             "mouth_open")[m] for c, r, m in zip(clips, references, speech)]
        out[f"{db:+d}dB_mean_open_change"] = float(np.concatenate(opens).mean() / max(speech_mean, 1e-9) - 1)
    return out


def nonspeech_ratios(generator, reference, speech_mean, steps, seed, window) -> dict:
    """Mean opening on sounds without a voice, over the held-out speech mean (seeded, 8 s each)."""
    out = {}
    rng = np.random.default_rng(90210)
    for kind in ("music", "noise", "typing", "cough", "hum"):
        audio = nonspeech_audio(rng, kind, 8.0)
        opening = spec.column(motion_for_audio(generator, audio, reference, seed, steps, window), "mouth_open")
        out[kind] = float(opening.mean() / max(speech_mean, 1e-9))
    try:  # the augmentation module's own generators too (its clips are part of training, these seeds are not)
        from avatar.data.augment import nonspeech

        for kind in ("music", "cough", "typing", "breath"):
            audio, _ = nonspeech(8 * 16000, np.random.default_rng([90210, len(kind)]), kind)
            opening = spec.column(motion_for_audio(generator, audio, reference, seed, steps, window), "mouth_open")
            out[f"augment_{kind}"] = float(opening.mean() / max(speech_mean, 1e-9))
    except ImportError:
        pass
    floor = (rng.normal(0, 1, 8 * 16000) * 10 ** (-60 / 20)).astype(np.float32)
    opening = spec.column(motion_for_audio(generator, floor, reference, seed, steps, window), "mouth_open")
    out["noise_floor_-60dBFS"] = float(opening.mean() / max(speech_mean, 1e-9))
    return out


def seed_variation(generator, clips, references, steps, seeds, window) -> dict:
    mouth_rs, yaw_rs, blink_shared, yaw_diff = [], [], [], []
    runs = [[motion_for_audio(generator, c.audio, r, s, steps, window) for c, r in zip(clips, references)]
            for s in range(seeds)]
    for a in range(seeds):
        for b in range(a + 1, seeds):
            ma = np.concatenate(runs[a])
            mb = np.concatenate(runs[b])
            mouth_rs.append(_pearson(spec.column(ma, "mouth_open"), spec.column(mb, "mouth_open")))
            yaw_rs.append(_pearson(spec.column(ma, "yaw"), spec.column(mb, "yaw")))
            yaw_diff.append(float(np.abs(spec.column(ma, "yaw") - spec.column(mb, "yaw")).mean()))
            oa, ob = blink_onsets(spec.column(ma, "blink")), blink_onsets(spec.column(mb, "blink"))
            if len(oa):
                blink_shared.append(float(np.mean([np.abs(ob - t).min() <= 2 if len(ob) else False for t in oa])))
    return {"seeds": seeds, "mouth_r_min": float(min(mouth_rs)), "mouth_r_mean": float(np.mean(mouth_rs)),
            "yaw_r_mean": float(np.mean(yaw_rs)), "yaw_mean_abs_diff_deg": float(np.mean(yaw_diff)),
            "blink_onsets_shared": float(np.mean(blink_shared)) if blink_shared else None}


def cost_per_25_frames(generator, audio, reference, steps, window, repeats: int = 3) -> float:
    """Milliseconds per 25 frames of `motion_for_audio` (audio encoding included), best of `repeats`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(repeats):
            began = time.perf_counter()
            frames = len(motion_for_audio(generator, audio, reference, 0, steps, window))
            best = min(best, (time.perf_counter() - began) / frames * 25 * 1000)
    finally:
        torch.set_num_threads(previous)
    return float(best)


def pixel_lip_sync(preds: list[np.ndarray], clips: list, size: int = 128) -> dict:
    """Render the predicted motion still-head with the corpus renderer and measure the mouth in pixels, against the
    oracle's own frames (`avatar.eval`'s measure): the keys `lip_sync.r` and `offset_frames`; `r_pauses_closed`
    against oracle frames drawn from the pause-corrected track."""
    from avatar.data.face import FaceRenderer, FaceState, states_from_array, still_head
    from avatar.eval import metrics
    from avatar.eval.mouth import mouth_opening

    measured, reference, corrected, params, per_clip = [], [], [], [], []
    for pred, clip in zip(preds, clips):
        renderer = FaceRenderer(clip.identity, size)
        neutral, box = renderer.render(FaceState()), renderer.mouth_box()
        truth = clip.spec.params[:, :spec.MOTION_DIM]
        n = min(len(pred), len(truth))
        ours = np.stack([renderer.render(still_head(s)) for s in states_from_array(pred[:n])])
        oracle = np.stack([renderer.render(still_head(s)) for s in states_from_array(truth[:n])])
        fixed = corrected_motion(eval_clip_as_motion(clip))[:n]
        closed = np.stack([renderer.render(still_head(s)) for s in states_from_array(fixed)])
        measured.append(mouth_opening(ours, neutral, box))
        reference.append(mouth_opening(oracle, neutral, box))
        corrected.append(mouth_opening(closed, neutral, box))
        params.append(truth[:n, 0])
        per_clip.append({"clip": clip.spec.clip_id, "identity": clip.spec.identity_index, "frames": n,
                         "traits": list(clip.identity.traits()), "r": metrics.pearson(measured[-1], reference[-1]),
                         "mouth_r": metrics.pearson(pred[:n, 0], truth[:n, 0])})
    sync = metrics.lip_sync(measured, reference)
    sync["r_param"] = metrics.lip_sync(measured, params)["r"]
    sync["r_pauses_closed"] = metrics.lip_sync(measured, corrected)["r"]  # oracle drawn from the corrected track
    return {"lip_sync": sync, "per_clip": per_clip, "frames": int(sum(c["frames"] for c in per_clip)),
            "render_size": size}


def eval_clip_as_motion(clip) -> MotionClip:
    """An `avatar.eval.evaluate.EvalClip` as a MotionClip."""
    return MotionClip(clip.spec.audio.astype(np.float32), clip.spec.params[:, :spec.MOTION_DIM].astype(np.float32),
                      list(clip.spec.meta.get("phonemes", [])), str(clip.spec.meta.get("kind", "speech")),
                      clip.spec.identity_index)


def corpus_reference(identity) -> np.ndarray:
    """The reference embedding of a corpus identity, measured like a photo's (zeros until the photo analysis
    module is available)."""
    try:
        from avatar.photo.analysis import analyse_portrait
    except ImportError:
        return np.zeros(spec.REFERENCE_DIM, np.float32)
    from avatar.data.face import FaceRenderer, FaceState

    frame = FaceRenderer(identity, 256).render(FaceState())
    return np.asarray(analyse_portrait(frame, size=256).reference, np.float32)


def evaluate_motion_model(model_dir: str | None, steps: int, eval_clips: list, seed: int = 0,
                          log: Callable[[str], None] | None = None, render_size: int = 128) -> dict:
    """`emote eval` for the motion model on `avatar.eval` clips (the built-in held-out set by default)."""
    from avatar.motion.checkpoint import load_backbone

    log = log or (lambda line: None)
    generator = MotionGenerator(load_backbone(model_dir))
    clips = [eval_clip_as_motion(c) for c in eval_clips]
    references = [corpus_reference(c.identity) for c in eval_clips]
    log(f"eval: motion model, {len(clips)} held-out clips, {steps} step(s)")
    motion, preds = motion_metrics(generator, clips, references, steps, seed, log=log)
    log("eval: rendering the predicted motion with the corpus renderer")
    result = pixel_lip_sync(preds, eval_clips, render_size)
    result.update(motion=motion, model=model_dir or "bundled motion model", steps=int(steps), seed=seed,
                  clips=len(clips), kind="motion")
    return result


if __name__ == "__main__":  # python -m avatar.motion.evaluate [--minutes 10] [--model DIR] [--window 4 --lookahead 0]
    import argparse
    import json

    from avatar.data.face import identity_for
    from avatar.motion.checkpoint import load_backbone
    from avatar.motion.data import TRAIN_SEED, corpus_clip

    parser = argparse.ArgumentParser(description="The long-run benchmark: held-out clips joined into one audio.")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--lookahead", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1)
    cli = parser.parse_args()
    held_out = [corpus_clip(TRAIN_SEED, i)[0] for i in range(9, 400, 10)]  # identities 9, 19, 29, 39
    print(json.dumps(long_run_stats(MotionGenerator(load_backbone(cli.model)), held_out,
                                    corpus_reference(identity_for(TRAIN_SEED, 9)), cli.minutes, cli.steps,
                                    window=cli.window, lookahead=cli.lookahead), indent=1))
