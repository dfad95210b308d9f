"""`emote train-motion`: train the motion backbone on the corpus and distil it to 1-2 steps."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from avatar.errors import EmoteError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-motion", help="train the audio -> motion diffusion backbone and distil it to 1-2 steps",
        description="Generate corpus clips (no video), train the flow-matching teacher, distil a 1-2 step student "
                    "with guidance folded in, and save it (config.json + safetensors) in --out. Rerunning with the "
                    "same --out resumes.")
    parser.add_argument("--out", required=True, help="output directory (the student; the teacher in OUT/teacher)")
    parser.add_argument("--steps", type=int, default=4000, help="teacher training steps (default 4000)")
    parser.add_argument("--distill-steps", type=int, default=2000, help="distillation steps (default 2000)")
    parser.add_argument("--clips", type=int, default=600, help="corpus clips to train on (default 600)")
    parser.add_argument("--augmented", type=int, default=800,
                        help="extra clips from avatar.data.augment: other voices, rooms, Opus (default 800)")
    parser.add_argument("--nonspeech", type=int, default=None,
                        help="closed-mouth clips of music, hum, noise, typing, coughs (default: --clips / 5)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--guidance", type=float, default=2.0, help="audio guidance folded into the student")
    parser.add_argument("--batch", type=int, default=64, help="windows per batch (default 64)")
    parser.add_argument("--pose-leak", type=float, default=0.05,
                        help="share of the carried head pose pulled back to rest per window (default 0.05)")
    parser.add_argument("--cache", default=None, help="where the clip cache (npz) goes (default: --out)")
    parser.set_defaults(func=run_train_motion)


def run_train_motion(args: argparse.Namespace) -> int:
    for flag, value, low in (("--steps", args.steps, 1), ("--distill-steps", args.distill_steps, 0),
                             ("--clips", args.clips, 2), ("--batch", args.batch, 1),
                             ("--augmented", args.augmented, 0), ("--nonspeech", args.nonspeech or 0, 0)):
        if value < low:
            raise EmoteError(f"{flag} must be at least {low}, got {value}")
    if not 0.0 <= args.pose_leak < 1.0:
        raise EmoteError(f"--pose-leak must be in [0, 1), got {args.pose_leak}")
    if not 1.0 <= args.guidance <= 10.0:
        raise EmoteError(f"--guidance must be between 1 and 10, got {args.guidance}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EmoteError(f"--out {out}: exists and is not a directory")
    import torch

    from avatar.motion.train import run_training

    torch.set_num_threads(1)
    log = (lambda line: print(line, file=sys.stderr, flush=True))
    summary = run_training(out, steps=args.steps, distill_steps=args.distill_steps, clips=args.clips,
                           augmented=args.augmented, nonspeech=args.nonspeech, pose_leak=args.pose_leak,
                           seed=args.seed, guidance=args.guidance, batch=args.batch,
                           cache=Path(args.cache) if args.cache else None, log=log)
    print(f"wrote {out}: {summary['clips']} clips, teacher {summary['teacher_steps']} steps, "
          f"student {summary['distill_steps']} steps, {summary['total_seconds']:.0f} s")
    return 0
