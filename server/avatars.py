"""Avatars: uploaded portraits, prepared once by the model, persisted with the model's cache.

Layout under `<data_dir>/avatars/<id>/`: `original` (the uploaded bytes), `portrait.png` (the model's preview at its
output size), `cache/` (what `FrameModel.prepare_avatar` keeps there) and `avatar.json`. An avatar directory is
written whole under a temporary name and renamed into place, so a crash or a refused portrait never leaves half an
avatar. On start-up every stored avatar goes through `prepare_avatar` again, which loads a valid cache and
recomputes one made by another model. The bundled avatars, `default` (scikit-image's public-domain astronaut photo)
and `drawn` (our drawn portrait), are always there and cannot be deleted; their caches live under `.builtin/`.
Prepared avatars are kept in a bounded LRU and reloaded from their caches on demand; uploads are prepared one at a
time on their own thread, off the event loop.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from avatar.errors import EmoteError
from avatar.frame_model import AvatarHandle, FrameModel
from avatar.media import decode_portrait, load_image

logger = logging.getLogger("emote.avatars")

DEFAULT_AVATAR_ID = "default"
DRAWN_PORTRAIT = Path(__file__).resolve().parents[1] / "avatar" / "assets" / "default_portrait.png"
AVATAR_ID = re.compile(r"^(default|drawn|[0-9a-f]{32})$")
CACHED_AVATARS = 32  # uploaded avatars whose prepared state stays in memory
MIN_UPLOAD_SIDE = 64


def astronaut_photo() -> np.ndarray:
    """Eileen Collins, NASA portrait (public domain), shipped inside the scikit-image wheel."""
    from skimage import data

    return np.asarray(data.astronaut(), np.uint8)


def drawn_portrait() -> np.ndarray:
    return load_image(DRAWN_PORTRAIT)


@dataclass(frozen=True)
class Builtin:
    id: str
    name: str
    image: Callable[[], np.ndarray]


BUILTINS = (Builtin(DEFAULT_AVATAR_ID, "Astronaut (photo)", astronaut_photo), Builtin("drawn", "Drawn", drawn_portrait))


class AvatarNotFound(KeyError):
    pass


class QuotaExceeded(Exception):
    """The store holds its maximum of uploaded avatars."""


@dataclass(frozen=True)
class AvatarInfo:
    id: str
    name: str
    created: float
    builtin: bool = False

    def to_json(self) -> dict:
        return {**asdict(self), "portrait_url": f"/api/avatars/{self.id}/portrait.png"}

    @classmethod
    def from_json(cls, data: dict) -> "AvatarInfo":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})  # older files carry face_detected


def valid_avatar_id(avatar_id: str) -> bool:
    return bool(AVATAR_ID.match(avatar_id))


class AvatarStore:
    def __init__(self, root: Path, model: FrameModel, builtins: tuple[Builtin, ...] = BUILTINS,
                 max_uploads: int | None = None):
        self.root = root
        self.model = model
        self.builtins = builtins
        self.max_uploads = max_uploads  # None: no quota
        self._infos: dict[str, AvatarInfo] = {}
        self._loaded: OrderedDict[str, AvatarHandle] = OrderedDict()  # LRU of uploaded avatars
        self._builtin: dict[str, AvatarHandle] = {}
        self._builtin_png: dict[str, bytes] = {}
        self._lock = asyncio.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="emote-uploads")

    # ---- start-up -----------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Prepare the bundled avatars and every stored one (recomputing caches made by another model)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for builtin in self.builtins:
            handle = self.model.prepare_avatar(builtin.id, builtin.image(), self.root / ".builtin" / builtin.id)
            self._builtin[builtin.id] = handle
            self._builtin_png[builtin.id] = _png(handle.preview)
            self._infos[builtin.id] = AvatarInfo(builtin.id, builtin.name, 0.0, builtin=True)
        for directory in sorted(self.root.iterdir()):
            if directory.is_dir() and valid_avatar_id(directory.name) and directory.name not in self._builtin:
                try:
                    info = AvatarInfo.from_json(json.loads((directory / "avatar.json").read_text()))
                    self._remember(self._read_avatar(info.id, refresh_preview=True))
                except (EmoteError, OSError, ValueError, KeyError, TypeError) as exc:
                    # One avatar this model refuses (or a damaged one) must not keep the server from starting: it
                    # stays on disk, unlisted, and the log says why.
                    logger.warning("avatar %s is not served: %s", directory.name, exc)
                    continue
                self._infos[info.id] = info

    def _read_avatar(self, avatar_id: str, refresh_preview: bool = False) -> AvatarHandle:
        directory = self.root / avatar_id
        source = directory / "original"
        if not source.is_file():  # stored before originals were kept: the crop is all there is
            source = directory / "portrait.png"
        image = decode_portrait(source.read_bytes(), f"avatar {avatar_id}")
        handle = self.model.prepare_avatar(avatar_id, image, directory / "cache")
        if refresh_preview:  # the model (or its output size) may have changed since the upload
            _write_atomically(directory / "portrait.png", _png(handle.preview))
        return handle

    # ---- queries ------------------------------------------------------------------------------------------------

    def list(self) -> list[AvatarInfo]:
        return sorted(self._infos.values(), key=lambda i: (not i.builtin, i.created))

    def info(self, avatar_id: str) -> AvatarInfo:
        if avatar_id not in self._infos:
            raise AvatarNotFound(avatar_id)
        return self._infos[avatar_id]

    async def streaming_avatar(self, avatar_id: str) -> AvatarHandle:
        """The prepared avatar the engine needs (shared, read-only). Reloaded from its cache (off the event loop)
        when it is not among the recently used."""
        self.info(avatar_id)
        if avatar_id in self._builtin:
            return self._builtin[avatar_id]
        async with self._lock:  # not while a delete renames the directory away
            if avatar_id not in self._infos:
                raise AvatarNotFound(avatar_id)
            if avatar_id not in self._loaded:
                try:
                    avatar = await asyncio.get_running_loop().run_in_executor(self._worker, self._read_avatar,
                                                                              avatar_id)
                except OSError as exc:
                    raise EmoteError(f"avatar {avatar_id} could not be loaded: {exc}") from exc
                self._remember(avatar)
            self._loaded.move_to_end(avatar_id)
            return self._loaded[avatar_id]

    def _remember(self, avatar: AvatarHandle) -> None:
        self._loaded[avatar.avatar_id] = avatar
        while len(self._loaded) > CACHED_AVATARS:
            self._loaded.popitem(last=False)

    async def portrait_png(self, avatar_id: str) -> bytes:
        self.info(avatar_id)
        if avatar_id in self._builtin_png:
            return self._builtin_png[avatar_id]
        return await asyncio.get_running_loop().run_in_executor(None, (self.root / avatar_id / "portrait.png").read_bytes)

    def __len__(self) -> int:
        return len(self._infos)

    def uploads(self) -> int:
        return sum(not info.builtin for info in self._infos.values())

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    # ---- changes ------------------------------------------------------------------------------------------------

    async def create(self, data: bytes, name: str) -> AvatarInfo:
        """Decode an upload, let the model prepare it once (its cache persisted), store it atomically. A portrait
        the model refuses raises its EmoteError, and nothing is written; a full store raises QuotaExceeded."""
        info = AvatarInfo(secrets.token_hex(16), name[:80] or "Avatar", time.time())
        # One upload at a time on the store's own thread: decoding a large image and the model's analysis stay off
        # the event loop and out of the default executor that aiortc encodes video on.
        async with self._lock:
            if self.max_uploads is not None and self.uploads() >= self.max_uploads:
                raise QuotaExceeded(f"the server keeps at most {self.max_uploads} uploaded avatars; delete one first")
            avatar = await asyncio.get_running_loop().run_in_executor(self._worker, self._prepare, info, data)
            self._infos[info.id] = info
            self._remember(avatar)
        return info

    def _prepare(self, info: AvatarInfo, data: bytes) -> AvatarHandle:
        image = decode_portrait(data, "upload")
        if min(image.shape[:2]) < MIN_UPLOAD_SIDE:
            raise EmoteError(f"upload is too small ({image.shape[1]}x{image.shape[0]}); at least "
                             f"{MIN_UPLOAD_SIDE}x{MIN_UPLOAD_SIDE} pixels")
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        try:
            (tmp / "original").write_bytes(data)
            avatar = self.model.prepare_avatar(info.id, image, tmp / "cache")
            Image.fromarray(avatar.preview).save(tmp / "portrait.png")
            (tmp / "avatar.json").write_text(json.dumps(asdict(info)) + "\n")
            os.replace(tmp, self.root / info.id)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return avatar

    async def delete(self, avatar_id: str) -> None:
        if self.info(avatar_id).builtin:
            raise PermissionError(f"the bundled avatar {avatar_id!r} cannot be deleted")
        async with self._lock:
            if avatar_id not in self._infos:  # a concurrent delete won
                raise AvatarNotFound(avatar_id)
            self._infos.pop(avatar_id)
            self._loaded.pop(avatar_id, None)
            trash = self.root / f".tmp-{avatar_id}"
            os.replace(self.root / avatar_id, trash)  # one rename: the avatar is gone at once, then cleaned up
            shutil.rmtree(trash, ignore_errors=True)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
