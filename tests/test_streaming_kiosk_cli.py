"""Kiosk microphone source (fake PortAudio stream) and the `emote bench --streaming` command line."""
import asyncio
import json

import numpy as np
import pytest
import torch

from server.cli import main
from streaming.clock import FakeClock
from streaming.config import StreamConfig
from streaming.engine import StreamingEngine
from streaming.kiosk import KioskAudioSource
from streaming.testing import FakeInputStream, SolidColourModel


async def test_kiosk_feeds_microphone_blocks_into_the_session():
    clock = FakeClock()

    async def body():
        engine = StreamingEngine(SolidColourModel(), StreamConfig(), clock=clock, threaded=False)
        await engine.start()
        await engine.add_avatar("a", np.zeros((64, 64, 3), np.uint8))
        session = await engine.open_session("a")
        source = KioskAudioSource(session, sample_rate=48000, channels=2, max_queued_blocks=4,
                                  stream_factory=FakeInputStream)
        await source.start()
        stream = FakeInputStream.instances[-1]
        assert stream.started and stream.samplerate == 48000 and stream.blocksize == 960
        tone = (np.sin(np.arange(48000) / 48000 * 2 * np.pi * 220) * 10000).astype(np.int16)
        for i in range(0, 48000, 960):  # one second of 20 ms stereo blocks from the "audio thread"
            stream.feed(np.stack([tone[i : i + 960]] * 2, axis=1))
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert source.blocks_received == 50 and source.dropped_blocks == 0
        assert session.buffered_seconds == pytest.approx(1.0, abs=0.02)  # resampled to 16 kHz mono
        for _ in range(6):  # the event loop stalls: only the newest 4 blocks are kept
            stream.feed(np.zeros((960, 2), np.int16), status=1)
        assert source.dropped_blocks == 2 and source.device_overflows == 6
        await source.stop()
        assert stream.closed and not stream.started
        await engine.stop()

    await clock.run(body())


def test_bench_streaming_bad_options_exit_2_with_one_line(capsys):
    assert main(["bench", "--streaming", "--preset", "tiny", "--sessions", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sessions" in err
    assert main(["bench", "--streaming", "--preset", "tiny", "--seconds", "-1"]) == 2
    assert main(["bench", "--streaming", "--preset", "tiny", "--context-lookahead", "7"]) == 2
    assert main(["bench", "--streaming", "--preset", "tiny", "--compile", "default"]) == 2
    assert "--compile" in capsys.readouterr().err


def test_bench_streaming_prints_one_json_line(capsys):
    previous = torch.get_num_threads()
    try:
        assert main(["bench", "--streaming", "--preset", "tiny", "--sessions", "2", "--seconds", "1.5", "--json"]) == 0
    finally:
        torch.set_num_threads(previous)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    for key in ("fps", "audio_to_lip_ms", "dropped_frames", "cpu_ms_per_frame", "speech_source"):
        assert key in result
    assert set(result["audio_to_lip_ms"]) >= {"p50", "p95"}
    assert result["sessions"] == 2 and result["output_fps"] == pytest.approx(25, abs=1.5)
    assert (result["model"], result["width"], result["height"]) == ("pixel-tiny", 32, 32)
