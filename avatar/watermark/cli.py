"""`emote detect FILE...`: one JSON line per file saying whether it carries the emote-live watermark."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from avatar.errors import EmoteError


def register(subparsers) -> None:
    detect = subparsers.add_parser(
        "detect", help="check PNG/JPEG/MP4/WebM files for the emote-live watermark; one JSON line per file")
    detect.add_argument("files", type=Path, nargs="+", metavar="FILE")
    detect.set_defaults(func=run_detect)


def run_detect(args: argparse.Namespace) -> int:
    from .detect import detect_file

    for path in args.files:
        result = detect_file(path)  # EmoteError on an unreadable file: exit 2 with one line
        print(json.dumps({"file": str(path), **result}), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m avatar.watermark.cli FILE...`, the same as `emote detect` once server/cli.py registers it."""
    parser = argparse.ArgumentParser(prog="emote")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["detect", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except EmoteError as exc:
        sys.stderr.write(f"emote detect: error: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
