"""The HTTP/WebSocket API and the static client. Every error is a 4xx JSON body `{"error": code, "message": ...}`."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from contextlib import asynccontextmanager
from typing import Any, Literal
from urllib.parse import urlsplit

from fastapi import FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.routing import APIRoute
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from avatar.errors import EmoteError

from . import openapi as doc
from .avatars import AvatarNotFound, AvatarStore, QuotaExceeded, valid_avatar_id
from .memory import freeze_startup_objects
from .metrics import render_metrics
from .security import LoopbackHostOnly, RateLimiter, bearer, client_key, is_loopback, origin_allowed, token_matches
from .sessions import ServerFull, SessionManager, SessionNotFound, add_remote_candidate
from .settings import Settings

logger = logging.getLogger("emote.server")

RETRY_AFTER_SECONDS = 10
WS_MESSAGE_LIMIT = 256 * 1024
BODY_LIMIT = 64 * 1024  # SDP offers and every other body but portrait uploads
NO_AVATAR = "No avatar with this id (`unknown_avatar`); an id that breaks the pattern names none"
NO_SESSION = "No such session, or it has ended (`unknown_session`); an id that breaks the pattern names none"


class BodyLimit:
    """Refuse request bodies over a limit while they stream in (Content-Length can be absent: chunked uploads), as a
    JSON 413 through the app's HTTPException handler. Uploads to /api/avatars get the upload limit."""

    def __init__(self, app, upload_limit: int):
        self.app, self.upload_limit = app, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"] == "/api/avatars" else BODY_LIMIT
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:  # refused before a byte of the body is read
            response = JSONResponse(error_body("too_large", f"request bodies here are limited to {limit} bytes"),
                                    status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise StarletteHTTPException(413, f"request bodies here are limited to {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_body(code: str, message: str) -> dict[str, str]:
    return {"error": code, "message": message}


def create_app(settings: Settings, engine, avatars: AvatarStore) -> FastAPI:
    if settings.auth_required and not settings.token:
        raise EmoteError("the server needs a token unless auth is off (--no-auth)")
    spec = engine.spec
    sessions = SessionManager(settings, engine, avatars)
    session_rate = RateLimiter(settings.session_rate_burst, settings.session_rate_per_min)
    upload_rate = RateLimiter(settings.upload_rate_burst, settings.upload_rate_per_min)
    allowed_origins = settings.origins

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        sessions.start()
        freeze_startup_objects()  # makes the collection after each session cheap (server/memory.py)
        try:
            yield
        finally:  # graceful shutdown: close every peer, then stop the model worker
            await sessions.close_all()
            await engine.stop()
            avatars.close()

    app = FastAPI(
        title="emote-live",
        version="0.1.0",
        description="Real-time portrait animation: WebRTC sessions driven by a microphone or pushed TTS audio.",
        lifespan=lifespan,
        generate_unique_id_function=lambda route: route.name,  # operationIds: the handlers' names
    )
    doc.install(app, auth=settings.auth_required)
    app.state.settings, app.state.sessions, app.state.avatars, app.state.engine = settings, sessions, avatars, engine
    app.add_middleware(BodyLimit, upload_limit=settings.max_upload_bytes + 64 * 1024)
    if settings.allow_no_auth and is_loopback(settings.host):
        app.add_middleware(LoopbackHostOnly, extra_hosts=[urlsplit(o).hostname or "" for o in allowed_origins])

    # ---- errors -------------------------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status, detail, headers = exc.status_code, str(exc.detail), dict(exc.headers or {})
        # The static client's mount takes every request no API route takes, also one that only has the wrong
        # method: an API path answers 405 with its own methods, not the mount's 404 or `Allow: GET, HEAD`.
        api_methods = allowed_methods(request) if status in (404, 405) else ""
        if api_methods and request.method not in api_methods.split(", "):
            status, detail, headers["Allow"] = 405, "Method Not Allowed", api_methods
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(status, "http_error")
        return JSONResponse(error_body(code, detail), status_code=status, headers=headers)

    def allowed_methods(request: Request) -> str:
        methods = {method for route in app.routes if isinstance(route, APIRoute)
                   and route.matches(request.scope)[0] != Match.NONE for method in route.methods}
        return ", ".join(sorted(methods))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(error_body("invalid_request", f"{where}: {first.get('msg', 'invalid')}"), status_code=422)

    # ---- auth ---------------------------------------------------------------------------------------------------

    def check_token(supplied: str | None) -> None:
        if settings.allow_no_auth:
            return
        if not token_matches(supplied, settings.token):
            raise ApiError(401, "unauthorized", "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})

    def authorize(request: Request) -> None:
        check_token(bearer(request.headers.get("authorization")))

    def authorized(request: Request) -> bool:
        try:
            authorize(request)
        except ApiError:
            return False
        return True

    def admit(limiter: RateLimiter, connection: Request | WebSocket, what: str) -> None:
        """Per-client rate limit (the client address; behind a trusted proxy, the one it forwards)."""
        wait = limiter.take(client_key(connection.client.host if connection.client else "unknown"))
        if wait:
            retry = RateLimiter.retry_after(wait)
            raise ApiError(429, "rate_limited", f"too many {what} from this address; retry in {retry} s",
                           {"Retry-After": retry})

    async def guard_websocket(websocket: WebSocket, token: str | None) -> bool:
        """After accept, before any work: a browser page from another origin gets 4403, a missing or wrong token
        4401. Returns whether the socket may go on."""
        if not origin_allowed(websocket.headers.get("origin"), websocket.headers.get("host"), allowed_origins):
            await _ws_fail(websocket, 4403, "forbidden_origin",
                           "this page's origin may not open the socket (see --allow-origin)")
            return False
        try:
            check_token(token or bearer(websocket.headers.get("authorization")))
        except ApiError as exc:
            await _ws_fail(websocket, 4401, exc.code, exc.message)
            return False
        return True

    def avatar_or_404(avatar_id: str):
        if not valid_avatar_id(avatar_id):
            raise ApiError(404, "unknown_avatar", f"no avatar {avatar_id[:64]!r}")
        try:
            return avatars.info(avatar_id)
        except AvatarNotFound:
            raise ApiError(404, "unknown_avatar", f"no avatar {avatar_id!r}") from None

    # ---- ops ----------------------------------------------------------------------------------------------------

    @app.get("/healthz", tags=["ops"], summary="Liveness and readiness (the details with a valid token)",
             response_model=None, responses={200: doc.ok(doc.Health, "The server is up")},
             openapi_extra=doc.optional_token())
    async def healthz(request: Request) -> dict[str, Any]:
        if not authorized(request):  # liveness probes need no token, and learn nothing more
            return {"status": "ok"}
        return {"status": "ok", "sessions": len(sessions), "engine_sessions": len(engine.sessions),
                "model_errors": engine.model_errors,
                "max_sessions": settings.max_sessions,
                "model": spec.name, "width": spec.width, "height": spec.height}

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response,
             responses={200: doc.text("Prometheus text format"),
                        **doc.errors(*([] if settings.public_metrics else [401]))})
    async def metrics(request: Request) -> Response:
        if not settings.public_metrics:
            authorize(request)
        return Response(render_metrics(sessions, engine), media_type="text/plain; version=0.0.4")

    @app.get("/api/config", tags=["ops"], summary="What the browser client needs: ICE servers (with the token, when "
             "one is set: they carry TURN credentials), limits, auth",
             response_model=None, responses={200: doc.ok(doc.ClientConfig, "The client's configuration")},
             openapi_extra=doc.optional_token())
    async def client_config(request: Request) -> dict[str, Any]:
        allowed = authorized(request)
        # TURN credentials are made fresh for each call; ice_servers_ttl says how long they last.
        ice_servers = [s.to_browser() for s in settings.ice_server_list()] if allowed else []
        return {"ice_servers": ice_servers,
                "ice_servers_ttl": settings.turn_ttl if allowed and settings.turn_secret else None,
                "auth_required": settings.auth_required, "authorized": allowed,
                "width": spec.width, "height": spec.height, "max_upload_bytes": settings.max_upload_bytes}

    # ---- avatars ------------------------------------------------------------------------------------------------

    @app.get("/api/avatars", tags=["avatars"], summary="List avatars", response_model=None,
             responses={200: doc.ok(list[doc.Avatar], "The bundled avatars, then the uploads"), **doc.errors(401)})
    async def list_avatars(request: Request) -> list[dict]:
        authorize(request)
        return [info.to_json() for info in avatars.list()]

    @app.post("/api/avatars", tags=["avatars"], status_code=201, summary="Upload a portrait (multipart field `image`)",
              response_model=None, openapi_extra=doc.portrait_upload_body(settings.max_upload_bytes),
              responses={201: doc.avatar_created(), **doc.errors(
                  (400, "The form cannot be read, has no file `image`, or has other fields (`bad_upload`)"), 401,
                  (409, "The server keeps its maximum of uploaded avatars (`quota_exceeded`); delete one first"),
                  413, 415, (422, "The file is not an image the model can use (`bad_image`)"),
                  *([429] if settings.upload_rate_per_min > 0 else []))})
    async def upload_avatar(request: Request) -> JSONResponse:
        authorize(request)
        admit(upload_rate, request, "uploads")
        if avatars.max_uploads is not None and avatars.uploads() >= avatars.max_uploads:  # before reading the body
            raise ApiError(409, "quota_exceeded",
                           f"the server keeps at most {avatars.max_uploads} uploaded avatars; delete one first")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_upload_bytes + 64 * 1024:
            raise ApiError(413, "too_large", f"uploads are limited to {settings.max_upload_bytes} bytes")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(415, "unsupported_media_type", "send the portrait as multipart/form-data, field `image`")
        try:
            form = await request.form(max_files=1, max_fields=4, max_part_size=settings.max_upload_bytes)
        except StarletteHTTPException as exc:
            if exc.status_code == 413:
                raise ApiError(413, "too_large", f"uploads are limited to {settings.max_upload_bytes} bytes") from None
            raise ApiError(400, "bad_upload", f"could not read the upload: {exc.detail}") from None
        except Exception as exc:  # starlette raises its own multipart parse errors
            raise ApiError(400, "bad_upload", f"could not read the upload: {exc}") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "bad_upload", "the form needs a file field named `image`")
        unknown = sorted(set(form.keys()) - {"image", "name"})
        if unknown:
            raise ApiError(400, "bad_upload", f"unknown form fields: {', '.join(unknown)}"[:200])
        if not isinstance(form.get("name", ""), str):
            raise ApiError(400, "bad_upload", "`name` must be a text field, not a file")
        data = await upload.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise ApiError(413, "too_large", f"uploads are limited to {settings.max_upload_bytes} bytes")
        name = form.get("name")
        try:
            info = await avatars.create(data, name if isinstance(name, str) else (upload.filename or "Avatar"))
        except QuotaExceeded as exc:  # a concurrent upload took the last place
            raise ApiError(409, "quota_exceeded", str(exc)) from None
        except EmoteError as exc:
            raise ApiError(422, "bad_image", str(exc)) from None
        return JSONResponse(info.to_json(), status_code=201, headers={"Location": f"/api/avatars/{info.id}"})

    @app.get("/api/avatars/{avatar_id}", tags=["avatars"], summary="One avatar", response_model=None,
             responses={200: doc.ok(doc.Avatar, "The avatar"), **doc.errors(401, (404, NO_AVATAR))})
    async def get_avatar(request: Request, avatar_id: str = doc.avatar_id_path()) -> dict:
        authorize(request)
        return avatar_or_404(avatar_id).to_json()

    @app.get("/api/avatars/{avatar_id}/portrait.png", tags=["avatars"], summary="The cropped portrait",
             response_class=Response,
             responses={200: doc.png("The portrait at the model's output size"), **doc.errors(401, (404, NO_AVATAR))})
    async def get_portrait(request: Request, avatar_id: str = doc.avatar_id_path()) -> Response:
        authorize(request)  # the page fetches it with the header and shows a blob: URL
        avatar_or_404(avatar_id)
        try:
            return Response(await avatars.portrait_png(avatar_id), media_type="image/png")
        except (AvatarNotFound, FileNotFoundError):  # deleted by a concurrent request
            raise ApiError(404, "unknown_avatar", f"no avatar {avatar_id!r}") from None

    @app.delete("/api/avatars/{avatar_id}", tags=["avatars"], status_code=204, summary="Delete an avatar",
                response_class=Response, responses=doc.errors(
                    401, (404, NO_AVATAR), (409, "The bundled avatars cannot be deleted (`builtin_avatar`)")))
    async def delete_avatar(request: Request, avatar_id: str = doc.avatar_id_path()) -> Response:
        authorize(request)
        avatar_or_404(avatar_id)
        try:
            await avatars.delete(avatar_id)
        except PermissionError as exc:
            raise ApiError(409, "builtin_avatar", str(exc)) from None
        except AvatarNotFound:  # deleted by a concurrent request
            raise ApiError(404, "unknown_avatar", f"no avatar {avatar_id!r}") from None
        engine.remove_avatar(avatar_id)  # sessions already using it keep their shared reference until they end
        return Response(status_code=204)

    # ---- sessions (WHIP-style) ----------------------------------------------------------------------------------

    async def open_session(offer: str, avatar_id: str, mode: str, on_closed=None):
        avatar_or_404(avatar_id)
        try:
            return await sessions.create(offer, avatar_id, mode, on_closed)
        except AvatarNotFound:  # deleted by a concurrent request
            raise ApiError(404, "unknown_avatar", f"no avatar {avatar_id!r}") from None
        except ServerFull:
            raise ApiError(503, "server_full", f"all {settings.max_sessions} sessions are in use; retry later",
                           {"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except EmoteError as exc:
            raise ApiError(400, "bad_offer", str(exc)) from None

    @app.post("/api/sessions", tags=["sessions"], status_code=201, summary="Start a session from an SDP offer (WHIP)",
              response_class=Response, openapi_extra=doc.sdp_offer_body(),
              responses={201: doc.session_created(), **doc.errors(
                  (400, "The offer is not a usable SDP offer for this mode (`bad_offer`)"), 401,
                  (404, "No avatar with this id (`unknown_avatar`)"), 413, 415, 422,
                  *([429] if settings.session_rate_per_min > 0 else []), 503)})
    async def create_session(request: Request,
                             avatar: str = Query("default", max_length=64, description="The avatar's id",
                                                 json_schema_extra={"pattern": doc.AVATAR_ID_PATTERN}),
                             mode: Literal["mic", "presenter"] = Query(
                                 "mic", description="`mic`: the page's microphone drives the avatar; `presenter`: "
                                 "audio pushed to /api/sessions/{id}/audio does, and the page hears it")) -> Response:
        authorize(request)
        admit(session_rate, request, "new sessions")
        if not request.headers.get("content-type", "").startswith("application/sdp"):
            raise ApiError(415, "unsupported_media_type", "send the offer as application/sdp")
        body = await request.body()
        try:
            offer = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "bad_offer", "the SDP offer is not UTF-8") from None
        session, answer = await open_session(offer, avatar, mode)
        return Response(answer, status_code=201, media_type="application/sdp",
                        headers={"Location": f"/api/sessions/{session.id}", doc.SESSION_ID_HEADER: session.id})

    @app.get("/api/sessions", tags=["sessions"], summary="Sessions now connected (e.g. for a presenter backend "
             "to find the viewer session it should drive)", response_model=None,
             responses={200: doc.ok(list[doc.SessionSummary], "The sessions"), **doc.errors(401)})
    async def list_sessions(request: Request) -> list[dict]:
        authorize(request)
        return [{"session": s.id, "mode": s.mode, "avatar": s.avatar_id, "location": f"/api/sessions/{s.id}"}
                for s in sessions.sessions.values()]

    def session_or_404(session_id: str):
        try:
            return sessions.get(session_id)
        except SessionNotFound:
            raise ApiError(404, "unknown_session", f"no session {session_id[:64]!r}") from None

    @app.get("/api/sessions/{session_id}", tags=["sessions"], summary="Live statistics of a session",
             response_model=None,
             responses={200: doc.ok(doc.SessionStats, "The statistics"), **doc.errors(401, (404, NO_SESSION))})
    async def session_stats(request: Request, session_id: str = doc.session_id_path()) -> dict:
        authorize(request)
        return session_or_404(session_id).stats()

    @app.post("/api/sessions/{session_id}/interrupt", tags=["sessions"], status_code=204, response_class=Response,
              summary="Barge-in: drop queued audio and close the mouth", responses=doc.errors(401, (404, NO_SESSION)))
    async def interrupt_session(request: Request, session_id: str = doc.session_id_path()) -> Response:
        authorize(request)
        session_or_404(session_id).interrupt()
        return Response(status_code=204)

    @app.delete("/api/sessions/{session_id}", tags=["sessions"], status_code=204, response_class=Response,
                summary="End a session", responses=doc.errors(401, (404, NO_SESSION)))
    async def delete_session(request: Request, session_id: str = doc.session_id_path()) -> Response:
        authorize(request)
        session_or_404(session_id)
        await sessions.close(session_id, "deleted")
        return Response(status_code=204)

    # ---- presenter audio ----------------------------------------------------------------------------------------

    @app.websocket("/api/sessions/{session_id}/audio")
    async def presenter_audio(websocket: WebSocket, session_id: str, rate: int = 16000, channels: int = 1,
                              token: str | None = None) -> None:
        """Binary messages: s16le PCM at `rate` Hz with `channels` interleaved. Text messages: JSON
        `{"type": "interrupt"}` or `{"type": "end_of_speech"}`. Errors close with code 4400/4401/4403/4404/4409."""
        await websocket.accept()
        if not await guard_websocket(websocket, token):
            return
        session = sessions.sessions.get(session_id)
        if session is None:
            return await _ws_fail(websocket, 4404, "unknown_session", f"no session {session_id[:64]!r}")
        if session.mode != "presenter":
            return await _ws_fail(websocket, 4409, "wrong_mode", "audio can only be pushed to presenter sessions")
        if not 8000 <= rate <= 96000 or channels not in (1, 2):
            return await _ws_fail(websocket, 4400, "bad_format", "rate must be 8000..96000 and channels 1 or 2")
        frame_bytes = 2 * channels
        closed = asyncio.create_task(session.closed.wait())
        try:
            while True:
                receive = asyncio.create_task(websocket.receive())
                done, _ = await asyncio.wait({receive, closed}, return_when=asyncio.FIRST_COMPLETED)
                if closed in done:
                    receive.cancel()
                    return await _ws_fail(websocket, 4410, "session_closed", f"session ended: {session.close_reason}")
                message = receive.result()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    data = message["bytes"]
                    if len(data) % frame_bytes:
                        return await _ws_fail(websocket, 4400, "bad_framing",
                                              f"{len(data)} bytes is not a whole number of {frame_bytes}-byte frames")
                    if len(data) > WS_MESSAGE_LIMIT:
                        return await _ws_fail(websocket, 4400, "too_large", f"messages are limited to {WS_MESSAGE_LIMIT} bytes")
                    session.push_audio(data, rate, channels)
                else:
                    control = _parse_control(message.get("text"))
                    if control is None or control.get("type") not in ("interrupt", "end_of_speech"):
                        return await _ws_fail(websocket, 4400, "bad_message",
                                              'text messages must be {"type": "interrupt"} or {"type": "end_of_speech"}')
                    session.interrupt() if control["type"] == "interrupt" else session.end_of_speech()
        except WebSocketDisconnect:
            return
        finally:
            closed.cancel()

    # ---- browser signaling --------------------------------------------------------------------------------------

    @app.websocket("/ws")
    async def signaling(websocket: WebSocket, token: str | None = None) -> None:
        await websocket.accept()
        if not await guard_websocket(websocket, token):
            return

        async def open_limited(offer: str, avatar_id: str, mode: str, on_closed=None):
            admit(session_rate, websocket, "new sessions")
            return await open_session(offer, avatar_id, mode, on_closed)

        await SignalingChannel(websocket, open_limited, sessions).run()

    if settings.static_dir.is_dir():
        app.mount("/", StaticFiles(directory=settings.static_dir, html=True), name="client")
    return app


def _parse_control(text: str | None) -> dict | None:
    if not text or len(text) > WS_MESSAGE_LIMIT:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def _ws_fail(websocket: WebSocket, code: int, error: str, message: str) -> None:
    with contextlib.suppress(Exception):
        await websocket.send_json({"type": "error", **error_body(error, message)})
        await websocket.close(code=code, reason=message[:120])


class SignalingChannel:
    """One browser tab. Messages (JSON):
    client -> server: {"type": "offer", "sdp", "avatar"?, "mode"?}, {"type": "ice", "candidate": {...} | null}
                      (trickled after the offer), {"type": "interrupt"}, {"type": "avatar", "avatar"} (before the
                      offer), {"type": "ping"}
    server -> client: {"type": "answer", "sdp", "session"}, {"type": "stats", ...} every second,
                      {"type": "pong"}, {"type": "error", "error", "message"}, {"type": "closed", "reason"}
    Closing the WebSocket (e.g. the tab) ends the session at once, without waiting for ICE to time out.
    """

    def __init__(self, websocket: WebSocket, open_session, sessions: SessionManager):
        self.ws, self.open_session, self.sessions = websocket, open_session, sessions
        self.session = None
        self.avatar = "default"
        self.stats_task: asyncio.Task | None = None

    async def send(self, message: dict) -> None:
        with contextlib.suppress(Exception):
            await self.ws.send_json(message)

    async def error(self, code: str, message: str) -> None:
        await self.send({"type": "error", **error_body(code, message)})

    async def run(self) -> None:
        try:
            while True:
                received = await self.ws.receive()
                if received["type"] == "websocket.disconnect":
                    return
                message = _parse_control(received.get("text"))
                if message is None or not isinstance(message.get("type"), str):
                    await self.error("bad_message", "messages must be JSON objects with a string `type`")
                    continue
                await self.handle(message)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            if self.stats_task is not None:
                self.stats_task.cancel()
            if self.session is not None:
                await self.sessions.close(self.session.id, "signaling closed")

    async def handle(self, message: dict) -> None:
        kind = message["type"]
        if kind == "ping":
            await self.send({"type": "pong", "t": message.get("t")})
        elif kind == "avatar":
            if self.session is not None:
                await self.error("bad_state", "the avatar is chosen before the offer")
            elif not isinstance(message.get("avatar"), str):
                await self.error("bad_message", "`avatar` must be a string id")
            else:
                self.avatar = message["avatar"]
        elif kind == "offer":
            await self.offer(message)
        elif kind == "ice":
            if self.session is None:
                await self.error("bad_state", "send ICE candidates after the offer")
            elif not isinstance(message.get("candidate"), (dict, type(None))):
                await self.error("bad_message", "`candidate` must be an object (RTCIceCandidate.toJSON()) or null")
            else:
                try:
                    await add_remote_candidate(self.session.pc, message["candidate"])
                except EmoteError as exc:
                    await self.error("bad_candidate", str(exc))
        elif kind == "interrupt":
            if self.session is None:
                await self.error("bad_state", "no session to interrupt")
            else:
                self.session.interrupt()
        else:
            await self.error("bad_message", f"unknown message type {kind[:32]!r}")

    async def offer(self, message: dict) -> None:
        if self.session is not None:
            return await self.error("bad_state", "this connection already has a session")
        sdp, avatar, mode = message.get("sdp"), message.get("avatar", self.avatar), message.get("mode", "mic")
        if not isinstance(sdp, str) or not isinstance(avatar, str) or not isinstance(mode, str):
            return await self.error("bad_message", "`sdp`, `avatar` and `mode` must be strings")
        try:
            session, answer = await self.open_session(sdp, avatar, mode, on_closed=self.on_closed)
        except ApiError as exc:
            extra = {"retry_after": int(exc.headers["Retry-After"])} if "Retry-After" in exc.headers else {}
            return await self.send({"type": "error", **error_body(exc.code, exc.message), "status": exc.status, **extra})
        self.session = session
        await self.send({"type": "answer", "sdp": answer, "session": session.id})
        self.stats_task = asyncio.create_task(self.push_stats())

    def on_closed(self, session) -> None:
        asyncio.get_running_loop().create_task(self.send({"type": "closed", "reason": session.close_reason}))

    async def push_stats(self) -> None:
        while self.session is not None and not self.session.closed.is_set():
            await asyncio.sleep(1.0)
            await self.send({"type": "stats", **self.session.stats()})
