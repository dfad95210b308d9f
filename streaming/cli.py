"""`emote bench --streaming`: options and handler; composed into `emote bench` by server/cli.py."""
from __future__ import annotations

import argparse
import json

from avatar.errors import EmoteError

MAX_SESSIONS = 256


def add_bench_options(parser: argparse.ArgumentParser) -> None:
    """Streaming options of `emote bench`; the model options (--preset, --model, --device, --steps, --strength,
    --size, --json) come from avatar.cli.add_bench_options."""
    parser.add_argument("--streaming", action="store_true", help="benchmark live sessions end to end")
    parser.add_argument("--sessions", type=int, default=1, help="concurrent sessions (with --streaming)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of speech per session (with --streaming)")
    parser.add_argument("--window-frames", type=int, default=None, help="new frames per window (default: low latency)")
    parser.add_argument("--context-lookahead", type=int, default=None,
                        help="future audio-context frames to wait for (default: the model's)")
    parser.add_argument("--refine", action="store_true",
                        help="pixel model: decode through its portrait refiner (live sessions skip it by default)")


def run_bench(args: argparse.Namespace) -> int:
    import asyncio

    from avatar.models import load_frame_model, use_model_threads

    from avatar.watermark.model import WatermarkedModel

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
    use_model_threads(args.device)  # process-wide: once, before the model first runs
    if args.preset is not None:  # a pixel preset with random weights
        from avatar.cli import load_pipeline
        from avatar.pixel_model import PixelFrameModel

        model = PixelFrameModel(load_pipeline(None, args.device, args.dtype, preset=args.preset),
                                strength=args.strength, refine=args.refine)
    else:  # --size is the photo renderer's; the pixel model has one size
        pixel = args.model is not None and (args.model / "model_index.json").is_file()
        model = load_frame_model(args.model, args.device, strength=args.strength, refine=args.refine,
                                 dtype=args.dtype if args.dtype != "float32" else None,
                                 size=None if pixel else args.size)
    model = WatermarkedModel(model)  # as `emote serve` runs it: every frame marked
    config = StreamConfig(steps=args.steps, frames_per_window=args.window_frames,
                          context_lookahead_frames=args.context_lookahead)
    config.resolve(model.spec)  # bad values -> EmoteError before anything starts
    result = asyncio.run(bench_streaming(model, args.sessions, args.seconds, config))
    result["device"] = args.device
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0
