"""Server settings, validated once at start-up."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from avatar.errors import EmoteError

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
    token: str | None = None
    allow_no_auth: bool = False
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
        if self.token is not None and len(self.token) < 16:
            raise EmoteError("--token must be at least 16 characters")
        if not self.is_loopback and self.token is None and not self.allow_no_auth:
            raise EmoteError(
                f"binding {self.host} (not loopback) needs --token (or EMOTE_TOKEN); pass --no-auth to serve without one"
            )
        if self.size is not None and not MIN_SIZE <= self.size <= MAX_SIZE:
            raise EmoteError(f"--size must be between {MIN_SIZE} and {MAX_SIZE}, got {self.size}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise EmoteError("--tls-cert and --tls-key go together")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not path.is_file():
                raise EmoteError(f"TLS file {path} does not exist")
        return self

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def rtc_ice_servers(self) -> list:
        """aiortc RTCIceServer objects. An empty list on purpose when none are set: aiortc's default is a public
        STUN host, which may be unreachable and only slows gathering down."""
        from aiortc import RTCIceServer

        return [RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in self.ice_servers]
