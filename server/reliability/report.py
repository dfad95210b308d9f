"""The JSON report of a reliability run: printed, and optionally written atomically to a file."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

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
