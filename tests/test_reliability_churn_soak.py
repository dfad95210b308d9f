"""`emote churn` and `emote soak`, bounded: real aiortc peers against a real `emote serve` (the solid-colour test
model with pixel noise). Churn: sessions one after another and in bursts, a quarter vanishing without DELETE, every
one streamed and freed, the server's memory read from /metrics. Soak: a presenter session with pushed espeak-ng
speech, sampled over time. The overload case: one session more than --max-sessions gets 503 + Retry-After while the
running ones keep their frame rate."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from conftest import run_cli
from server_fixtures import make_test_model, running_server

from server.memory import tree_memory_bytes
from server.reliability.churn import ChurnPlan
from server.reliability.peer import WhipError, open_session

NOISE = 40
MAX_SESSIONS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("churn-server")
    model = make_test_model(tmp / "noisy-model", noise=NOISE)
    with running_server(tmp, "--max-sessions", str(MAX_SESSIONS), "--session-rate-per-min", "0",
                        model=model) as (base_url, _):
        yield base_url


def test_the_memory_gauge_counts_this_process():
    memory = tree_memory_bytes()
    assert memory["rss"] > 10 * 2**20 and 0 < memory["pss"] <= memory["rss"] * 1.01, memory


def test_churn_plan_mixes_singles_and_bursts_from_the_warm_up_on():
    groups = ChurnPlan(sessions=12, warmup=6, burst=3).groups()
    assert [len(g) for g in groups] == [1, 1, 1, 3, 1, 1, 1, 1, 2]
    assert [i for g in groups for i in g] == list(range(12))


def test_churn_streams_and_frees_every_session(server, capsys):
    code, out, err = run_cli(["churn", "--url", server, "--sessions", 12, "--warmup", 3, "--burst", 3,
                              "--seconds", 1, "--vanish", 0.25, "--seed", 1], capsys)
    report = json.loads(out)
    assert report["sessions"] == 12 and report["streamed"] == 12, report
    assert report["vanished"] == 3 and report["min_frames"] >= 10, report
    assert report["all_freed"] and report["freed_after_s"] < 30, report  # the vanished ones too...
    # ...which the server noticed by their silence alone: no DELETE, no DTLS close reached it.
    assert report["closed_by_reason"] == {"deleted": 9, "peer": 3}, report["closed_by_reason"]
    series = report["memory_mb"]["series"]
    assert [s["sessions"] for s in series] == [0, 3, 12], series
    assert all(s["rss"] > 50 and s["pss"] > 0 for s in series), series
    # 12 sessions are too few to judge growth (that is `emote churn --sessions 200`); the exit code follows `met`.
    assert code == (0 if report["met"] else 1), err


def test_soak_samples_memory_rate_latency_and_av_offset(server, capsys):
    code, out, err = run_cli(["soak", "--url", server, "--minutes", 0.25, "--interval", 5], capsys)
    report = json.loads(out)
    samples, summary = report["samples"], report["summary"]
    assert report["speech"] == "espeak-ng" and [s["t_s"] for s in samples][-1] >= 15 and len(samples) == 4, samples
    assert summary["fresh_fps_min"] >= 20 and summary["decoded_fps_min"] >= 20, summary
    assert all(s["speech_frames"] > 0 for s in samples[1:]), "the pushed speech reached the model"
    assert samples[-1]["speech_frames"] > samples[1]["speech_frames"], "and kept reaching it"
    offsets = summary["av_offset_ms"]
    assert offsets["start"] is not None and abs(offsets["drift"]) <= 40, summary
    assert summary["buffered_audio_s"]["end"] < 1.0, "pushed in real time, the input queue stays short"
    assert code == (0 if all(summary["met"].values()) else 1), err


async def test_one_session_over_the_limit_gets_503_and_the_others_keep_their_rate(server):
    peers = [await open_session(server, mode="presenter") for _ in range(MAX_SESSIONS)]
    try:
        await asyncio.gather(*(p.video.wait_for(10, timeout=20) for p in peers))
        with pytest.raises(WhipError) as refused:
            await open_session(server, mode="presenter")
        assert refused.value.status == 503 and refused.value.body["error"] == "server_full"
        assert int(refused.value.headers["retry-after"]) > 0
        await asyncio.sleep(4.0)
        now = time.monotonic()
        for peer in peers:
            assert peer.video.fps(now - 4.0, now) >= 20, "a refused session costs the running ones nothing"
    finally:
        for peer in peers:
            await peer.close()
