"""Avatars: uploaded portraits, cropped to the face, with their reference cache persisted beside them.

Layout under `<data_dir>/avatars/<id>/`: `portrait.png` (the model-resolution crop), `reference.safetensors`,
`avatar.json`. An avatar directory is written whole under a temporary name and renamed into place, so a crash never
leaves half an avatar. Caches made by another model are recomputed on start-up. The bundled default avatar is
always there and cannot be deleted. Reference caches of uploaded avatars are kept in a bounded LRU and reloaded
from disk on demand; uploads are processed one at a time on their own thread, off the event loop.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from avatar.errors import EmoteError
from avatar.media import crop_square, decode_image, load_image, resize
from avatar.pipeline import AvatarPipeline
from avatar.portrait import find_face
from avatar.reference import ReferenceCache
from streaming.session import Avatar

DEFAULT_AVATAR_ID = "default"
DEFAULT_PORTRAIT = Path(__file__).resolve().parents[1] / "avatar" / "assets" / "default_portrait.png"
AVATAR_ID = re.compile(r"^(default|[0-9a-f]{32})$")
CACHED_AVATARS = 32  # uploaded avatars whose reference cache and portrait stay in memory


class AvatarNotFound(KeyError):
    pass


@dataclass(frozen=True)
class AvatarInfo:
    id: str
    name: str
    created: float
    face_detected: bool
    builtin: bool = False

    def to_json(self) -> dict:
        return {**asdict(self), "portrait_url": f"/api/avatars/{self.id}/portrait.png"}


def valid_avatar_id(avatar_id: str) -> bool:
    return bool(AVATAR_ID.match(avatar_id))


class AvatarStore:
    def __init__(self, root: Path, pipeline: AvatarPipeline, default_portrait: Path = DEFAULT_PORTRAIT):
        self.root = root
        self.pipeline = pipeline
        self.default_portrait = default_portrait
        self._infos: dict[str, AvatarInfo] = {}
        self._loaded: OrderedDict[str, Avatar] = OrderedDict()  # LRU; the default avatar is never evicted
        self._default: Avatar | None = None
        self._default_png = b""
        self._lock = asyncio.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="emote-uploads")

    # ---- start-up -----------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Load every stored avatar (recomputing caches from another model) and the bundled default."""
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        self._add_default()
        for directory in sorted(self.root.iterdir()):
            if directory.is_dir() and valid_avatar_id(directory.name) and directory.name != DEFAULT_AVATAR_ID:
                try:
                    self._load_directory(directory)
                except (EmoteError, OSError, ValueError, KeyError) as exc:
                    raise EmoteError(f"avatar {directory} is damaged: {exc}") from exc

    def _add_default(self) -> None:
        image = load_image(self.default_portrait)
        box = find_face(image)
        portrait = resize(crop_square(image, box), self.pipeline.resolution)
        self._default = Avatar(DEFAULT_AVATAR_ID, self.pipeline.prepare_reference(portrait), portrait)
        self._infos[DEFAULT_AVATAR_ID] = AvatarInfo(DEFAULT_AVATAR_ID, "Default", 0.0, box is not None, builtin=True)
        self._default_png = _png(portrait)

    def _load_directory(self, directory: Path) -> None:
        """Check a stored avatar at start-up, recomputing its cache if another model made it."""
        info = AvatarInfo(**json.loads((directory / "avatar.json").read_text()))
        self._remember(self._read_avatar(info.id))
        self._infos[info.id] = info

    def _read_avatar(self, avatar_id: str) -> Avatar:
        directory = self.root / avatar_id
        portrait = resize(np.asarray(Image.open(directory / "portrait.png").convert("RGB")), self.pipeline.resolution)
        cache_path = directory / "reference.safetensors"
        try:
            cache = ReferenceCache.load(cache_path, expected_model_id=self.pipeline.model_id)
            cache = cache.to(self.pipeline.device, self.pipeline.dtype)  # safetensors loads onto the CPU
        except EmoteError:  # made by another model: recompute from the stored crop
            cache = self.pipeline.prepare_reference(portrait)
            cache.save(cache_path)
        return Avatar(avatar_id, cache, portrait)

    # ---- queries ------------------------------------------------------------------------------------------------

    def list(self) -> list[AvatarInfo]:
        return sorted(self._infos.values(), key=lambda i: (not i.builtin, i.created))

    def info(self, avatar_id: str) -> AvatarInfo:
        if avatar_id not in self._infos:
            raise AvatarNotFound(avatar_id)
        return self._infos[avatar_id]

    async def streaming_avatar(self, avatar_id: str) -> Avatar:
        """What the streaming engine needs: the shared, read-only reference cache and the portrait shown before the
        first frame. Loaded from disk (off the event loop) when it is not among the recently used."""
        self.info(avatar_id)
        if avatar_id == DEFAULT_AVATAR_ID:
            return self._default
        if avatar_id not in self._loaded:
            avatar = await asyncio.get_running_loop().run_in_executor(self._worker, self._read_avatar, avatar_id)
            self._remember(avatar)
        self._loaded.move_to_end(avatar_id)
        return self._loaded[avatar_id]

    def _remember(self, avatar: Avatar) -> None:
        self._loaded[avatar.avatar_id] = avatar
        while len(self._loaded) > CACHED_AVATARS:
            self._loaded.popitem(last=False)

    async def portrait_png(self, avatar_id: str) -> bytes:
        self.info(avatar_id)
        if avatar_id == DEFAULT_AVATAR_ID:
            return self._default_png
        return await asyncio.get_running_loop().run_in_executor(None, (self.root / avatar_id / "portrait.png").read_bytes)

    def __len__(self) -> int:
        return len(self._infos)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    # ---- changes ------------------------------------------------------------------------------------------------

    async def create(self, data: bytes, name: str) -> AvatarInfo:
        """Validate and crop an uploaded image, compute its reference cache once, persist it atomically."""
        avatar_id = uuid.uuid4().hex
        # One upload at a time on the store's own thread: decoding a large image, finding the face and the
        # ReferenceNet stay off the event loop and out of the default executor that aiortc encodes video on.
        avatar, face_found = await asyncio.get_running_loop().run_in_executor(self._worker, self._prepare, avatar_id, data)
        info = AvatarInfo(avatar_id, name[:80] or "Avatar", time.time(), face_found)
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(self._worker, self._write, info, avatar)
            self._infos[info.id] = info
            self._remember(avatar)
        return info

    def _prepare(self, avatar_id: str, data: bytes) -> tuple[Avatar, bool]:
        image = decode_image(data, "upload")
        if min(image.shape[:2]) < 64:
            raise EmoteError(f"upload is too small ({image.shape[1]}x{image.shape[0]}); at least 64x64 pixels")
        box = find_face(image)
        portrait = resize(crop_square(image, box), self.pipeline.resolution)
        return Avatar(avatar_id, self.pipeline.prepare_reference(portrait), portrait), box is not None

    def _write(self, info: AvatarInfo, avatar: Avatar) -> None:
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        try:
            Image.fromarray(avatar.portrait).save(tmp / "portrait.png")
            avatar.reference.save(tmp / "reference.safetensors")
            (tmp / "avatar.json").write_text(json.dumps(asdict(info)) + "\n")
            os.replace(tmp, self.root / info.id)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def delete(self, avatar_id: str) -> None:
        if self.info(avatar_id).builtin:
            raise PermissionError("the bundled default avatar cannot be deleted")
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
