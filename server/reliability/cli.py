"""`emote` subcommands for reliability runs against a live server. Heavy imports (aiortc) stay inside handlers."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(subparsers) -> None:
    register_churn(subparsers)
    register_soak(subparsers)
    impair = subparsers.add_parser(
        "impair", help="sessions through an impaired network (loss, jitter, blackout) via a loopback UDP relay; "
                       "JSON out")
    impair.add_argument("--url", default=None, help="a running server (default: start one on loopback)")
    impair.add_argument("--token", default=os.environ.get("EMOTE_TOKEN"), help="its token (default: $EMOTE_TOKEN)")
    impair.add_argument("--model", type=Path, default=None, help="model for the server it starts (default: bundled)")
    impair.add_argument("--mode", choices=("mic", "presenter", "both"), default="both")
    impair.add_argument("--avatar", default="default")
    impair.add_argument("--warmup", type=float, default=3.0, help="seconds clean first (default 3)")
    impair.add_argument("--seconds", type=float, default=10.0, help="seconds of loss and jitter (default 10)")
    impair.add_argument("--blackout", type=float, default=3.0, help="seconds nothing passes (default 3)")
    impair.add_argument("--recovery", type=float, default=5.0, help="seconds clean after it (default 5)")
    impair.add_argument("--loss", type=float, default=0.05, help="loss probability per datagram (default 0.05)")
    impair.add_argument("--delay-ms", type=float, default=50.0, help="mean added one-way delay (default 50)")
    impair.add_argument("--jitter-ms", type=float, default=20.0, help="± uniform around the delay (default 20)")
    impair.add_argument("--seed", type=int, default=0)
    impair.add_argument("--stall-pli-ms", type=float, default=250.0,
                        help="the test peer sends a PLI after this long without a decoded frame, as browsers do "
                             "(default 250; 0: plain aiortc, which waits for missing packets instead)")
    impair.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    impair.set_defaults(func=run_impair)


def run_impair(args: argparse.Namespace) -> int:
    from .impair import run_impair as run

    return run(args)


def register_churn(subparsers) -> None:
    churn = subparsers.add_parser(
        "churn", help="many short sessions in sequence and bursts, some vanishing without DELETE; the server's memory "
                      "after warm-up and at the end (JSON)")
    churn.add_argument("--url", default=None, help="a running server (default: start one on loopback)")
    churn.add_argument("--token", default=os.environ.get("EMOTE_TOKEN"), help="its token (default: $EMOTE_TOKEN)")
    churn.add_argument("--model", type=Path, default=None, help="model for the server it starts (default: bundled)")
    churn.add_argument("--sessions", type=int, default=200)
    churn.add_argument("--warmup", type=int, default=10, help="sessions before the baseline memory (default 10)")
    churn.add_argument("--burst", type=int, default=4, help="sessions opened at once after every four single ones (default 4)")
    churn.add_argument("--seconds", type=float, default=3.0, help="each session's length (default 3)")
    churn.add_argument("--vanish", type=float, default=0.25, help="share leaving without DELETE (default 0.25)")
    churn.add_argument("--mode", choices=("mic", "presenter"), default="mic")
    churn.add_argument("--avatar", default="default")
    churn.add_argument("--seed", type=int, default=0)
    churn.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    churn.set_defaults(func=run_churn)


def run_churn(args: argparse.Namespace) -> int:
    from .churn import run_churn_command

    return run_churn_command(args)


def register_soak(subparsers) -> None:
    soak = subparsers.add_parser(
        "soak", help="one presenter session with continuous speech for a long run: memory, frame rate, latency, "
                     "input queue and A/V offset over time (JSON)")
    soak.add_argument("--url", default=None, help="a running server (default: start one on loopback); give it a "
                                                  "--max-duration longer than the run")
    soak.add_argument("--token", default=os.environ.get("EMOTE_TOKEN"), help="its token (default: $EMOTE_TOKEN)")
    soak.add_argument("--model", type=Path, default=None, help="model for the server it starts (default: bundled)")
    soak.add_argument("--minutes", type=float, default=30.0, help="length of the run (default 30)")
    soak.add_argument("--interval", type=float, default=60.0, help="seconds between samples (default 60)")
    soak.add_argument("--avatar", default="default")
    soak.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    soak.set_defaults(func=run_soak)


def run_soak(args: argparse.Namespace) -> int:
    from .soak import run_soak_command

    return run_soak_command(args)
