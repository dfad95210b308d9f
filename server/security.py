"""The server's guards that need no request: the persisted token, WebSocket origins, per-client rate limits and
short-lived TURN credentials (coturn's `use-auth-secret` REST scheme)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import math
import os
import secrets
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Collection
from urllib.parse import urlsplit

from avatar.errors import EmoteError

MIN_TOKEN_LENGTH = 16
TOKEN_FILE = "token"
TURN_REST_USER = "emote"


# ---- the token --------------------------------------------------------------------------------------------------

def load_or_create_token(data_dir: Path) -> str:
    """The token kept in `<data_dir>/token`, made once (mode 0600, written atomically) so bookmarks keep working
    across restarts. Delete the file to get a new one."""
    path = data_dir / TOKEN_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".tmp-token-")  # mkstemp: mode 0600
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(32) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)  # never replaces a token another process wrote meanwhile
                except FileExistsError:
                    pass
                except OSError:  # file systems without hard links
                    os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
        token = path.read_text().strip()
    except OSError as exc:
        raise EmoteError(f"cannot keep the token in {path}: {exc}") from exc
    if len(token) < MIN_TOKEN_LENGTH:
        raise EmoteError(f"the token in {path} is shorter than {MIN_TOKEN_LENGTH} characters; delete the file to "
                         "make a new one")
    return token


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


def token_matches(supplied: str | None, token: str) -> bool:
    return supplied is not None and hmac.compare_digest(supplied.encode(), token.encode())


# ---- WebSocket origins ------------------------------------------------------------------------------------------

def normalise_origin(value: str) -> str:
    """`scheme://host[:port]`, lower case, as browsers send it in `Origin`; EmoteError for anything else."""
    parts = urlsplit(value.strip().rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query or parts.username:
        raise EmoteError(f"--allow-origin {value!r} must look like https://HOST[:PORT]")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def origin_allowed(origin: str | None, host: str | None, allowed: Collection[str] = ()) -> bool:
    """A browser WebSocket is allowed from the page's own origin or one listed with --allow-origin. Clients
    without `Origin` (not browsers) are allowed: they still need the token.

    The own origin is the `Host` header the browser sent. The scheme is not compared with the server's: behind a
    TLS-terminating proxy the server sees plain http while the page is https."""
    if origin is None:
        return True
    try:
        normalised = normalise_origin(origin)
    except EmoteError:
        return False  # "null" (sandboxed frames, file:// pages) and anything unparsable
    if normalised in allowed:
        return True
    return host is not None and urlsplit(normalised).netloc == host.strip().lower()


# ---- DNS rebinding -----------------------------------------------------------------------------------------------

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """Whether a bind address or a Host header's name is this machine's loopback."""
    name = host.strip().lower().strip("[]")
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name part of a Host header: `[::1]:8080` -> `::1`, `example.com:443` -> `example.com`."""
    host_header = host_header.strip()
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class LoopbackHostOnly:
    """With --no-auth on a loopback address, any web page the user visits could reach the server through a DNS name
    rebound to 127.0.0.1 (the browser then sends that name as Host). Such requests are refused: 400 JSON, or a
    WebSocket closed before it opens."""

    def __init__(self, app, extra_hosts: Collection[str] = ()):
        self.app, self.extra_hosts = app, {h.lower() for h in extra_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host_name(host).lower()
            if not (is_loopback(name) or name in self.extra_hosts):
                if scope["type"] == "websocket":
                    return await send({"type": "websocket.close", "code": 4403, "reason": "bad host"})
                from starlette.responses import JSONResponse

                body = {"error": "bad_host", "message": "without a token this server only answers requests for "
                                                         "localhost (Host header); see --allow-origin"}
                return await JSONResponse(body, status_code=400)(scope, receive, send)
        return await self.app(scope, receive, send)


# ---- rate limits --------------------------------------------------------------------------------------------------

def client_key(host: str) -> str:
    """The rate-limit bucket of a client address: IPv4 as it is, IPv6 by its /64 (one subscriber's whole prefix,
    which a client can otherwise walk through for a fresh bucket per request)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class RateLimiter:
    """A token bucket per client: `burst` requests at once, refilled at `per_min` a minute. `per_min` 0 turns the
    limit off. At most `max_clients` buckets are kept (least recently used dropped: such a client starts full)."""

    def __init__(self, burst: int, per_min: float, max_clients: int = 4096):
        self.burst, self.rate, self.max_clients = burst, per_min / 60.0, max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, when)

    def take(self, client: str, now: float | None = None) -> float:
        """Spend one token for `client`: 0.0 when admitted, else the seconds until one is there again."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, then = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        admitted = tokens >= 1.0
        self._buckets[client] = (tokens - 1.0 if admitted else tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return 0.0 if admitted else (1.0 - tokens) / self.rate

    @staticmethod
    def retry_after(wait: float) -> str:
        return str(max(1, math.ceil(wait)))


# ---- TURN REST credentials --------------------------------------------------------------------------------------

def turn_rest_credentials(secret: str, ttl: int, now: float | None = None, user: str = TURN_REST_USER) -> tuple[str, str]:
    """coturn's `use-auth-secret` scheme: username `<expiry unix time>:<user>`, password
    base64(HMAC-SHA1(secret, username)). coturn refuses the pair once the expiry has passed."""
    expiry = int(time.time() if now is None else now) + ttl
    username = f"{expiry}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")
