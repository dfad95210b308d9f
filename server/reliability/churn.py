"""`emote churn`: many short WHIP sessions against `emote serve`, one after another and in parallel bursts, a share
of them vanishing without a DELETE. It reports whether every session streamed and was freed, and the
server's memory (its process tree's RSS and PSS, from `/metrics`) after the warm-up and at the end."""
from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from avatar.errors import EmoteError

from .peer import WhipError, WhipPeer, open_session
from .relay import Impairment, RelayRoute, strip_candidates

IDLE_TIMEOUT_S = 60.0  # for the server to free every session after the last one left (vanished ones included)
RETRY_LIMIT_S = 60.0  # how long one session keeps retrying a 429/503 before the run gives up
RELEASE_SETTLE_S = 2.0  # the server frees a closed session's memory 0.5 s after the close (server/sessions.py)
GROWTH_TARGET_MB = 15.0  # issue 32: RSS at the end <= RSS after the warm-up + 15 MB (200 sessions)
MEMORY_SAMPLE_EVERY = 25  # sessions
GONE = Impairment(blackouts=((0.0, float("inf")),))


@dataclass(frozen=True)
class ChurnPlan:
    sessions: int = 200
    warmup: int = 10  # the first sessions, after which the baseline memory is read
    burst: int = 4  # sessions opened at once, after every four single ones
    seconds: float = 3.0  # how long each session streams
    vanish: float = 0.25  # the share that leave without DELETE
    mode: str = "mic"
    avatar: str = "default"
    seed: int = 0

    def validate(self) -> "ChurnPlan":
        if self.sessions < 1 or not 0 <= self.warmup < self.sessions:
            raise EmoteError("--sessions must be at least 1 and --warmup below it")
        if self.burst < 1 or self.seconds <= 0 or not 0 <= self.vanish <= 1:
            raise EmoteError("--burst must be at least 1, --seconds positive and --vanish between 0 and 1")
        if self.mode not in ("mic", "presenter"):
            raise EmoteError(f"--mode must be mic or presenter, got {self.mode!r}")
        return self

    def groups(self) -> list[list[int]]:
        """Session indices by group, opened together: four single sessions, then a burst of `burst`, and again.
        The warm-up ends with a burst too, so that the baseline has seen the peak that bursts need."""
        singles = max(0, self.warmup - self.burst) if self.burst > 1 else self.warmup
        groups = [[i] for i in range(singles)]
        if singles < self.warmup:
            groups.append(list(range(singles, self.warmup)))
        start, cycle = self.warmup, 0
        while start < self.sessions:
            size = self.burst if cycle % 5 == 4 else 1
            groups.append(list(range(start, min(start + size, self.sessions))))
            start, cycle = start + size, cycle + 1
        return groups


class ServerProbe:
    """What the run reads from the server: its health (with the token: session counts) and its memory."""

    def __init__(self, base_url: str, token: str | None):
        self.client = httpx.AsyncClient(base_url=base_url, timeout=10.0,
                                        headers={"Authorization": f"Bearer {token}"} if token else {})

    async def sessions(self) -> tuple[int, int]:
        health = (await self.client.get("/healthz")).json()
        if "sessions" not in health:
            raise EmoteError("the server's /healthz does not show its sessions: pass its token (--token)")
        return health["sessions"], health.get("engine_sessions", health["sessions"])

    async def memory_mb(self) -> dict[str, float]:
        response = await self.client.get("/metrics")
        if response.status_code != 200:
            raise EmoteError(f"GET /metrics answered {response.status_code}: pass the server's token (--token)")
        found = dict(re.findall(r'^emote_process_memory_bytes\{kind="(\w+)"\} (\S+)$', response.text, re.M))
        if "rss" not in found:
            raise EmoteError("the server's /metrics has no emote_process_memory_bytes (an older server?)")
        return {kind: round(float(value) / 2**20, 1) for kind, value in found.items()}

    async def closed_by_reason(self) -> dict[str, int]:
        """Sessions the server has closed since it started, by the first word of the reason (`deleted`, `peer`...)."""
        text = (await self.client.get("/metrics")).text
        return {reason: int(float(n)) for reason, n in
                re.findall(r'^emote_sessions_closed_total\{reason="([^"]+)"\} (\S+)$', text, re.M)}

    async def wait_idle(self, timeout: float = IDLE_TIMEOUT_S) -> float:
        """Seconds until the server holds no session (raises EmoteError after `timeout`)."""
        start = time.monotonic()
        while (counts := await self.sessions()) != (0, 0):
            if time.monotonic() - start > timeout:
                raise EmoteError(f"the server still holds {counts[0]} sessions ({counts[1]} in the engine) "
                                 f"{timeout:.0f} s after the last one left")
            await asyncio.sleep(0.25)
        return time.monotonic() - start

    async def close(self) -> None:
        await self.client.aclose()


async def _open_with_retry(base_url: str, token: str | None, plan: ChurnPlan, wav: Path | None,
                           refusals: dict[int, int], route: RelayRoute | None) -> tuple[WhipPeer, object | None]:
    """Open one session (through `route`'s relay when given), waiting out 429 (rate limit) and 503 (server full) as
    a polite client does."""
    from aiortc.contrib.media import MediaPlayer

    deadline = time.monotonic() + RETRY_LIMIT_S
    relayed = {"rewrite_offer": strip_candidates, "rewrite_answer": route.rewrite_answer} if route else {}
    while True:
        player = MediaPlayer(str(wav), loop=True) if wav is not None else None
        try:
            peer = await open_session(base_url, mode=plan.mode, avatar=plan.avatar, token=token,
                                      audio_track=player.audio if player else None, **relayed)
            return peer, player
        except WhipError as exc:
            if player is not None:
                player.audio.stop()
            if exc.status not in (429, 503) or time.monotonic() > deadline:
                raise EmoteError(f"session refused: {exc} {exc.body}") from None
            refusals[exc.status] = refusals.get(exc.status, 0) + 1
            retry = exc.headers.get("retry-after") or exc.headers.get("Retry-After") or "1"
            await asyncio.sleep(min(float(retry) if retry.isdigit() else 1.0, 10.0))


async def _one_session(base_url: str, token: str | None, plan: ChurnPlan, wav: Path | None, vanish: bool,
                       refusals: dict[int, int], silent_relays: list[RelayRoute]) -> int:
    """Stream one session for `plan.seconds`; returns the number of video frames decoded.

    A vanishing peer goes silent the way a lost network or a killed tab does: its packets pass through a relay that
    then drops everything for good, so neither a DELETE nor a DTLS close reaches the server, which must notice the
    silence by itself."""
    route = RelayRoute() if vanish else None
    peer, player = await _open_with_retry(base_url, token, plan, wav, refusals, route)
    try:
        await peer.video.wait_for(1, timeout=30.0)
        await asyncio.sleep(plan.seconds)
        return len(peer.video.records)
    except TimeoutError:
        return len(peer.video.records)
    finally:
        if route is not None and route.relay is not None:
            route.relay.impair(up=GONE, down=GONE)
        await peer.close(delete=not vanish)
        if player is not None:
            player.audio.stop()
        if route is not None:
            silent_relays.append(route)  # open (and silent) until the run ends: the server gives up first


async def run_churn(base_url: str, token: str | None, plan: ChurnPlan, log=print) -> dict:
    """Run the plan against a server; returns the report (see `emote churn --help`)."""
    from .impair import speech_wav

    plan = plan.validate()
    rng = np.random.default_rng(plan.seed)
    vanishing = set(rng.choice(plan.sessions, size=round(plan.vanish * plan.sessions), replace=False).tolist())
    probe = ServerProbe(base_url, token)
    frames: list[int] = []
    refusals: dict[int, int] = {}
    silent_relays: list[RelayRoute] = []
    series: list[dict] = []
    baseline: dict[str, float] | None = None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="emote-churn-") as tmp:
        wav = (await asyncio.to_thread(speech_wav, Path(tmp) / "speech.wav"))[0] if plan.mode == "mic" else None
        try:
            await probe.wait_idle()
            closed_before = await probe.closed_by_reason()
            series.append({"sessions": 0, **await probe.memory_mb()})
            for group in plan.groups():
                frames += await asyncio.gather(*(
                    _one_session(base_url, token, plan, wav, i in vanishing, refusals, silent_relays) for i in group))
                done, before = group[-1] + 1, group[0]
                sample_due = done // MEMORY_SAMPLE_EVERY > before // MEMORY_SAMPLE_EVERY
                if done == plan.warmup or sample_due or done == plan.sessions:
                    await probe.wait_idle()
                    await asyncio.sleep(RELEASE_SETTLE_S)
                    memory = await probe.memory_mb()
                    series.append({"sessions": done, **memory})
                    if done == plan.warmup:
                        baseline = memory
                    log(f"churn: {done}/{plan.sessions} sessions, server RSS {memory['rss']:.0f} MB, "
                        f"PSS {memory.get('pss', 0):.0f} MB")
            freed_after_s = await probe.wait_idle()
            closed = {reason: n - closed_before.get(reason, 0) for reason, n in (await probe.closed_by_reason()).items()}
        finally:
            await probe.close()
            for route in silent_relays:
                route.close()
    end = series[-1]
    baseline = baseline or series[0]
    growth = round(end["rss"] - baseline["rss"], 1)
    return {
        "plan": asdict(plan),
        "sessions": len(frames),
        "streamed": sum(1 for n in frames if n > 0),
        "vanished": len(vanishing),
        "min_frames": min(frames),
        "refused_and_retried": {str(k): v for k, v in sorted(refusals.items())},
        "all_freed": True,  # wait_idle raised otherwise
        "closed_by_reason": {reason: n for reason, n in sorted(closed.items()) if n},  # "peer": noticed silence
        "freed_after_s": round(freed_after_s, 2),
        "memory_mb": {"after_warmup": baseline, "end": {k: v for k, v in end.items() if k != "sessions"},
                      "series": series},
        "rss_growth_mb": growth,
        "rss_growth_per_session_kb": round(growth * 1024 / max(1, plan.sessions - plan.warmup), 1),
        "target_mb": GROWTH_TARGET_MB,
        "met": growth <= GROWTH_TARGET_MB and all(n > 0 for n in frames),
        "seconds": round(time.monotonic() - started, 1),
    }


def run_churn_command(args: argparse.Namespace) -> int:
    from .report import log_line, run_check

    plan = ChurnPlan(sessions=args.sessions, warmup=args.warmup, burst=args.burst, seconds=args.seconds,
                     vanish=args.vanish, mode=args.mode, avatar=args.avatar, seed=args.seed).validate()
    # Room for the vanished sessions the server has not yet noticed (up to 10 s of silence each) beside a burst.
    server_args = ("--max-sessions", str(plan.burst + 4), "--session-rate-per-min", "0")
    report = run_check(args, lambda url, token: run_churn(url, token, plan, log_line), server_args)
    return 0 if report["met"] else 1
