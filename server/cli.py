"""The `emote` command line. Each layer registers its own subcommands; this top layer composes them.

Bad input exits with code 2 and one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from avatar.errors import EmoteError

# Modules exposing `register(subparsers)`; imported eagerly, so they must keep heavy imports inside handlers.
COMMAND_MODULES = (
    "avatar.cli",
    "avatar.data.cli",
    "avatar.eval.cli",
    "avatar.eval.photo_cli",
    "avatar.motion.cli",
    "avatar.watermark.cli",
    "avatar.train.cli",
    "server.serve",
    "server.reliability.cli",
)


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print the error alone, on one line, with exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def register_bench(subparsers) -> None:
    """`emote bench` times the model alone; `emote bench --streaming` times the streaming engine end to end."""
    from avatar.cli import add_bench_options, run_bench
    from streaming.cli import add_bench_options as add_streaming_options
    from streaming.cli import run_bench as run_streaming_bench

    def dispatch(args):
        return run_streaming_bench(args) if args.streaming else run_bench(args)

    bench = subparsers.add_parser("bench", help="benchmark the model (or, with --streaming, live sessions); JSON out")
    add_bench_options(bench)
    add_streaming_options(bench)
    bench.set_defaults(func=dispatch)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="emote", description="Real-time EMO-style portrait animation.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    register_bench(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EmoteError as exc:
        sys.stderr.write(f"emote {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
