"""A real aiortc peer against a real `emote serve` on loopback: WHIP sessions in mic and presenter mode. The server
runs the solid-colour test model; two tests stream the tiny pixel model and the default model."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import MediaStreamError

from conftest import speech_like, write_wav
from server_fixtures import DEFAULT_MODEL, TEST_MODEL_SIZE, make_tiny_model, running_server, skip_without_default_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rtc-server")
    with running_server(tmp, "--max-sessions", "2") as (base_url, process):
        yield base_url


async def whip(base_url: str, pc: RTCPeerConnection, headers: dict | None = None, **params) -> tuple[str, httpx.Response]:
    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        response = await client.post("/api/sessions", params=params, content=pc.localDescription.sdp,
                                     headers={"Content-Type": "application/sdp", **(headers or {})})
    assert response.status_code == 201, response.text
    await pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
    return response.headers["Location"], response


async def collect(track, seconds: float) -> list[tuple[float, object]]:
    """(arrival time, frame) for every frame received within `seconds`."""
    frames = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            frame = await asyncio.wait_for(track.recv(), timeout=left)
        except (asyncio.TimeoutError, MediaStreamError):
            break
        frames.append((time.monotonic(), frame))
    return frames


async def health(base_url: str) -> dict:
    async with httpx.AsyncClient(base_url=base_url) as client:
        return (await client.get("/healthz")).json()


async def wait_for_sessions(base_url: str, count: int, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = await health(base_url)
        if state["sessions"] == count and state.get("engine_sessions", count) == count:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} sessions, server says {state}")
        await asyncio.sleep(0.2)


async def presenter_peer(base_url: str) -> tuple[RTCPeerConnection, str, dict]:
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    tracks: dict = {}
    both = asyncio.Event()

    def on_track(track):
        tracks[track.kind] = track
        if len(tracks) == 2:
            both.set()

    pc.on("track", on_track)
    location, _ = await whip(base_url, pc, mode="presenter")
    await asyncio.wait_for(both.wait(), 10)
    return pc, location, tracks


def loudness(frame) -> float:
    samples = frame.to_ndarray().astype(np.float32)
    return float(np.sqrt(np.mean(samples**2)) / 32768)


async def mic_frames(base_url: str, tmp_path, seconds: float, avatar: str = "default") -> list:
    """Frames a mic session sends back while speech plays into it, after the connection settles."""
    wav = write_wav(tmp_path / "speech.wav", np.tile(speech_like(2.0), 7))
    player = MediaPlayer(str(wav))
    pc = RTCPeerConnection()
    pc.addTrack(player.audio)
    pc.addTransceiver("video", direction="recvonly")
    video = asyncio.get_running_loop().create_future()
    pc.on("track", lambda track: track.kind == "video" and video.set_result(track))
    location, _ = await whip(base_url, pc, avatar=avatar, mode="mic")
    try:
        track = await asyncio.wait_for(video, 30)
        await collect(track, 2.0)
        return await collect(track, seconds)
    finally:
        async with httpx.AsyncClient(base_url=base_url) as client:
            await client.delete(location)
        await pc.close()
        player.audio.stop()


async def test_the_pixel_model_streams_over_webrtc(tmp_path):
    with running_server(tmp_path, model=make_tiny_model(tmp_path / "tiny")) as (base_url, _):
        frames = await mic_frames(base_url, tmp_path, 3.0)
    assert len(frames) >= 50 and {(f.width, f.height) for _, f in frames} == {(32, 32)}


async def test_the_default_model_streams_512_frames_over_webrtc(tmp_path):
    skip_without_default_model()
    with running_server(tmp_path, model=DEFAULT_MODEL) as (base_url, _):
        frames = await mic_frames(base_url, tmp_path, 3.0)
    assert len(frames) >= 50 and {(f.width, f.height) for _, f in frames} == {(512, 512)}


async def test_mic_session_streams_25_fps_and_tears_down(server, tmp_path):
    wav = write_wav(tmp_path / "speech.wav", np.tile(speech_like(2.0), 7))
    player = MediaPlayer(str(wav))
    pc = RTCPeerConnection()
    pc.addTrack(player.audio)
    pc.addTransceiver("video", direction="recvonly")
    video = asyncio.get_running_loop().create_future()
    pc.on("track", lambda track: track.kind == "video" and video.set_result(track))
    location, _ = await whip(server, pc, avatar="default", mode="mic")
    track = await asyncio.wait_for(video, 10)
    await collect(track, 2.0)  # connection set-up and the first keyframe
    frames = await collect(track, 10.0)
    fps = (len(frames) - 1) / (frames[-1][0] - frames[0][0])
    assert fps >= 24, f"received {len(frames)} frames: {fps:.1f} fps"
    assert {(f.width, f.height) for _, f in frames} == {(TEST_MODEL_SIZE, TEST_MODEL_SIZE)}  # the model's size
    pts = [f.pts for _, f in frames]
    assert all(b - a == 3600 for a, b in zip(pts, pts[1:])), "frames are stamped 1/25 s apart on the 90 kHz clock"

    async with httpx.AsyncClient(base_url=server) as client:
        stats = (await client.get(location)).json()
        assert stats["mode"] == "mic" and stats["counters"]["frames_emitted"] > 250
        assert stats["counters"]["speech_frames"] > 0, "the microphone audio reached the model"
        assert (await client.delete(location)).status_code == 204
        assert (await client.delete(location)).status_code == 404
    await wait_for_sessions(server, 0)
    await pc.close()
    player.audio.stop()


async def test_vanished_peer_is_torn_down(server):
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="sendonly")
    await whip(server, pc, mode="mic")
    await wait_for_sessions(server, 1)
    await pc.close()  # the peer goes away without a DELETE: DTLS close -> connection state "closed"/"failed"
    await wait_for_sessions(server, 0, timeout=40)


async def test_presenter_audio_comes_back_aligned_with_video(server):
    pc, location, tracks = await presenter_peer(server)
    ws_url = server.replace("http", "ws") + f"{location}/audio?rate=16000&channels=1"

    rate = 16000
    t = np.arange(rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    pcm = (tone * 32767).astype("<i2").tobytes()

    async def push_after(delay: float) -> float:
        await asyncio.sleep(delay)
        async with websockets.connect(ws_url) as ws:
            for i in range(0, len(pcm), 6400):  # 200 ms messages
                await ws.send(pcm[i : i + 6400])
            sent = time.monotonic()
            await asyncio.sleep(2.5)
        return sent

    video_frames, audio_frames, _ = await asyncio.gather(
        collect(tracks["video"], 6.0), collect(tracks["audio"], 6.0), push_after(1.5)
    )
    assert len(video_frames) > 100 and len(audio_frames) > 200

    # Where the tone is, in the received audio: 20 ms frames with energy at 440 Hz.
    loud = [f for _, f in audio_frames if loudness(f) > 0.1]
    assert 40 <= len(loud) <= 60, f"{len(loud)} loud 20 ms frames; expected about 50 (one second of tone)"
    spectrum = np.abs(np.fft.rfft(np.concatenate([f.to_ndarray().reshape(-1, len(f.layout.channels))[:, 0] for f in loud[5:15]])))
    peak_hz = np.argmax(spectrum) * 48000 / (len(spectrum) * 2 - 2)
    assert abs(peak_hz - 440) < 15, peak_hz

    # Both tracks run on one clock: arrival time minus media time is the same for audio and video.
    def offsets(frames, clock_rate):
        first = frames[0][1].pts
        return np.median([arrival - (f.pts - first) / clock_rate for arrival, f in frames])

    skew = offsets(audio_frames, 48000) - offsets(video_frames, 90000)
    assert abs(skew) < 0.08, f"audio and video media clocks differ by {skew * 1000:.0f} ms"

    async with httpx.AsyncClient(base_url=server) as client:
        stats = (await client.get(location)).json()
        assert stats["counters"]["speech_frames"] >= 20
        await client.delete(location)
    await pc.close()


async def test_server_full_answers_503_with_retry_after(server):
    peers = []
    try:
        for _ in range(2):
            pc = RTCPeerConnection()
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            await whip(server, pc, mode="presenter")
            peers.append(pc)
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        async with httpx.AsyncClient(base_url=server, timeout=30) as client:
            response = await client.post("/api/sessions", params={"mode": "presenter"}, content=pc.localDescription.sdp,
                                         headers={"Content-Type": "application/sdp"})
        await pc.close()
        assert response.status_code == 503
        assert response.headers["Retry-After"].isdigit()
        assert response.json()["error"] == "server_full"
    finally:
        for pc in peers:
            await pc.close()
    await wait_for_sessions(server, 0, timeout=40)


async def test_interrupt_stops_audio_and_lips_together(server):
    pc, location, tracks = await presenter_peer(server)
    ws_url = server.replace("http", "ws") + f"{location}/audio"
    tone = (0.5 * np.sin(2 * np.pi * 300 * np.arange(16000 * 4) / 16000) * 32767).astype("<i2").tobytes()
    interrupted_at = {}

    async def push_then_interrupt():
        async with websockets.connect(ws_url) as ws:
            await ws.send(tone)  # 4 s of audio, queued at once (as a TTS backend would)
            await asyncio.sleep(1.5)
            await ws.send(json.dumps({"type": "interrupt"}))
            interrupted_at["t"] = time.monotonic()
            await asyncio.sleep(2.0)

    audio, _ = await asyncio.gather(collect(tracks["audio"], 4.0), push_then_interrupt())
    loud_before = [t for t, f in audio if loudness(f) > 0.1 and t < interrupted_at["t"]]
    loud_after = [t for t, f in audio if loudness(f) > 0.1 and t > interrupted_at["t"] + 0.4]
    assert len(loud_before) > 20, "the pushed audio played"
    assert not loud_after, f"{len(loud_after)} loud frames more than 400 ms after the interrupt"
    async with httpx.AsyncClient(base_url=server) as client:
        stats = (await client.get(location)).json()
        assert stats["counters"]["interrupts"] == 1
        await client.delete(location)
    await pc.close()


async def test_presenter_socket_rejects_bad_framing_and_mic_sessions(server):
    pc, location, _ = await presenter_peer(server)
    ws_base = server.replace("http", "ws")
    async with websockets.connect(f"{ws_base}{location}/audio?channels=2") as ws:
        await ws.send(b"\x00" * 6)  # 1.5 stereo s16 frames
        assert json.loads(await ws.recv())["error"] == "bad_framing"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 4400
    async with websockets.connect(f"{ws_base}{location}/audio") as ws:
        await ws.send("{not json")
        assert json.loads(await ws.recv())["error"] == "bad_message"
    async with websockets.connect(f"{ws_base}{location}/audio?rate=5") as ws:
        assert json.loads(await ws.recv())["error"] == "bad_format"
    async with httpx.AsyncClient(base_url=server) as client:
        assert (await client.get(location)).status_code == 200, "the session survives a bad client"
        await client.delete(location)
    await pc.close()

    mic = RTCPeerConnection()
    mic.addTransceiver("video", direction="recvonly")
    mic.addTransceiver("audio", direction="sendonly")
    mic_location, _ = await whip(server, mic, mode="mic")
    async with websockets.connect(f"{ws_base}{mic_location}/audio") as ws:
        assert json.loads(await ws.recv())["error"] == "wrong_mode"
    async with httpx.AsyncClient(base_url=server) as client:
        await client.delete(mic_location)
    await mic.close()


async def test_idle_timeout_and_graceful_shutdown(tmp_path):
    from server_fixtures import start_server, stop_server

    base_url, process = start_server(tmp_path, "--idle-timeout", "2")
    try:
        pc, location, _ = await presenter_peer(base_url)
        await wait_for_sessions(base_url, 1)
        await wait_for_sessions(base_url, 0, timeout=8)  # nobody pushed audio: closed as idle
        await pc.close()
        pc, location, _ = await presenter_peer(base_url)
    finally:
        code = stop_server(process)
    await pc.close()
    log = (tmp_path / "server.log").read_text()
    assert code == 0
    assert "idle timeout" in log and "server shutdown" in log


async def test_h264_is_negotiated_when_the_peer_prefers_it(server):
    from aiortc import RTCRtpSender

    pc = RTCPeerConnection()
    transceiver = pc.addTransceiver("video", direction="recvonly")
    transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == "video/H264"])
    pc.addTransceiver("audio", direction="recvonly")
    video = asyncio.get_running_loop().create_future()
    pc.on("track", lambda track: track.kind == "video" and not video.done() and video.set_result(track))
    location, response = await whip(server, pc, mode="presenter")
    assert "H264/90000" in response.text and "VP8/90000" not in response.text
    frames = await collect(await asyncio.wait_for(video, 10), 3.0)
    assert len(frames) > 40 and frames[-1][1].width == TEST_MODEL_SIZE
    async with httpx.AsyncClient(base_url=server) as client:
        await client.delete(location)
    await pc.close()


async def test_signaling_socket_negotiates_and_takes_trickled_candidates(server):
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    async with websockets.connect(server.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"type": "ice", "candidate": None}))
        assert json.loads(await ws.recv())["error"] == "bad_state", "candidates before the offer are refused"
        await ws.send(json.dumps({"type": "offer", "sdp": pc.localDescription.sdp, "mode": "presenter"}))
        answer = json.loads(await ws.recv())
        assert answer["type"] == "answer" and len(answer["session"]) == 32
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        await ws.send(json.dumps({"type": "ice", "candidate": {"candidate": "candidate:nonsense", "sdpMid": "0"}}))
        assert json.loads(await ws.recv())["error"] == "bad_candidate"
        host = "candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host"
        await ws.send(json.dumps({"type": "ice", "candidate": {"candidate": host, "sdpMid": "0", "sdpMLineIndex": 0}}))
        await ws.send(json.dumps({"type": "ice", "candidate": None}))  # end of candidates
        stats = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert stats["type"] == "stats" and stats["session"] == answer["session"], "no error for good candidates"
        await wait_for_sessions(server, 1)
    await wait_for_sessions(server, 0)  # closing the signaling socket ends the session at once
    await pc.close()
