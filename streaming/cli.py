"""`emote bench --streaming`: options and handler; composed into `emote bench` by server/cli.py."""
from __future__ import annotations

import argparse
import json

from avatar.errors import EmoteError

MAX_SESSIONS = 256


def add_bench_options(parser: argparse.ArgumentParser) -> None:
    """Streaming options of `emote bench`; the model options (--preset, --model, --device, --steps, --strength,
    --json) come from avatar.cli.add_bench_options."""
    parser.add_argument("--streaming", action="store_true", help="benchmark live sessions end to end")
    parser.add_argument("--sessions", type=int, default=1, help="concurrent sessions (with --streaming)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of speech per session (with --streaming)")
    parser.add_argument("--window-frames", type=int, default=None, help="new frames per window (default: low latency)")
    parser.add_argument("--context-lookahead", type=int, default=0, help="future audio-context frames to wait for")
    parser.add_argument("--refine", action="store_true",
                        help="decode through the model's portrait refiner (live sessions skip it by default)")


def run_bench(args: argparse.Namespace) -> int:
    import asyncio

    from avatar.cli import load_pipeline

    from .bench import bench_streaming
    from .config import StreamConfig

    if args.compile is not None:
        raise EmoteError("--compile times the model alone; the live engine runs it eagerly (drop --streaming)")
    if not 1 <= args.sessions <= MAX_SESSIONS:
        raise EmoteError(f"--sessions must be between 1 and {MAX_SESSIONS}, got {args.sessions}")
    if not 0 < args.seconds <= 3600:
        raise EmoteError(f"--seconds must be in (0, 3600], got {args.seconds}")
    if args.window_frames is not None and args.window_frames < 1:
        raise EmoteError(f"--window-frames must be at least 1, got {args.window_frames}")
    pipe = load_pipeline(args.model, args.device, args.dtype, preset=args.preset)
    config = StreamConfig(steps=args.steps, strength=args.strength, frames_per_window=args.window_frames,
                          context_lookahead_frames=args.context_lookahead, refine=args.refine)
    config.resolve(pipe.config)  # bad values -> EmoteError before anything starts
    result = asyncio.run(bench_streaming(pipe, args.sessions, args.seconds, config))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0
