"""Server settings, validated once at start-up."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from avatar.errors import EmoteError

from .security import MIN_TOKEN_LENGTH, normalise_origin, turn_rest_credentials

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "emote-live"
MIN_SIZE, MAX_SIZE = 256, 512  # --size: output frame size in pixels


@dataclass(frozen=True)
class IceServer:
    urls: str
    username: str | None = None
    credential: str | None = None

    @classmethod
    def parse(cls, value: str) -> "IceServer":
        """`stun:host:port` or `turn:user:pass@host:port[?transport=udp]` (credentials optional)."""
        scheme, sep, rest = value.partition(":")
        if not sep or scheme not in ("stun", "stuns", "turn", "turns") or not rest:
            raise EmoteError(f"--ice-server {value!r} must look like stun:HOST:PORT or turn:USER:PASS@HOST:PORT")
        if "@" in rest:
            credentials, host = rest.rsplit("@", 1)
            username, _, credential = credentials.partition(":")
            return cls(urls=f"{scheme}:{host}", username=username or None, credential=credential or None)
        return cls(urls=value)

    def to_browser(self) -> dict:
        entry: dict = {"urls": self.urls}
        if self.username:
            entry["username"] = self.username
        if self.credential:
            entry["credential"] = self.credential
        return entry


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    model: Path | None = None
    device: str = "cpu"
    max_sessions: int = 4
    ice_servers: tuple[IceServer, ...] = ()
    token: str | None = None  # required unless allow_no_auth (`emote serve` makes one in <data-dir>/token)
    allow_no_auth: bool = False  # --no-auth: every route open to whoever reaches the port
    public_metrics: bool = False  # /metrics without the token
    allow_origins: tuple[str, ...] = ()  # browser origins besides the page's own that may open the WebSockets
    turn_secret: str | None = None  # coturn's static-auth-secret: short-lived TURN credentials per client
    turn_urls: tuple[str, ...] = ()  # turn:HOST:PORT the REST credentials are for
    turn_ttl: int = 3600  # seconds the REST credentials stay valid
    max_avatars: int = 100  # uploaded avatars kept (the bundled ones do not count)
    session_rate_burst: int = 10  # new sessions per client at once (WHIP and /ws offers) ...
    session_rate_per_min: float = 30.0  # ... refilled at this rate; 0: no limit
    upload_rate_burst: int = 10
    upload_rate_per_min: float = 20.0
    data_dir: Path = DEFAULT_DATA_DIR
    idle_timeout: float = 300.0  # seconds without media or control activity
    max_duration: float = 3600.0  # seconds, any session
    max_upload_bytes: int = 10 * 2**20
    keyframe_interval: float = 2.0  # seconds between forced keyframes
    tls_cert: Path | None = None
    tls_key: Path | None = None
    refine: bool = False  # pixel model: live frames through its portrait refiner (PixelFrameModel refine)
    size: int | None = None  # output frame size for models that support several; None: the model's
    badge: bool = False  # a visible "AI-generated" mark in a corner of every frame (the invisible mark is always on)
    static_dir: Path = field(default_factory=lambda: Path(__file__).resolve().parents[1] / "client_web")

    def validate(self) -> "Settings":
        if not 1 <= self.port <= 65535:
            raise EmoteError(f"--port must be between 1 and 65535, got {self.port}")
        if self.max_sessions < 1:
            raise EmoteError(f"--max-sessions must be at least 1, got {self.max_sessions}")
        if self.idle_timeout <= 0 or self.max_duration <= 0:
            raise EmoteError("timeouts must be positive")
        if self.token is not None and len(self.token) < MIN_TOKEN_LENGTH:
            raise EmoteError(f"--token must be at least {MIN_TOKEN_LENGTH} characters")
        if self.token is not None and self.allow_no_auth:
            raise EmoteError("--no-auth and a token (--token or EMOTE_TOKEN) exclude each other")
        if bool(self.turn_secret) != bool(self.turn_urls):
            raise EmoteError("--turn-secret (or EMOTE_TURN_SECRET) and --turn-url go together")
        for url in self.turn_urls:
            scheme, _, rest = url.partition(":")
            if scheme not in ("turn", "turns") or not rest or "@" in rest:
                raise EmoteError(f"--turn-url {url!r} must look like turn:HOST:PORT (the credentials are made per client)")
        if not 60 <= self.turn_ttl <= 7 * 86400:
            raise EmoteError(f"--turn-ttl must be between 60 and 604800 seconds, got {self.turn_ttl}")
        for origin in self.allow_origins:
            normalise_origin(origin)
        if self.max_avatars < 0:
            raise EmoteError(f"--max-avatars must be 0 or more, got {self.max_avatars}")
        for name in ("session_rate", "upload_rate"):
            burst, per_min = getattr(self, f"{name}_burst"), getattr(self, f"{name}_per_min")
            if burst < 1 or per_min < 0:
                flag = name.replace("_", "-")
                raise EmoteError(f"--{flag}-burst must be at least 1 and --{flag}-per-min 0 or more")
        if self.size is not None and not MIN_SIZE <= self.size <= MAX_SIZE:
            raise EmoteError(f"--size must be between {MIN_SIZE} and {MAX_SIZE}, got {self.size}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise EmoteError("--tls-cert and --tls-key go together")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not path.is_file():
                raise EmoteError(f"TLS file {path} does not exist")
        return self

    @property
    def auth_required(self) -> bool:
        return not self.allow_no_auth

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(normalise_origin(o) for o in self.allow_origins)

    def ice_server_list(self, now: float | None = None) -> list[IceServer]:
        """The static --ice-server entries, then the --turn-url ones with fresh REST credentials (valid turn_ttl s)."""
        if not self.turn_secret:
            return list(self.ice_servers)
        username, credential = turn_rest_credentials(self.turn_secret, self.turn_ttl, now)
        return [*self.ice_servers, *(IceServer(url, username, credential) for url in self.turn_urls)]

    @property
    def rtc_ice_servers(self) -> list:
        """aiortc RTCIceServer objects, with fresh TURN credentials on every call (each new peer). An empty list on
        purpose when none are set: aiortc's default is a public STUN host, which may be unreachable and only slows
        gathering down."""
        from aiortc import RTCIceServer

        return [RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in self.ice_server_list()]
