"""`emote corpus`: write the synthetic talking-face corpus."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from avatar.errors import EmoteError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "corpus", help="write a synthetic talking-face corpus",
        description="Write procedurally drawn faces speaking espeak-ng speech and singing, with oracle parameters.")
    parser.add_argument("--out", required=True, help="output directory (created; must be empty or a corpus)")
    parser.add_argument("--identities", type=int, default=100, help="number of distinct faces (default 100)")
    parser.add_argument("--hours", type=float, default=1.0, help="total duration to write, in hours (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical bytes")
    parser.add_argument("--size", type=int, default=128, help="frame size in pixels, square (default 128)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes to use (default: CPU count, at most 8); output does not depend on it")
    parser.set_defaults(func=run_corpus)


def run_corpus(args: argparse.Namespace) -> int:
    if args.identities < 1:
        raise EmoteError(f"--identities must be at least 1, got {args.identities}")
    if not args.hours > 0 or args.hours > 10000:
        raise EmoteError(f"--hours must be a positive number of hours, got {args.hours}")
    if not 16 <= args.size <= 1024:
        raise EmoteError(f"--size must be between 16 and 1024 pixels, got {args.size}")
    if args.seed < 0:
        raise EmoteError(f"--seed must be non-negative, got {args.seed}")
    workers = args.workers if args.workers is not None else min(os.cpu_count() or 1, 8)
    if workers < 1:
        raise EmoteError(f"--workers must be at least 1, got {workers}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EmoteError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "index.json").is_file():
        raise EmoteError(f"--out {out} is not empty and is not a corpus; choose an empty directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmoteError(f"cannot create --out {out}: {exc.strerror}") from exc

    from avatar.data.corpus import write_corpus

    index = write_corpus(out, identities=args.identities, hours=args.hours, seed=args.seed, size=args.size,
                         workers=workers)
    minutes = index["total_frames"] / index["fps"] / 60
    print(f"wrote {len(index['clips'])} clips ({minutes:.1f} min, {index['total_bytes'] / 1e6:.1f} MB) to {out}; "
          f"held-out identities {index['heldout_identities']}, {len(index['splits']['test'])} test clips")
    return 0
