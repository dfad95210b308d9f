"""The HTTP/WebSocket API against a real `emote serve`: every bad input is a 4xx with a JSON body, never a 500."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
import websockets
from PIL import Image

from server_fixtures import (REPO_ROOT, TEST_MODEL_SIZE, assert_error, make_test_model, make_tiny_model,
                             running_server, start_server, stop_server)

TOKEN = "s3cret-token-for-tests-0123"


@pytest.fixture(scope="module")
def test_model(tmp_path_factory):
    return make_test_model(tmp_path_factory.mktemp("model") / "solid")


@pytest.fixture(scope="module")
def server(tmp_path_factory, test_model):
    tmp = tmp_path_factory.mktemp("api-server")
    # Many bad offers in a row from one address: the session rate limit (tested in test_server_security) is off.
    base_url, process = start_server(tmp, "--session-rate-per-min", "0", model=test_model)
    yield base_url
    stop_server(process)
    log = (tmp / "server.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    assert " 500" not in log


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


def png_bytes(width=200, height=240) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- avatars ----------------------------------------------------------------------------------------------------

def test_bundled_avatars_are_always_there_at_the_models_size(client):
    avatars = client.get("/api/avatars").json()
    assert [(a["id"], a["builtin"]) for a in avatars] == [("default", True), ("drawn", True)]
    for avatar_id in ("default", "drawn"):
        portrait = client.get(f"/api/avatars/{avatar_id}/portrait.png")
        assert portrait.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(portrait.content)).size == (TEST_MODEL_SIZE, TEST_MODEL_SIZE)
        assert_error(client.delete(f"/api/avatars/{avatar_id}"), 409, "builtin_avatar")
    config = client.get("/api/config").json()
    assert (config["width"], config["height"]) == (TEST_MODEL_SIZE, TEST_MODEL_SIZE)
    health = client.get("/healthz").json()
    assert (health["model"], health["width"]) == ("solid-colour", TEST_MODEL_SIZE)


@pytest.mark.parametrize("avatar_id", ["nope", "../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "a" * 32, "default/../x"])
def test_unknown_and_traversal_avatar_ids_are_404(client, avatar_id):
    for method in ("GET", "DELETE"):
        response = client.request(method, f"/api/avatars/{avatar_id}")
        # Clients may normalise "../" away first; whatever route is hit, it is a JSON 4xx, never a file.
        assert response.status_code in (404, 405), (method, avatar_id, response.text)
        assert response.json()["error"] in ("unknown_avatar", "not_found", "method_not_allowed")


def test_upload_validates_images(client):
    assert_error(client.post("/api/avatars", files={"image": ("x.png", b"not an image at all", "image/png")}), 422, "bad_image")
    assert_error(client.post("/api/avatars", files={"image": ("x.png", b"", "image/png")}), 422, "bad_image")
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, format="PNG")
    body = assert_error(client.post("/api/avatars", files={"image": ("bomb.png", bomb.getvalue(), "image/png")}), 422, "bad_image")
    assert "too large" in body["message"]
    assert_error(client.post("/api/avatars", files={"image": ("tiny.png", png_bytes(20, 20), "image/png")}), 422, "bad_image")
    huge = b"\x89PNG" + bytes(11 * 2**20)
    assert_error(client.post("/api/avatars", files={"image": ("big.png", huge, "image/png")}), 413, "too_large")
    assert_error(client.post("/api/avatars", files={"other": ("x.png", png_bytes(), "image/png")}), 400, "bad_upload")
    assert_error(client.post("/api/avatars", json={"image": "x"}), 415, "unsupported_media_type")
    assert len(client.get("/api/avatars").json()) == 2, "nothing was persisted by failed uploads"


def test_avatar_lifecycle_survives_restart_and_a_model_change(tmp_path, test_model):
    """Uploaded with one model, the avatar's cache is recomputed at start-up by another (the tiny pixel model),
    and its portrait comes back at the new model's size."""
    with running_server(tmp_path, model=test_model) as (base_url, _):
        with httpx.Client(base_url=base_url, timeout=30) as c:
            created = c.post("/api/avatars", files={"image": ("me.png", png_bytes(), "image/png")}, data={"name": "Me"})
            assert created.status_code == 201, created.text
            info = created.json()
            assert created.headers["location"] == f"/api/avatars/{info['id']}"
            assert info["name"] == "Me" and len(info["id"]) == 32
            assert c.get(f"/api/avatars/{info['id']}").json() == info
    avatar_dir = tmp_path / "data" / "avatars" / info["id"]
    assert {p.name for p in avatar_dir.iterdir()} == {"original", "portrait.png", "cache", "avatar.json"}
    assert (avatar_dir / "original").read_bytes() == png_bytes()
    assert [p.name for p in (avatar_dir / "cache").iterdir()] == ["analysis.json"]
    assert not [p for p in avatar_dir.parent.iterdir() if p.name.startswith(".") and p.name != ".builtin"]
    with running_server(tmp_path, model=make_tiny_model(tmp_path / "tiny")) as (base_url, _):
        with httpx.Client(base_url=base_url, timeout=30) as c:
            assert info["id"] in [a["id"] for a in c.get("/api/avatars").json()]
            assert (avatar_dir / "cache" / "reference.safetensors").is_file()
            portrait = c.get(f"/api/avatars/{info['id']}/portrait.png").content
            assert Image.open(io.BytesIO(portrait)).size == (32, 32)
            assert c.delete(f"/api/avatars/{info['id']}").status_code == 204
            assert_error(c.get(f"/api/avatars/{info['id']}"), 404, "unknown_avatar")
    assert not avatar_dir.exists()


# ---- sessions -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,code", [
    (b"", "bad_offer"),
    (b"   \n", "bad_offer"),
    (b"hello", "bad_offer"),
    (b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", "bad_offer"),
    (b"v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nm=garbage\r\n", "bad_offer"),
    (b"\xff\xfe\xfa", "bad_offer"),
])
def test_malformed_offers_are_400(client, body, code):
    response = client.post("/api/sessions", content=body, headers={"Content-Type": "application/sdp"})
    assert_error(response, 400, code)


def test_offer_without_dtls_fingerprint_is_400(client):
    sdp = ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
           "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\n"
           "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=rtpmap:96 VP8/90000\r\n")
    body = assert_error(client.post("/api/sessions?mode=presenter", content=sdp.encode(),
                                    headers={"Content-Type": "application/sdp"}), 400, "bad_offer")
    assert "fingerprint" in body["message"]


def test_bodies_are_limited_while_streaming_in(client):
    def chunks(total: int, size: int = 64 * 1024):
        for _ in range(total // size):
            yield b"v" * size

    # Chunked transfer (no Content-Length): the limit applies as the bytes arrive, with a JSON 413.
    assert_error(client.post("/api/sessions", content=chunks(2 * 2**20), headers={"Content-Type": "application/sdp"}),
                 413, "too_large")
    def multipart(total: int):
        yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
        yield from chunks(total)
        yield b"\r\n--x--\r\n"

    assert_error(client.post("/api/avatars", content=multipart(12 * 2**20),
                             headers={"Content-Type": "multipart/form-data; boundary=x"}), 413, "too_large")


def test_session_request_validation(client):
    sdp = {"Content-Type": "application/sdp"}
    assert_error(client.post("/api/sessions", content=b"v=0", headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type")
    assert_error(client.post("/api/sessions?avatar=nope", content=b"v=0", headers=sdp), 404, "unknown_avatar")
    assert_error(client.post("/api/sessions?avatar=../../x", content=b"v=0", headers=sdp), 404, "unknown_avatar")
    assert_error(client.post("/api/sessions?mode=karaoke", content=b"v=0", headers=sdp), 422, "invalid_request")
    for path in ("/api/sessions/" + "0" * 32, "/api/sessions/../../etc", "/api/sessions/x"):
        assert client.get(path).status_code == 404
        assert client.delete(path).status_code in (404, 405)
    assert_error(client.post("/api/sessions/" + "0" * 32 + "/interrupt"), 404, "unknown_session")


async def test_presenter_audio_socket_rejects_bad_input(server):
    ws_base = server.replace("http", "ws")
    async with websockets.connect(f"{ws_base}/api/sessions/{'0' * 32}/audio") as ws:
        message = json.loads(await ws.recv())
        assert message["error"] == "unknown_session"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 4404


async def test_signaling_socket_survives_garbage(server):
    async with websockets.connect(server.replace("http", "ws") + "/ws") as ws:
        await ws.send(b"\x00\x01binary")
        assert json.loads(await ws.recv())["error"] == "bad_message"
        for garbage in ("not json", "[1, 2]", json.dumps({"type": 5}), json.dumps({"type": "dance"}),
                        json.dumps({"type": "offer", "sdp": 42}), json.dumps({"type": "interrupt"})):
            await ws.send(garbage)
            reply = json.loads(await ws.recv())
            assert reply["type"] == "error" and reply["error"] in ("bad_message", "bad_state"), reply
        await ws.send(json.dumps({"type": "offer", "sdp": "v=0 nonsense"}))
        reply = json.loads(await ws.recv())
        assert reply["error"] == "bad_offer" and reply["status"] == 400
        await ws.send(json.dumps({"type": "offer", "sdp": "v=0", "avatar": "nope"}))
        reply = json.loads(await ws.recv())
        assert reply["error"] == "unknown_avatar" and reply["status"] == 404
        await ws.send(json.dumps({"type": "ping", "t": 7}))
        assert json.loads(await ws.recv()) == {"type": "pong", "t": 7}


def test_openapi_schema_describes_the_api(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/healthz", "/metrics", "/api/avatars", "/api/avatars/{avatar_id}", "/api/sessions",
                 "/api/sessions/{session_id}", "/api/sessions/{session_id}/interrupt"):
        assert path in paths, path
    offer = paths["/api/sessions"]["post"]
    assert "application/sdp" in offer["requestBody"]["content"]
    assert {"201", "503"} <= set(offer["responses"])
    assert "multipart/form-data" in paths["/api/avatars"]["post"]["requestBody"]["content"]


def test_metrics_are_prometheus_text(client):
    text = client.get("/metrics").text
    assert "emote_sessions_active 0.0" in text
    assert "# TYPE emote_audio_to_lip_ms gauge" in text


# ---- auth and settings ------------------------------------------------------------------------------------------

async def test_token_is_required_when_set_and_never_logged(tmp_path, test_model):
    turn = "turn:alice:turn-secret@turn.example.com:3478"
    with running_server(tmp_path, "--token", TOKEN, "--ice-server", turn, model=test_model) as (base_url, _):
        with httpx.Client(base_url=base_url) as c:
            assert c.get("/healthz").json() == {"status": "ok"}  # liveness probes need no token, and learn no more
            assert_error(c.get("/api/avatars"), 401, "unauthorized")
            assert_error(c.get("/api/avatars", headers={"Authorization": "Bearer wrong-token-0000000"}), 401, "unauthorized")
            assert c.get("/api/avatars", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
            assert c.get("/api/config").json()["auth_required"] is True
            assert c.get("/api/config").json()["ice_servers"] == [], "TURN credentials need the token"
            authorized = c.get("/api/config", headers={"Authorization": f"Bearer {TOKEN}"}).json()
            assert authorized["ice_servers"] == [{"urls": "turn:turn.example.com:3478", "username": "alice",
                                                  "credential": "turn-secret"}]
        ws_base = base_url.replace("http", "ws")
        async with websockets.connect(f"{ws_base}/ws") as ws:
            assert json.loads(await ws.recv())["error"] == "unauthorized"
        async with websockets.connect(f"{ws_base}/ws?token={TOKEN}") as ws:
            await ws.send(json.dumps({"type": "ping", "t": 1}))
            assert json.loads(await ws.recv())["type"] == "pong"
    log = (tmp_path / "server.log").read_text()
    assert "token=***" in log and TOKEN not in log


@pytest.mark.parametrize("args,message", [
    (["--token", "x" * 20, "--no-auth"], "exclude each other"),
    (["--turn-url", "turn:turn.example.com:3478"], "go together"),
    (["--turn-secret", "s", "--turn-url", "turn:u:p@turn.example.com:3478"], "--turn-url"),
    (["--allow-origin", "evil.example.com"], "--allow-origin"),
    (["--session-rate-burst", "0"], "--session-rate-burst must be at least 1"),
    (["--port", "70000"], "--port must be between"),
    (["--max-sessions", "0"], "--max-sessions must be at least 1"),
    (["--ice-server", "http://x"], "--ice-server"),
    (["--token", "short"], "at least 16 characters"),
    (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "does not exist"),
    (["--size", "100"], "--size must be between 256 and 512"),
])
def test_serve_rejects_bad_options_with_exit_2(args, message):
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve", *args], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
