"""Security of every entry point of a real `emote serve`: the token (printed at start, kept in the data dir) on every
route and WebSocket, WebSocket origins, per-client rate limits, the avatar quota, early size limits and path
traversal. Plus the guards' pieces on their own (token bucket, origins, TURN REST credentials, settings)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import io
import json
import os
import re
import stat
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.websockets import WebSocketDisconnect
import websockets
from PIL import Image

from server_fixtures import assert_error, make_test_model, read_token, running_server, start_server, stop_server

KIOSK_ORIGIN = "https://kiosk.example.com"
NO_SESSION = "0" * 32


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A server with the token it keeps in its data dir, small limits, and one extra allowed origin. The server
    trusts X-Forwarded-For from loopback (uvicorn's default), so each test poses as its own client address."""
    tmp = tmp_path_factory.mktemp("secured")
    base_url, process = start_server(
        tmp, "--max-avatars", "1", "--session-rate-burst", "2", "--session-rate-per-min", "1",
        "--upload-rate-burst", "3", "--upload-rate-per-min", "1", "--allow-origin", KIOSK_ORIGIN,
        model=make_test_model(tmp / "model"), auth=True)
    token = read_token(tmp)
    yield SimpleNamespace(url=base_url, ws=base_url.replace("http", "ws", 1), token=token, tmp=tmp,
                          auth={"Authorization": f"Bearer {token}"})
    stop_server(process)
    log = (tmp / "server.log").read_text()
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]


def as_client(address: str, auth: dict | None = None) -> dict:
    return {"X-Forwarded-For": address, **(auth or {})}


def png_bytes(side: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 150, 120)).save(buffer, format="PNG")
    return buffer.getvalue()


async def closed_with(url: str, **options) -> tuple[dict, int]:
    """Connect, read the one error message, and return it with the close code."""
    async with websockets.connect(url, **options) as ws:
        message = json.loads(await ws.recv())
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    return message, closed.value.rcvd.code


async def ping(url: str, **options) -> None:
    async with websockets.connect(url, **options) as ws:
        await ws.send(json.dumps({"type": "ping", "t": 1}))
        assert json.loads(await ws.recv()) == {"type": "pong", "t": 1}


# ---- the token --------------------------------------------------------------------------------------------------

def test_the_start_line_prints_the_page_url_with_the_kept_token(secured):
    token_file = secured.tmp / "data" / "token"
    log = (secured.tmp / "server.log").read_text()
    # The one place the token shows: the line to open (access logs print `token=***`).
    assert [line for line in log.splitlines() if secured.token in line] == [
        f"Open {secured.url}/#token={secured.token} (the token is kept in {token_file})"]
    assert len(secured.token) >= 40 and re.fullmatch(r"[A-Za-z0-9_-]+", secured.token)
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert not [p for p in token_file.parent.iterdir() if p.name.startswith(".tmp")]


def test_the_kept_token_survives_a_restart(tmp_path):
    model = make_test_model(tmp_path / "model")
    with running_server(tmp_path, model=model, auth=True) as (base_url, _):
        token = read_token(tmp_path)
    with running_server(tmp_path, model=model, auth=True) as (base_url, _):
        assert read_token(tmp_path) == token
        assert f"#token={token} " in (tmp_path / "server.log").read_text(), "the same URL is printed again"
        with httpx.Client(base_url=base_url) as c:
            assert c.get("/api/avatars", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            assert_error(c.get("/api/avatars"), 401, "unauthorized")


PROTECTED = [("GET", "/metrics"), ("GET", "/api/avatars"), ("POST", "/api/avatars"), ("GET", "/api/avatars/default"),
             ("GET", "/api/avatars/default/portrait.png"), ("DELETE", f"/api/avatars/{'a' * 32}"),
             ("POST", "/api/sessions"), ("GET", "/api/sessions"), ("GET", f"/api/sessions/{NO_SESSION}"),
             ("POST", f"/api/sessions/{NO_SESSION}/interrupt"), ("DELETE", f"/api/sessions/{NO_SESSION}")]


def test_every_api_route_needs_the_token(secured):
    wrong = [{}, {"Authorization": f"Bearer {secured.token[:-1]}"}, {"Authorization": f"Bearer {secured.token}x"},
             {"Authorization": secured.token}, {"Authorization": f"Basic {secured.token}"}]
    with httpx.Client(base_url=secured.url, timeout=10) as c:
        for method, path in PROTECTED:
            for headers in wrong:
                response = c.request(method, path, headers=headers, params={"token": secured.token})
                assert_error(response, 401, "unauthorized")
                assert response.headers["www-authenticate"] == "Bearer", (method, path)
        assert c.get("/metrics", headers=secured.auth).text.startswith("#")
        assert c.get("/api/avatars/default/portrait.png", headers=secured.auth).headers["content-type"] == "image/png"
        assert_error(c.get(f"/api/sessions/{NO_SESSION}", headers=secured.auth), 404, "unknown_session")
        # Public by choice: the page and its files, and a liveness answer that tells nothing more.
        assert "<html" in c.get("/").text.lower() and c.get("/app.js").status_code == 200
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/healthz", headers=secured.auth).json()["sessions"] == 0
        config = c.get("/api/config").json()
        assert (config["auth_required"], config["authorized"], config["ice_servers"]) == (True, False, [])
        assert c.get("/api/config", headers=secured.auth).json()["authorized"] is True


async def test_websockets_need_the_token(secured):
    audio = f"{secured.ws}/api/sessions/{NO_SESSION}/audio"
    for url, options in [(f"{secured.ws}/ws", {}), (f"{secured.ws}/ws?token=wrong-token-0000000000", {}),
                         (f"{secured.ws}/ws", {"additional_headers": {"Authorization": "Bearer wrong-000000000000"}}),
                         (audio, {}), (f"{audio}?token={secured.token[:-1]}", {})]:
        message, code = await closed_with(url, **options)
        assert (message["error"], code) == ("unauthorized", 4401), url
    # The token in the query (browsers cannot set WebSocket headers) or in the header (other clients).
    await ping(f"{secured.ws}/ws?token={secured.token}")
    await ping(f"{secured.ws}/ws", additional_headers=secured.auth)
    message, code = await closed_with(audio, additional_headers=secured.auth)
    assert (message["error"], code) == ("unknown_session", 4404), "past the token check"
    log = (secured.tmp / "server.log").read_text()
    assert "token=***" in log and log.count(secured.token) == 1, "only the start line shows the token"


async def test_websocket_origin_is_checked(secured):
    own = secured.url  # http://127.0.0.1:PORT, the Host the client sends
    sockets = [f"{secured.ws}/ws?token={secured.token}", f"{secured.ws}/api/sessions/{NO_SESSION}/audio?token={secured.token}"]
    foreign = ["https://evil.example.com", own.replace("127.0.0.1", "localhost"), own.rsplit(":", 1)[0] + ":1", "null",
               f"{own}.evil.example.com"]
    for url in sockets:
        for origin in foreign:
            message, code = await closed_with(url, origin=origin)
            assert (message["error"], code) == ("forbidden_origin", 4403), (url, origin)
    for origin in (own, KIOSK_ORIGIN):  # the page's own origin, and the one allowed with --allow-origin
        await ping(sockets[0], origin=origin)


# ---- limits -------------------------------------------------------------------------------------------------------

async def test_session_creation_is_rate_limited_per_client(secured):
    sdp = {"Content-Type": "application/sdp"}
    with httpx.Client(base_url=secured.url, timeout=10) as c:
        for _ in range(2):  # the burst (bad offers are answered, and count)
            assert_error(c.post("/api/sessions", content=b"v=0", headers={**sdp, **as_client("198.51.100.1", secured.auth)}),
                         400, "bad_offer")
        limited = c.post("/api/sessions", content=b"v=0", headers={**sdp, **as_client("198.51.100.1", secured.auth)})
        assert_error(limited, 429, "rate_limited")
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert_error(c.post("/api/sessions", content=b"v=0", headers={**sdp, **as_client("198.51.100.2", secured.auth)}),
                     400, "bad_offer"), "another client is not limited"
    # Offers over /ws draw on the same kind of bucket.
    async with websockets.connect(f"{secured.ws}/ws?token={secured.token}",
                                  additional_headers=as_client("198.51.100.3")) as ws:
        replies = []
        for _ in range(3):
            await ws.send(json.dumps({"type": "offer", "sdp": "v=0"}))
            replies.append(json.loads(await ws.recv()))
    assert [r["error"] for r in replies] == ["bad_offer", "bad_offer", "rate_limited"], replies
    assert replies[2]["status"] == 429 and replies[2]["retry_after"] >= 1


def test_the_avatar_quota_and_the_upload_rate(secured):
    store = secured.tmp / "data" / "avatars"
    headers = as_client("198.51.100.4", secured.auth)
    with httpx.Client(base_url=secured.url, timeout=30, headers=headers) as c:
        def upload():
            return c.post("/api/avatars", files={"image": ("me.png", png_bytes(), "image/png")})

        first = upload()
        assert first.status_code == 201, first.text
        body = assert_error(upload(), 409, "quota_exceeded")
        assert "at most 1" in body["message"]
        assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == [first.json()["id"]]
        assert c.delete(f"/api/avatars/{first.json()['id']}").status_code == 204
        second = upload()  # room again
        assert second.status_code == 201, second.text
        ids = [first.json()["id"], second.json()["id"]]
        assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and ids[0] != ids[1]
        limited = upload()  # the fourth upload of a burst of 3
        assert_error(limited, 429, "rate_limited")
        assert int(limited.headers["retry-after"]) >= 1
        assert c.delete(f"/api/avatars/{ids[1]}").status_code == 204


def raw_request(base_url: str, method: str, path: str, headers: dict, timeout: float = 5.0) -> tuple[int, bytes]:
    """One request sent exactly as written (no client-side normalisation of the path), body never sent."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_oversized_bodies_are_refused_before_they_are_read(secured):
    for path, content_type in (("/api/sessions", "application/sdp"), ("/api/avatars", "multipart/form-data; boundary=x")):
        started = time.monotonic()
        status, body = raw_request(secured.url, "POST", path, {**secured.auth, "Content-Type": content_type,
                                                              "Content-Length": str(10**9)})
        assert status == 413 and json.loads(body)["error"] == "too_large", body
        assert time.monotonic() - started < 3, "answered without waiting for the body"


async def test_oversized_websocket_messages_are_refused_by_the_protocol(secured):
    async with websockets.connect(f"{secured.ws}/ws?token={secured.token}", max_size=None) as ws:
        await ws.send("x" * (257 * 1024))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd.code == 1009  # message too big


TRAVERSAL_IDS = ["../../../etc/passwd", "..%2f..%2fsecret.png", "..%2F..%2F..%2Fetc%2Fpasswd",
                 "%2e%2e%2f%2e%2e%2fsecret.png", "%2e%2e", "..", "%2fetc%2fpasswd", "%2Fetc", "%00", "default%00",
                 "default%00..%2f", "x" * 5000]


def test_avatar_ids_cannot_reach_outside_the_store(secured):
    secret = secured.tmp / "data" / "secret.png"  # beside the store (data/avatars), never to be read or deleted
    secret.write_bytes(b"SECRET-MARKER" + png_bytes(64))
    before = sorted(p.name for p in (secured.tmp / "data" / "avatars").iterdir())
    for index, avatar_id in enumerate(TRAVERSAL_IDS):
        client = as_client(f"198.51.100.{100 + index}", secured.auth)  # a fresh bucket for each session attempt
        requests = [("GET", f"/api/avatars/{avatar_id}"), ("GET", f"/api/avatars/{avatar_id}/portrait.png"),
                    ("DELETE", f"/api/avatars/{avatar_id}"), ("POST", f"/api/sessions?avatar={avatar_id}")]
        for method, path in requests:
            status, body = raw_request(secured.url, method, path, {**client, "Content-Type": "application/sdp",
                                                                  "Content-Length": "0"})
            # A DELETE the avatar route does not match falls to the static files, which allow GET only: 405.
            assert status in ((404, 405, 422) if method == "DELETE" else (404, 422)), (method, path, status, body)
            assert json.loads(body)["error"] in ("unknown_avatar", "not_found", "invalid_request", "method_not_allowed")
            assert b"SECRET-MARKER" not in body and b"root:" not in body
    assert secret.is_file()
    assert sorted(p.name for p in (secured.tmp / "data" / "avatars").iterdir()) == before


# ---- the pieces ---------------------------------------------------------------------------------------------------

def test_rate_limiter_bursts_then_refills_per_client():
    from server.security import RateLimiter

    limiter = RateLimiter(burst=3, per_min=30)  # one every 2 s
    assert [limiter.take("a", now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a", now=100.0) == pytest.approx(2.0)
    assert limiter.take("b", now=100.0) == 0.0, "buckets are per client"
    assert limiter.take("a", now=101.0) == pytest.approx(1.0)  # a refused attempt costs nothing
    assert limiter.take("a", now=102.0) == 0.0
    assert limiter.take("a", now=1000.0) == 0.0 and limiter.take("a", now=1000.0) == 0.0  # refilled up to the burst
    assert all(RateLimiter(1, 0).take("c") == 0.0 for _ in range(100)), "per_min 0: no limit"
    small = RateLimiter(burst=1, per_min=1, max_clients=2)
    for client in ("x", "y", "z"):
        small.take(client, now=0.0)
    assert len(small._buckets) == 2, "the number of clients remembered is bounded"
    assert RateLimiter.retry_after(0.2) == "1" and RateLimiter.retry_after(2.5) == "3"


def test_ipv6_clients_share_the_bucket_of_their_64_prefix():
    from server.security import client_key

    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.7") == client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("testclient") == "testclient"


def test_origins():
    from server.security import origin_allowed

    assert origin_allowed(None, "h:1"), "no Origin: not a browser; the token still applies"
    assert origin_allowed("http://h:1", "h:1") and origin_allowed("https://H:1", "h:1")
    assert origin_allowed("https://avatar.example.com", "avatar.example.com"), "behind a TLS proxy"
    assert origin_allowed("https://kiosk.example.com", "h:1", {"https://kiosk.example.com"})
    for origin in ("http://h:2", "http://evil", "null", "file://", "http://h:1/path", "ftp://h:1", "http://u@h:1"):
        assert not origin_allowed(origin, "h:1"), origin
    assert not origin_allowed("http://h:1", None)


def test_turn_rest_credentials_follow_coturns_scheme():
    from server.settings import IceServer, Settings

    settings = Settings(token="t" * 16, ice_servers=(IceServer.parse("stun:stun.example.com:3478"),),
                        turn_secret="s3cret", turn_urls=("turn:turn.example.com:3478",
                                                         "turn:turn.example.com:3478?transport=tcp"), turn_ttl=600)
    stun, udp, tcp = settings.ice_server_list(now=1_000_000)
    assert stun.username is None and udp.username == tcp.username == "1000600:emote"
    expected = base64.b64encode(hmac.new(b"s3cret", b"1000600:emote", hashlib.sha1).digest()).decode()
    assert udp.credential == expected
    peer = settings.rtc_ice_servers[1]  # the server's own aiortc peer, per session
    assert (peer.urls, peer.credential is not None) == ("turn:turn.example.com:3478", True)
    assert abs(int(peer.username.split(":")[0]) - (time.time() + 600)) < 5, "made fresh, at call time"


def test_serve_options_resolve_the_token(tmp_path, monkeypatch):
    import argparse

    from server.serve import register, settings_from_args

    def settings(*argv):
        parser = argparse.ArgumentParser()
        register(parser.add_subparsers())
        return settings_from_args(parser.parse_args(["serve", "--data-dir", str(tmp_path / "data"), *argv]))

    monkeypatch.delenv("EMOTE_TOKEN", raising=False)
    no_auth = settings("--no-auth")
    assert no_auth.token is None and not no_auth.auth_required and not (tmp_path / "data" / "token").exists()
    kept = settings().token
    assert kept == (tmp_path / "data" / "token").read_text().strip() and settings().token == kept
    assert settings("--token", "given-token-0123456789").token == "given-token-0123456789"
    monkeypatch.setenv("EMOTE_TOKEN", "from-the-environment-0123")
    assert settings().token == "from-the-environment-0123"


def test_public_metrics_and_no_auth(tmp_path):
    """In process: --public-metrics opens /metrics alone; --no-auth opens everything, WebSockets included."""
    from fastapi.testclient import TestClient

    from server.serve import build_app
    from server.settings import Settings

    model = make_test_model(tmp_path / "model")
    token = "in-process-token-0123456789"
    app = build_app(Settings(model=model, data_dir=tmp_path / "a", token=token, public_metrics=True).validate())
    with TestClient(app) as c:
        assert c.get("/metrics").status_code == 200
        assert_error(c.get("/api/avatars"), 401, "unauthorized")
    app = build_app(Settings(model=model, data_dir=tmp_path / "b", allow_no_auth=True).validate())
    with TestClient(app, base_url="http://localhost:8080") as c:
        assert c.get("/metrics").status_code == 200 and c.get("/api/avatars").status_code == 200
        assert c.get("/api/config").json()["authorized"] is True
        assert c.get("/healthz").json()["sessions"] == 0
        with c.websocket_connect("/ws", headers={"host": "localhost:8080"}) as ws:  # (its default: testserver)
            ws.send_json({"type": "ping", "t": 2})
            assert ws.receive_json() == {"type": "pong", "t": 2}
        # Without a token on loopback, a page that rebinds its own DNS name to 127.0.0.1 is refused by its Host.
        assert c.get("/api/avatars", headers={"host": "127.0.0.1:8080"}).status_code == 200
        assert c.get("/api/avatars", headers={"host": "[::1]:8080"}).status_code == 200
        assert_error(c.get("/api/avatars", headers={"host": "rebound.example:8080"}), 400, "bad_host")
        with pytest.raises(WebSocketDisconnect) as closed:
            with c.websocket_connect("/ws", headers={"host": "rebound.example:8080"}):
                pass
        assert closed.value.code == 4403
