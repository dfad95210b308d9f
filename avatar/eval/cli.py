"""`emote eval`: score a model or a rendered video against the oracle."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from avatar.cli import strength_arg
from avatar.errors import EmoteError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="score a model or a video against the oracle on held-out clips",
        description="Render held-out clips in still-head mode and score lip sync, PSNR, SSIM, drift and flicker.")
    parser.add_argument("--model", default=None,
                        help="a motion model directory (config.json) or a pixel model directory (model_index.json); "
                             "default: the bundled motion model, its motion rendered by the corpus renderer")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--strength", type=strength_arg, default=None,
                        help="warm-start strength, 1 = from pure noise (default: the model's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    parser.add_argument("--data", default=None,
                        help="corpus directory whose test split is used (default: a built-in held-out set, "
                             "generated once into $EMOTE_CACHE_DIR or ~/.cache/emote/eval-v1)")
    parser.add_argument("--clips", type=int, default=None, help="score only the first N held-out clips")
    parser.add_argument("--drift-seconds", type=float, default=120.0,
                        help="length of the long render for drift, seconds (0 skips it; minimum 20)")
    parser.add_argument("--seed", type=int, default=0, help="model sampling seed")
    parser.add_argument("--video", default=None, help="score this existing render (MP4) instead of a model")
    parser.add_argument("--clip", default=None, help="the held-out clip id the --video renders")
    parser.set_defaults(func=run_eval)

    table = subparsers.add_parser(
        "eval-table", help="compare models (teacher vs student) on held-out clips: a Markdown table and a still strip",
        description="Evaluate each --row on the same held-out clips (still-head mode) and write a Markdown table "
                    "(lip sync, PSNR/SSIM, drift, flicker, CPU fps) and a PNG strip of frames under the oracle's.")
    table.add_argument("--row", action="append", required=True, metavar="LABEL=DIR:STEPS[:GUIDANCE[:STRENGTH]]",
                       help="a model directory, its sampling steps, guidance scale (default 1) and warm-start "
                            "strength (default: the model's); repeat per row")
    table.add_argument("--data", default=None, help="corpus directory whose test split is used (default: built-in)")
    table.add_argument("--clips", type=int, default=None, help="score only the first N held-out clips")
    table.add_argument("--drift-seconds", type=float, default=120.0, help="long render for drift (0 skips it)")
    table.add_argument("--drift-for", action="append", default=None, metavar="LABEL",
                       help="rows that get the drift render (default: every row)")
    table.add_argument("--seed", type=int, default=0, help="model sampling seed")
    table.add_argument("--vae-ceiling", action="store_true",
                       help="add a row: the oracle's frames through the first row's VAE (the best any backbone can do)")
    table.add_argument("--markdown", type=Path, default=None, help="write the table here")
    table.add_argument("--strip", type=Path, default=None, help="write the still strip (PNG) here")
    table.add_argument("--json", type=Path, default=None, help="write every row's full result (JSON) here")
    table.set_defaults(func=run_eval_table)


def _check(args: argparse.Namespace) -> None:
    if args.video is None and args.clip is not None:
        raise EmoteError("--clip needs --video (the render to score)")
    if args.video is not None:
        if args.clip is None:
            raise EmoteError("--video needs --clip ID (which held-out clip the video renders)")
        if args.model is not None or args.steps is not None or args.strength is not None:
            raise EmoteError("--video scores an existing render; it cannot be combined with --model, --steps or "
                             "--strength")
        if not Path(args.video).is_file():
            raise EmoteError(f"--video {args.video}: no such file")
    if args.steps is not None and args.steps < 1:
        raise EmoteError(f"--steps must be at least 1, got {args.steps}")
    _check_clip_options(args)
    if args.model is not None and not Path(args.model).is_dir():
        raise EmoteError(f"--model {args.model}: no such directory")


def _check_clip_options(args: argparse.Namespace) -> None:
    """--clips, --drift-seconds and --data, shared by `eval` and `eval-table`."""
    if args.clips is not None and args.clips < 1:
        raise EmoteError(f"--clips must be at least 1, got {args.clips}")
    if args.drift_seconds and not 20 <= args.drift_seconds <= 3600:
        raise EmoteError(f"--drift-seconds must be 0 or between 20 and 3600, got {args.drift_seconds}")
    if args.data is not None and not (Path(args.data) / "index.json").is_file():
        raise EmoteError(f"--data {args.data}: not a corpus directory (no index.json); write one with emote corpus")


def _user_error(exc: Exception) -> EmoteError:
    """An error from reading data or writing results, as the one-line EmoteError the CLI reports (exit 2)."""
    if isinstance(exc, EmoteError):
        return exc
    return EmoteError(str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)


def _summary(result: dict) -> str:
    sync = result["lip_sync"]
    drift = "n/a" if result.get("drift") is None else f"{result['drift']:.2f}"
    return (f"lip sync r {sync['r']:.3f} (vs oracle parameter {sync['r_param']:.3f}), offset {sync['offset_frames']} "
            f"frames | PSNR {result['psnr']:.2f} dB | SSIM {result['ssim']:.4f} | drift {drift} | "
            f"flicker {result['flicker']:.3f} | {result['clips']} clips, {result['frames']} frames")


def _motion_summary(result: dict) -> str:
    sync, motion = result["lip_sync"], result["motion"]
    return (f"motion model, {result['steps']} step(s): pixel lip sync r {sync['r']:.3f} (vs oracle parameter "
            f"{sync['r_param']:.3f}), offset {sync['offset_frames']} frames | mouth r {motion['mouth_r']:.3f}, "
            f"offset {motion['mouth_offset_frames']} | amplitude {motion['amplitude_ratio']:.2f} | bilabials closed "
            f"{motion['bilabial_closure']:.0%} | silence {motion['silence_open_ratio']:.0%} of speech | seam jerk "
            f"{motion['seam_jerk_ratio']:.2f} | {motion['cost_ms_per_25_frames']:.1f} ms / 25 frames | "
            f"{result['clips']} clips, {result['frames']} frames")


def run_motion_eval(args: argparse.Namespace) -> int:
    """`emote eval` without --model (or with a motion model's directory): the motion model on the held-out clips."""
    if args.strength is not None:
        raise EmoteError("--strength applies to the pixel model; add --model DIR")
    from avatar.eval import evaluate
    from avatar.motion.evaluate import evaluate_motion_model

    log = (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        clips = evaluate.load_eval_clips(args.data, args.clips, log=log)
        if not clips:
            raise EmoteError("the corpus has no held-out (test) clips; write more hours or identities")
        model = str(args.model) if args.model is not None else None
        result = evaluate_motion_model(model, args.steps or 1, clips, args.seed, log)
    except (FileNotFoundError, ValueError) as exc:
        raise _user_error(exc) from None
    print(json.dumps(result, sort_keys=True) if args.json else _motion_summary(result))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    _check(args)
    model = Path(args.model) if args.model is not None else None
    motion_dir = model is not None and (model / "config.json").is_file() and not (model / "model_index.json").is_file()
    if args.video is None and (args.model is None or motion_dir):
        return run_motion_eval(args)
    from avatar.eval import evaluate

    log = (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        if args.video is not None:
            from avatar.data.corpus import decode_video

            try:
                clip = evaluate.find_clip(args.data, args.clip)
            except KeyError:
                raise EmoteError(f"--clip {args.clip}: not a clip of the evaluation set") from None
            try:
                frames = decode_video(args.video)
            except Exception as exc:  # PyAV raises many types for unreadable files
                raise EmoteError(f"--video {args.video}: cannot decode ({exc.__class__.__name__})") from None
            try:
                result = evaluate.evaluate_video(frames, clip)
            except ValueError as exc:
                raise EmoteError(f"--video {args.video}: {exc}") from None
        else:
            clips = evaluate.load_eval_clips(args.data, args.clips, log=log)
            if not clips:
                raise EmoteError("the corpus has no held-out (test) clips; write more hours or identities")
            result = evaluate.evaluate_model(args.model, args.steps, clips, args.drift_seconds, args.seed, log,
                                                 strength=args.strength)
    except (FileNotFoundError, ValueError) as exc:
        raise _user_error(exc) from None
    print(json.dumps(result, sort_keys=True) if args.json else _summary(result))
    if not args.json and len(result["per_clip"]) > 1:
        for clip in result["per_clip"]:
            traits = "".join(f", {t}" for t in clip["traits"])
            print(f"  {clip['clip']} (identity {clip['identity']}{traits}): lip sync r {clip['r']:.3f} | "
                  f"PSNR {clip['psnr']:.2f} dB | {clip['frames']} frames")
    return 0


def run_eval_table(args: argparse.Namespace) -> int:
    from avatar.eval.compare import Row, check_row

    rows = [Row.parse(text) for text in args.row]
    labels = [row.label for row in rows]
    if len(set(labels)) != len(labels):
        raise EmoteError("--row labels must be distinct")
    for row in rows:
        if not Path(row.model_dir).is_dir():
            raise EmoteError(f"--row {row.label}: no such model directory {row.model_dir}")
    drift_for = set(args.drift_for or labels)
    if drift_for - set(labels):
        raise EmoteError(f"--drift-for names no row: {', '.join(sorted(drift_for - set(labels)))}")
    _check_clip_options(args)
    for flag, path in (("--markdown", args.markdown), ("--strip", args.strip), ("--json", args.json)):
        if path is None:
            continue
        if path.is_dir():
            raise EmoteError(f"{flag} {path}: is a directory, not a file")
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise EmoteError(f"{flag} {path}: the directory {path.parent} does not exist or is not writable")
    for row in rows:
        check_row(row)

    import io

    from PIL import Image

    from avatar.data.corpus import atomic_write
    from avatar.eval import evaluate
    from avatar.eval.compare import compare, markdown_table

    log = (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        clips = evaluate.load_eval_clips(args.data, args.clips, log=log)
        if not clips:
            raise EmoteError("the corpus has no held-out (test) clips; write more hours or identities")
        drift = {label: args.drift_seconds if label in drift_for else 0.0 for label in labels}
        results, strip = compare(rows, clips, drift, args.seed, log, with_vae_ceiling=args.vae_ceiling)
        table = markdown_table(results)
        if args.markdown is not None:
            atomic_write(args.markdown, table.encode())
        if args.strip is not None:
            buffer = io.BytesIO()
            Image.fromarray(strip).save(buffer, format="PNG")
            atomic_write(args.strip, buffer.getvalue())
        if args.json is not None:
            atomic_write(args.json, (json.dumps(results, indent=1, sort_keys=True) + "\n").encode())
    except (OSError, ValueError, KeyError) as exc:
        raise _user_error(exc) from None
    print(table, end="")
    return 0
