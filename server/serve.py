"""`emote serve`: load the model, the avatars and the streaming engine, and run FastAPI on uvicorn."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from avatar.errors import EmoteError

from .security import TOKEN_FILE, load_or_create_token
from .settings import DEFAULT_DATA_DIR, MAX_SIZE, MIN_SIZE, IceServer, Settings


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="run the WebRTC server and the browser client")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--model", type=Path, default=None, help="model directory (default: the bundled model)")
    serve.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    serve.add_argument("--max-sessions", type=int, default=4)
    serve.add_argument("--ice-server", action="append", default=[], metavar="URL",
                       help="stun:HOST:PORT or turn:USER:PASS@HOST:PORT (repeatable)")
    serve.add_argument("--token", default=os.environ.get("EMOTE_TOKEN"),
                       help="bearer token for every API route and WebSocket (default: $EMOTE_TOKEN, else one kept in "
                            "DATA_DIR/token; the start-up line prints the page's URL with it)")
    serve.add_argument("--no-auth", action="store_true", help="serve without any token: anyone who reaches the "
                       "port may use every route")
    serve.add_argument("--public-metrics", action="store_true", help="serve /metrics without the token")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="a browser origin (https://HOST[:PORT]) besides the page's own that may open the "
                            "WebSockets (repeatable)")
    serve.add_argument("--turn-secret", default=os.environ.get("EMOTE_TURN_SECRET"),
                       help="coturn's static-auth-secret (default: $EMOTE_TURN_SECRET): short-lived TURN "
                            "credentials for the --turn-url servers")
    serve.add_argument("--turn-url", action="append", default=[], metavar="URL",
                       help="turn:HOST:PORT[?transport=udp|tcp] that --turn-secret credentials are for (repeatable)")
    serve.add_argument("--turn-ttl", type=int, default=3600, help="seconds TURN credentials stay valid (default 3600)")
    serve.add_argument("--max-avatars", type=int, default=100,
                       help="uploaded avatars kept; further uploads get 409 quota_exceeded (default 100)")
    serve.add_argument("--session-rate-burst", type=int, default=10,
                       help="new sessions one client may open at once (default 10)")
    serve.add_argument("--session-rate-per-min", type=float, default=30.0,
                       help="new sessions per client and minute after the burst; 0: no limit (default 30)")
    serve.add_argument("--upload-rate-burst", type=int, default=10, help="avatar uploads per client at once (default 10)")
    serve.add_argument("--upload-rate-per-min", type=float, default=20.0,
                       help="avatar uploads per client and minute after the burst; 0: no limit (default 20)")
    serve.add_argument("--forwarded-allow-ips", default=None, metavar="IPS",
                       help="proxies whose X-Forwarded-For/-Proto are trusted, comma-separated or * (uvicorn's "
                            "option; default: $FORWARDED_ALLOW_IPS, else 127.0.0.1,::1). Rate limits count per "
                            "client address, so a proxy in front must be trusted")
    serve.add_argument("--data-dir", type=Path, default=Path(os.environ.get("EMOTE_DATA_DIR", DEFAULT_DATA_DIR)))
    serve.add_argument("--idle-timeout", type=float, default=300.0, help="seconds without activity (default 300)")
    serve.add_argument("--max-duration", type=float, default=3600.0, help="seconds per session (default 3600)")
    serve.add_argument("--tls-cert", type=Path, default=None)
    serve.add_argument("--tls-key", type=Path, default=None)
    serve.add_argument("--log-format", choices=("json", "text"), default="json")
    serve.add_argument("--refine", action="store_true",
                       help="pixel model (--model DIR): decode live frames through its portrait refiner (sharper; "
                            "off by default: a 2-core CPU cannot afford it in real time)")
    serve.add_argument("--size", type=int, default=None, metavar="PX",
                       help=f"output frame size, {MIN_SIZE}-{MAX_SIZE} (default: the model's; the pixel model has "
                            "one size only)")
    serve.add_argument("--badge", action="store_true",
                       help='a small visible "AI-generated" badge in a corner of every frame (every frame always '
                            "carries the invisible watermark; `emote detect` finds it)")
    serve.set_defaults(func=run_serve)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Validated settings. Without --token, $EMOTE_TOKEN or --no-auth, the token kept in `<data-dir>/token`
    (made on first use)."""
    settings = Settings(
        host=args.host,
        port=args.port,
        model=args.model,
        device=args.device,
        max_sessions=args.max_sessions,
        ice_servers=tuple(IceServer.parse(url) for url in args.ice_server),
        token=args.token or None,
        allow_no_auth=args.no_auth,
        public_metrics=args.public_metrics,
        allow_origins=tuple(args.allow_origin),
        turn_secret=args.turn_secret or None,
        turn_urls=tuple(args.turn_url),
        turn_ttl=args.turn_ttl,
        max_avatars=args.max_avatars,
        session_rate_burst=args.session_rate_burst,
        session_rate_per_min=args.session_rate_per_min,
        upload_rate_burst=args.upload_rate_burst,
        upload_rate_per_min=args.upload_rate_per_min,
        data_dir=args.data_dir,
        idle_timeout=args.idle_timeout,
        max_duration=args.max_duration,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        refine=args.refine,
        size=args.size,
        badge=args.badge,
    ).validate()
    if settings.token is None and settings.auth_required:  # after validation: a bad option touches no file
        settings = dataclasses.replace(settings, token=load_or_create_token(settings.data_dir))
    return settings


def page_url(settings: Settings, token: str | None = None) -> str:
    """The URL to open, with the token in the fragment (never sent to the server, so never in access logs)."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if settings.tls_cert else "http"
    return f"{scheme}://{host}:{settings.port}/" + (f"#token={token}" if token else "")


class RedactTokens(logging.Filter):
    """Access logs print WebSocket URLs, and browsers can only pass the token in the query string."""

    pattern = re.compile(r"(token=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg, record.args = self.pattern.sub(r"\1***", message), None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any `extra=` fields the caller attached."""

    _standard = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self._standard})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(fmt: str) -> dict:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactTokens())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiortc").setLevel(logging.WARNING)
    # uvicorn's own loggers go through the root handler too.
    return {"version": 1, "disable_existing_loggers": False,
            "loggers": {name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error", "uvicorn.access")}}


def build_app(settings: Settings):
    """Model, avatars, engine and app, ready for uvicorn (also used by the tests)."""
    from avatar.models import load_frame_model
    from avatar.watermark.model import WatermarkedModel
    from streaming.engine import StreamingEngine

    from .app import create_app
    from .avatars import AvatarStore

    model = load_frame_model(settings.model, settings.device, refine=settings.refine, size=settings.size)
    model = WatermarkedModel(model, badge=settings.badge)  # every generated frame is marked; no switch turns it off
    avatars = AvatarStore(settings.data_dir / "avatars", model, max_uploads=settings.max_avatars)
    avatars.load()
    return create_app(settings, StreamingEngine(model), avatars)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = settings_from_args(args)
    log_config = configure_logging(args.log_format)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmoteError(f"cannot create --data-dir {settings.data_dir}: {exc}") from exc
    from avatar.models import use_model_threads

    from .memory import limit_malloc_arenas

    limit_malloc_arenas()  # before the model's and aiortc's threads start (see server/memory.py)
    use_model_threads(settings.device)  # process-wide: once, before the model first runs
    app = build_app(settings)
    logging.getLogger("emote.server").info(f"serving on {page_url(settings)}",
                                           extra={"model": app.state.engine.spec.name,
                                                  "auth": "token" if settings.auth_required else "none"})
    if settings.auth_required and not args.token:
        # stdout, not the log: the log redacts tokens. One line, for a person to open.
        print(f"Open {page_url(settings, settings.token)} (the token is kept in {settings.data_dir / TOKEN_FILE})",
              flush=True)
    from .app import WS_MESSAGE_LIMIT

    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ws="websockets-sansio",
        ws_max_size=WS_MESSAGE_LIMIT,  # larger messages are refused by the protocol layer (close 1009)
        forwarded_allow_ips=args.forwarded_allow_ips,
        log_config=log_config,
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        timeout_graceful_shutdown=10,
    )
    return 0
