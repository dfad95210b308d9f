"""Running a reliability check from the command line: against `--url` or a server of its own, then the JSON report,
printed and optionally written atomically to a file."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Awaitable, Callable

import httpx

from avatar.errors import EmoteError


def write_report(report: dict, out: Path | None = None) -> None:
    text = json.dumps(report, indent=2) + "\n"
    sys.stdout.write(text)
    if out is None:
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out)
    except OSError as exc:
        raise EmoteError(f"cannot write {out}: {exc}") from exc


def machine_description() -> str:
    """The CPU model, its core count and the vector extensions that matter for speed, e.g. "Intel(R) Xeon(R)
    Processor, 2 CPUs, avx512f amx_tile"."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    extensions = " ".join(f for f in ("avx2", "avx512f", "amx_tile") if f in flags)
    return f"{model}, {os.cpu_count()} CPUs" + (f", {extensions}" if extensions else "")


def log_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_check(args: argparse.Namespace, check: Callable[[str, str | None], Awaitable[dict]],
              server_args: tuple[str, ...] = ()) -> dict:
    """`check(base_url, token)` against `args.url` (with `args.token`), or against a server started on loopback with
    `args.model` and `server_args`; the report is printed (and written to `args.out`) and returned."""
    from .local import local_server
    from .peer import WhipError

    if args.url and args.model is not None:
        raise EmoteError(f"--model is for the server `emote {args.command}` starts; drop it with --url")
    try:
        if args.url:
            report = asyncio.run(check(args.url.rstrip("/"), args.token))
        else:
            with local_server(args.model, *server_args) as (base_url, token):
                report = asyncio.run(check(base_url, token))
    except WhipError as exc:
        detail = exc.body.get("message") if isinstance(exc.body, dict) else None
        raise EmoteError(f"{exc}{': ' + detail if detail else ''}") from None
    except (httpx.HTTPError, OSError, TimeoutError) as exc:
        where = args.url or "the server it started"
        raise EmoteError(f"cannot run against {where}: {type(exc).__name__}: {exc}") from None
    write_report(report, args.out)
    return report
