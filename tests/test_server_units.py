"""Server pieces that need no running server: settings, ICE servers, structured logs."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from avatar.errors import EmoteError
from server.serve import JsonFormatter, RedactTokens
from server.settings import IceServer, Settings


def test_ice_server_urls_parse_with_and_without_credentials():
    assert IceServer.parse("stun:stun.example.com:3478").to_browser() == {"urls": "stun:stun.example.com:3478"}
    turn = IceServer.parse("turn:alice:pa55@turn.example.com:3478?transport=udp")
    assert turn == IceServer("turn:turn.example.com:3478?transport=udp", "alice", "pa55")
    assert turn.to_browser() == {"urls": "turn:turn.example.com:3478?transport=udp", "username": "alice", "credential": "pa55"}
    for bad in ("http://x", "stun:", "turnx:host"):
        with pytest.raises(EmoteError, match="--ice-server"):
            IceServer.parse(bad)


def test_settings_for_aiortc_and_auth_rules():
    settings = Settings(ice_servers=(IceServer.parse("turn:u:p@h:3478"),)).validate()
    (server,) = settings.rtc_ice_servers
    assert (server.urls, server.username, server.credential) == ("turn:h:3478", "u", "p")
    assert Settings().rtc_ice_servers == []  # not aiortc's default public STUN host
    assert Settings(host="0.0.0.0", allow_no_auth=True).validate().auth_required is False
    assert Settings(host="127.0.0.1").auth_required, "loopback is no exemption: behind a proxy every client is"
    with pytest.raises(EmoteError, match="exclude each other"):
        Settings(token="x" * 16, allow_no_auth=True).validate()
    with pytest.raises(EmoteError, match="go together"):
        Settings(tls_cert=Path("/x")).validate()


def app_for(tmp_path: Path, *argv: str, model: Path):
    import argparse

    from server.serve import build_app, register, settings_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", *argv, "--model", str(model), "--data-dir", str(tmp_path / "data")])
    return build_app(settings_from_args(args))


def test_serve_refine_reaches_the_pixel_model(tiny_pipe, tiny_model_dir, tmp_path):
    """`emote serve --refine` decodes live frames through the pixel model's portrait refiner, and needs a model
    with one; without the flag live frames skip it."""
    from conftest import with_portrait_refiner

    with_portrait_refiner(tiny_pipe).save_pretrained(tmp_path / "refined")
    served = app_for(tmp_path, model=tmp_path / "refined").state.engine.model
    assert type(served).__name__ == "WatermarkedModel", "every served model is watermarked"
    assert served.inner.refine is False
    assert app_for(tmp_path, "--refine", model=tmp_path / "refined").state.engine.model.inner.refine is True
    with pytest.raises(EmoteError, match="refine needs a model with a portrait refiner"):
        app_for(tmp_path, "--refine", model=tiny_model_dir)


def test_serve_size_reaches_a_model_that_takes_it_and_is_refused_by_one_that_does_not(tiny_model_dir, tmp_path):
    from server_fixtures import make_test_model

    app = app_for(tmp_path, "--size", "320", model=make_test_model(tmp_path / "solid"))
    assert (app.state.engine.spec.width, app.state.engine.spec.height) == (320, 320)
    with pytest.raises(EmoteError, match="renders 32x32 only"):
        app_for(tmp_path, "--size", "256", model=tiny_model_dir)
    with pytest.raises(EmoteError, match="not a model directory"):
        app_for(tmp_path, model=tmp_path)


def png(image) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_avatar_store_prepares_once_refuses_atomically_and_recomputes_caches_of_another_model(tmp_path):
    import numpy as np

    from server.avatars import AvatarStore
    from streaming.testing import SolidColourModel

    class Counting(SolidColourModel):
        prepared: list = []

        def prepare_avatar(self, avatar_id, portrait, cache_dir=None):
            Counting.prepared.append(avatar_id)
            return super().prepare_avatar(avatar_id, portrait, cache_dir)

    store = AvatarStore(tmp_path / "avatars", Counting(min_side=100))
    store.load()
    assert [(i.id, i.builtin) for i in store.list()] == [("default", True), ("drawn", True)]
    default = await store.streaming_avatar("default")
    assert default.preview.shape == (64, 64, 3) and default.state["model"] == "solid-colour"
    with pytest.raises(PermissionError):
        await store.delete("drawn")

    with pytest.raises(EmoteError, match="at least 100x100"):  # the model's own message
        await store.create(png(np.zeros((80, 90, 3), np.uint8)), "small")
    assert len(store) == 2 and sorted(p.name for p in (tmp_path / "avatars").iterdir()) == [".builtin"]

    info = await store.create(png(np.full((120, 100, 3), 200, np.uint8)), "grey")
    Counting.prepared.clear()
    assert (await store.streaming_avatar(info.id)).preview.shape == (64, 64, 3)
    assert Counting.prepared == [], "a recently used avatar is not prepared again"
    store.close()

    cache = tmp_path / "avatars" / info.id / "cache" / "analysis.json"
    assert '"solid-colour"' in cache.read_text()
    other = AvatarStore(tmp_path / "avatars", SolidColourModel(width=96, height=96, name="other-model"))
    other.load()  # another model: every cache is recomputed, every stored preview follows the new size
    assert '"other-model"' in cache.read_text()
    portrait = await other.portrait_png(info.id)
    assert portrait[16:24] == (96).to_bytes(4, "big") + (96).to_bytes(4, "big")  # the PNG's IHDR width, height
    other.close()


def test_json_logs_carry_extra_fields_and_hide_tokens():
    record = logging.LogRecord("emote.sessions", logging.INFO, __file__, 1, "session %s opened", ("abc",), None)
    record.session = "abc"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "session abc opened" and line["session"] == "abc" and line["level"] == "info"
    access = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1,
                               '%s - "WebSocket /ws?token=%s&x=1" [accepted]', ("127.0.0.1", "hunter2-hunter2-hunter2"), None)
    assert RedactTokens().filter(access)
    assert "hunter2" not in access.getMessage() and "token=***&x=1" in access.getMessage()


def test_presenter_audio_is_stamped_on_the_video_clock_across_interrupts_and_skips():
    from dataclasses import dataclass

    import numpy as np

    from server.rtc import AUDIO_FRAME_SAMPLES, AvatarAudioTrack

    @dataclass
    class Item:
        index: int
        audio: np.ndarray

    track = AvatarAudioTrack()
    tone = np.full(640, 0.25, np.float32)
    for index in range(3):
        track.push(Item(index, tone))
    stamps = [track.queue.get_nowait().pts for _ in range(track.queue.qsize())]
    assert all(b - a == AUDIO_FRAME_SAMPLES for a, b in zip(stamps, stamps[1:]))
    track.clear()  # barge-in drops queued and pending audio
    track.push(Item(50, tone))  # and the session may have moved on (a slow reader skipped ahead)
    first_after = track.queue.get_nowait().pts
    assert first_after == 50 * 48_000 // 25, "audio restarts exactly where the video frame 50 is"


async def test_a_closed_session_leaves_nothing_behind(tmp_path):
    """Its peer connection, streaming session and tracks are freed soon after the close (they sit in reference
    cycles, which the server collects right after sessions end), and the memory goes back to the kernel."""
    import asyncio
    import gc
    import weakref

    from aiortc import RTCPeerConnection

    from server.avatars import AvatarStore
    from server.sessions import RELEASE_DELAY_S, SessionManager
    from streaming.engine import StreamingEngine
    from streaming.testing import SolidColourModel

    model = SolidColourModel(width=32, height=32)
    avatars = AvatarStore(tmp_path / "avatars", model)
    avatars.load()
    engine = StreamingEngine(model)
    manager = SessionManager(Settings(allow_no_auth=True, data_dir=tmp_path), engine, avatars)
    await engine.start()
    client = RTCPeerConnection()
    try:
        client.addTransceiver("video", direction="recvonly")
        client.addTransceiver("audio", direction="sendonly")
        await client.setLocalDescription(await client.createOffer())
        gc.disable()  # only the server's own collection may free the cycles
        session, _ = await manager.create(client.localDescription.sdp, "default", "mic")
        refs = {name: weakref.ref(obj) for name, obj in
                (("peer connection", session.pc), ("session", session), ("stream", session.stream),
                 ("video track", session.video))}
        await manager.close(session.id, "deleted")
        del session
        assert manager.sessions == {} and engine.sessions == []
        await asyncio.sleep(RELEASE_DELAY_S + 0.5)
        alive = [name for name, ref in refs.items() if ref() is not None]
        assert alive == [], f"still alive after the close: {alive}"
    finally:
        gc.enable()
        await client.close()
        await manager.close_all()
        await engine.stop()
