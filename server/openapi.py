"""What /openapi.json says about each route, kept true to what the server does: the error body, every status a route
can answer with (and the headers that come with it), the response bodies, the links that chain create -> use ->
delete, and request bodies a client can build (a real SDP offer as the example, the portrait upload form).

The description is checked against a running server by schemathesis (tests/test_openapi.py)."""
from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import FastAPI, Path
from pydantic import BaseModel, ConfigDict, Field

from .avatars import AVATAR_ID

BEARER_SCHEME = "bearerAuth"
SESSION_ID_HEADER = "X-Session-Id"
AVATAR_ID_PATTERN = AVATAR_ID.pattern
SESSION_ID_PATTERN = r"^[0-9a-f]{32}$"
SDP_MAX_LENGTH = 64 * 1024
# Necessary, not sufficient: the server parses the rest (see the request body's description).
SDP_PATTERN = r"^\s*v=0[\r\n][\s\S]*[\r\n]m=video "
UPLOAD_MEDIA_TYPES = "image/png, image/jpeg, image/webp"

# An offer made by aiortc (RTCPeerConnection with a recvonly video and a sendrecv audio transceiver), trimmed to one
# codec family each, its host candidates removed (ICE candidates can follow over the signaling WebSocket). It is
# good for both modes: a mic session needs the audio it sends, a presenter session the audio it receives.
_FINGERPRINT = "10:E4:22:7D:5B:10:7F:03:CF:51:9C:AB:E4:E2:50:52:4B:71:F3:9E:9C:96:87:C5:31:F1:CA:D1:1C:5B:DA:CB"
SDP_OFFER_EXAMPLE = "\r\n".join((
    "v=0",
    "o=- 4005660712 4005660712 IN IP4 0.0.0.0",
    "s=-",
    "t=0 0",
    "a=group:BUNDLE 0 1",
    "a=msid-semantic:WMS *",
    "m=video 9 UDP/TLS/RTP/SAVPF 97 98",
    "c=IN IP4 0.0.0.0",
    "a=recvonly",
    "a=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid",
    "a=extmap:3 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
    "a=mid:0",
    "a=msid:813b308e-a156-4793-ac7b-2f12ba18d881 51f56d24-bb25-48e4-a2ed-8bf763474e9e",
    "a=rtcp:9 IN IP4 0.0.0.0",
    "a=rtcp-mux",
    "a=ssrc-group:FID 3368369245 3420157977",
    "a=ssrc:3368369245 cname:b26e1ca0-7426-4a27-babf-32c0e4e03f12",
    "a=ssrc:3420157977 cname:b26e1ca0-7426-4a27-babf-32c0e4e03f12",
    "a=rtpmap:97 VP8/90000",
    "a=rtcp-fb:97 nack",
    "a=rtcp-fb:97 nack pli",
    "a=rtcp-fb:97 goog-remb",
    "a=rtpmap:98 rtx/90000",
    "a=fmtp:98 apt=97",
    "a=ice-ufrag:4GWz",
    "a=ice-pwd:FmxTFzBiTvGUrpyK4cK7qT",
    "a=fingerprint:sha-256 " + _FINGERPRINT,
    "a=setup:actpass",
    "m=audio 9 UDP/TLS/RTP/SAVPF 96 0 8",
    "c=IN IP4 0.0.0.0",
    "a=sendrecv",
    "a=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid",
    "a=extmap:2 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    "a=mid:1",
    "a=msid:813b308e-a156-4793-ac7b-2f12ba18d881 ce42b8f4-83dc-4895-99d7-0705da0d6a93",
    "a=rtcp:9 IN IP4 0.0.0.0",
    "a=rtcp-mux",
    "a=ssrc:4251748327 cname:b26e1ca0-7426-4a27-babf-32c0e4e03f12",
    "a=rtpmap:96 opus/48000/2",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:8 PCMA/8000",
    "a=ice-ufrag:4GWz",
    "a=ice-pwd:FmxTFzBiTvGUrpyK4cK7qT",
    "a=fingerprint:sha-256 " + _FINGERPRINT,
    "a=setup:actpass",
    "",
))


# ---- bodies -------------------------------------------------------------------------------------------------------

class ErrorBody(BaseModel):
    """Every error the HTTP API answers with."""

    error: str = Field(description="A stable code for programs, e.g. `unknown_avatar`", examples=["unknown_avatar"])
    message: str = Field(description="What went wrong, for a person")


class Health(BaseModel):
    """Without a valid token only `status`: liveness probes learn nothing more."""

    status: Literal["ok"]
    sessions: int | None = None
    engine_sessions: int | None = None
    model_errors: int | None = None
    max_sessions: int | None = None
    model: str | None = None
    width: int | None = None
    height: int | None = None


class IceServer(BaseModel):
    urls: str
    username: str | None = None
    credential: str | None = None


class ClientConfig(BaseModel):
    ice_servers: list[IceServer] = Field(description="Empty without a valid token: they may carry TURN credentials")
    ice_servers_ttl: int | None = Field(description="Seconds the TURN credentials in `ice_servers` stay valid")
    auth_required: bool
    authorized: bool = Field(description="Whether the request carried a valid token")
    width: int
    height: int
    max_upload_bytes: int


class Avatar(BaseModel):
    id: str = Field(pattern=AVATAR_ID_PATTERN)
    name: str
    created: float = Field(description="Unix time of the upload; 0 for the bundled avatars")
    builtin: bool
    portrait_url: str


class SessionSummary(BaseModel):
    session: str = Field(pattern=SESSION_ID_PATTERN)
    mode: Literal["mic", "presenter"]
    avatar: str = Field(pattern=AVATAR_ID_PATTERN)
    location: str


class SessionStats(BaseModel):
    """A session's live statistics; the streaming engine's counters and latency percentiles come with it."""

    model_config = ConfigDict(extra="allow")

    session: str = Field(pattern=SESSION_ID_PATTERN)
    mode: Literal["mic", "presenter"]
    avatar: str = Field(pattern=AVATAR_ID_PATTERN)
    age_s: float
    video_queue_dropped: int


def ok(model: Any, description: str) -> dict[str, Any]:
    """A JSON response described by a model that only documents: the handler's answer is sent as it is."""
    return {"model": model, "description": description}


def text(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


def png(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}


def optional_token() -> dict[str, Any]:
    """A route that answers without the token and says more with it (never 401)."""
    return {"security": [{}, {BEARER_SCHEME: []}]}


# ---- parameters ---------------------------------------------------------------------------------------------------

# The patterns are documented, not enforced by FastAPI: an id that does not match names no resource, and the
# routes answer 404 for it, as for an unknown one.
def avatar_id_path() -> Any:
    return Path(description="`default`, `drawn` or the 32 hex digits of an upload",
                json_schema_extra={"pattern": AVATAR_ID_PATTERN}, examples=["default"])


def session_id_path() -> Any:
    return Path(description="The 32 hex digits the session was created with (`X-Session-Id`)",
                json_schema_extra={"pattern": SESSION_ID_PATTERN})


# ---- statuses -----------------------------------------------------------------------------------------------------

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again", "required": True,
                                "schema": {"type": "integer", "minimum": 1}}}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "`Bearer`", "required": True,
                                          "schema": {"type": "string", "const": "Bearer"}}}

_STATUSES: dict[int, tuple[str, dict[str, Any]]] = {
    400: ("The request is malformed", {}),
    401: ("A valid token is required: `Authorization: Bearer <token>` (`unauthorized`)", _WWW_AUTHENTICATE),
    404: ("No such resource", {}),
    409: ("The request conflicts with the resource's state", {}),
    413: ("The body is over the size limit (`too_large`); the limit applies while it streams in", {}),
    415: ("The body is not of the documented media type (`unsupported_media_type`)", {}),
    422: ("A parameter breaks the schema (`invalid_request`)", {}),
    429: ("Too many requests from this client (`rate_limited`); see `Retry-After`", _RETRY_AFTER),
    503: ("All sessions are in use (`server_full`); see `Retry-After`", _RETRY_AFTER),
}


def errors(*statuses: int | tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries with the error body for each status, e.g. `errors(401, (404, "No avatar ..."))`."""
    responses: dict[int | str, dict[str, Any]] = {}
    for entry in statuses:
        status, description = entry if isinstance(entry, tuple) else (entry, _STATUSES[entry][0])
        response: dict[str, Any] = {"model": ErrorBody, "description": description}
        if _STATUSES[status][1]:
            response["headers"] = _STATUSES[status][1]
        responses[status] = response
    return responses


def avatar_created() -> dict[str, Any]:
    """The 201 of an upload, linked to the operations that use and delete the new avatar."""
    link = {"parameters": {"avatar_id": "$response.body#/id"}}
    return {"model": Avatar, "description": "The new avatar",
            "headers": {"Location": {"description": "The avatar's URL", "required": True,
                                     "schema": {"type": "string", "pattern": r"^/api/avatars/[0-9a-f]{32}$"}}},
            "links": {"GetAvatar": {"operationId": "get_avatar", **link},
                      "GetPortrait": {"operationId": "get_portrait", **link},
                      "DeleteAvatar": {"operationId": "delete_avatar", **link}}}


def session_created() -> dict[str, Any]:
    """The 201 of a WHIP offer: the SDP answer, the session's id in a header, linked to the session's operations."""
    link = {"parameters": {"session_id": f"$response.header.{SESSION_ID_HEADER}"}}
    return {"description": "The SDP answer",
            "content": {"application/sdp": {"schema": {"type": "string", "pattern": r"^v=0\r?\n"}}},
            "headers": {"Location": {"description": "The session's URL (WHIP)", "required": True,
                                     "schema": {"type": "string", "pattern": r"^/api/sessions/[0-9a-f]{32}$"}},
                        SESSION_ID_HEADER: {"description": "The session's id", "required": True,
                                            "schema": {"type": "string", "pattern": SESSION_ID_PATTERN}}},
            "links": {"GetSession": {"operationId": "session_stats", **link},
                      "InterruptSession": {"operationId": "interrupt_session", **link},
                      "DeleteSession": {"operationId": "delete_session", **link}}}


# ---- request bodies -----------------------------------------------------------------------------------------------

def sdp_offer_body() -> dict[str, Any]:
    return {"requestBody": {"required": True, "description": (
        "A WebRTC SDP offer (as `RTCPeerConnection.createOffer()` makes it), UTF-8, at most 64 KiB (a larger body "
        "gets 413). The server parses it: every media section with a port needs `a=fingerprint`; it must receive "
        "video (a `recvonly` or `sendrecv` video section); a `mic` session needs an audio section that sends "
        "(`sendonly`/`sendrecv`), a `presenter` session one that receives (`recvonly`/`sendrecv`). An offer that "
        "breaks these gets 400 `bad_offer`."),
        "content": {"application/sdp": {"schema": {"type": "string", "pattern": SDP_PATTERN,
                                                   "maxLength": SDP_MAX_LENGTH},
                                        "example": SDP_OFFER_EXAMPLE}}}}


def portrait_upload_body(max_upload_bytes: int) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["image"], "additionalProperties": False, "properties": {
            "image": {"type": "string", "format": "binary", "description": (
                f"The portrait: an image Pillow decodes (PNG, JPEG, WebP, ...), at least 64x64 pixels, at most "
                f"{max_upload_bytes} bytes. Other bytes get 422 `bad_image`, a larger file 413.")},
            "name": {"type": "string", "description": "Shown in the avatar list (80 characters are kept); "
                                                      "default: the file's name"}}},
        "encoding": {"image": {"contentType": UPLOAD_MEDIA_TYPES}}}}}}


# ---- the finished description -------------------------------------------------------------------------------------

def install(app: FastAPI, *, auth: bool) -> None:
    """Finish FastAPI's description on first use: the bearer scheme on every route that documents 401 (none when
    the server runs without a token, and then no 401 either), and none of FastAPI's generic 422s: the routes that
    validate parameters document their own 422, with the error body the server really sends."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _finish(build(), auth)
        return app.openapi_schema

    app.openapi = openapi


def _finish(schema: dict[str, Any], auth: bool) -> None:
    components = schema.setdefault("components", {})
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.get("responses", {})
            validation = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if validation.get("$ref", "").endswith("/HTTPValidationError"):
                del responses["422"]  # FastAPI's default for routes with parameters; ours use `errors(422)`
            if not auth:
                responses.pop("401", None)
                operation.pop("security", None)
            elif "401" in responses:
                operation["security"] = [{BEARER_SCHEME: []}]
    schemas = components.get("schemas", {})
    if "HTTPValidationError" in schemas and '"#/components/schemas/HTTPValidationError"' not in json.dumps(schema):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
    if auth:
        components.setdefault("securitySchemes", {})[BEARER_SCHEME] = {
            "type": "http", "scheme": "bearer",
            "description": "The server's token (`--token`, `EMOTE_TOKEN` or the one `emote serve` prints)"}
