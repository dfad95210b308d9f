"""The server process's memory: what it holds, measured the way the kernel sees it (native allocations included),
and the glibc settings that keep a long-running server from growing with every session it has served.

Three things kept the memory of finished sessions in the process (the RSS climbed about 1 MB a session):
- aiortc's peer connection, transports and codecs form reference cycles, so they, and the native encoder buffers
  they own, wait for the cyclic collector's next full pass. A collection after each session frees them at once; it
  is cheap because the objects made at start-up (the model, the avatars) are frozen out of the collector's way.
- glibc gives busy threads their own malloc arenas (up to 8 per core) and hands freed memory back to the kernel
  only from the top of each heap. Fewer arenas and a `malloc_trim` after each session return it.
- Long-lived, constantly renewed small objects (a deque of Python floats for latency percentiles) scattered over
  the allocator's arenas pinned them; those now live in preallocated arrays (streaming/metrics.py).
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import os
import sys
from pathlib import Path


M_ARENA_MAX = -8  # glibc's mallopt parameter number
SERVER_ARENAS = 2

MEMORY_FIELDS = {"Rss": "rss", "Pss": "pss", "Anonymous": "anonymous"}  # /proc/PID/smaps_rollup, in kB


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc; just `pid` elsewhere)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                queue.extend(int(child) for child in task.read_text().split())
            except (OSError, ValueError):
                continue
    return found


def tree_memory_bytes(pid: int | None = None) -> dict[str, int]:
    """RSS, PSS and anonymous memory of a process and its descendants, summed, in bytes. tracemalloc sees only
    Python's own allocations; this also counts native ones (libvpx, PyAV, OpenCV, torch) and what malloc keeps.
    Empty where /proc/PID/smaps_rollup does not exist."""
    totals: dict[str, int] = {}
    for member in process_tree(os.getpid() if pid is None else pid):
        try:
            lines = Path(f"/proc/{member}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.partition(":")
            if key in MEMORY_FIELDS:
                name = MEMORY_FIELDS[key]
                totals[name] = totals.get(name, 0) + int(value.split()[0]) * 1024
    return totals


def gpu_memory_bytes() -> dict[str, int]:
    """CUDA memory torch holds (allocated by tensors, reserved by its caching allocator); empty without a GPU in
    use. torch is not imported for this: a CPU-only server that never loaded it has no GPU memory to report."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"gpu_allocated": int(torch.cuda.memory_allocated()), "gpu_reserved": int(torch.cuda.memory_reserved())}


def _glibc():
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None  # musl has neither
    except OSError:
        return None


_LIBC = _glibc()


def limit_malloc_arenas(arenas: int = SERVER_ARENAS) -> bool:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX does) unless the environment already sets it. Call once,
    early, before the threads that would make new arenas start. False where this is not glibc."""
    if _LIBC is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(_LIBC.mallopt(M_ARENA_MAX, arenas))


def release_free_memory() -> None:
    """Give freed heap pages back to the kernel (glibc's malloc_trim, all arenas). Takes a few milliseconds."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def freeze_startup_objects() -> None:
    """Everything made so far (the model, the avatars, the app) lives as long as the server: move it out of the
    cyclic collector's reach, so that a full collection scans only what sessions made (microseconds, not the
    ~0.1 s that half a million start-up objects cost)."""
    gc.collect()
    gc.freeze()


async def release_session_memory() -> None:
    """After a session's teardown: free its reference cycles now, then hand the freed pages back to the kernel."""
    gc.collect()
    await asyncio.to_thread(release_free_memory)
