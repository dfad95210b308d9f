"""Avatars: uploaded portraits, cropped to the face, with their reference cache persisted beside them.

Layout under `<data_dir>/avatars/<id>/`: `portrait.png` (the model-resolution crop), `reference.safetensors`,
`avatar.json`. An avatar directory is written whole under a temporary name and renamed into place, so a crash never
leaves half an avatar. Caches made by another model are recomputed on start-up. The bundled default avatar is
always there and cannot be deleted.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
import time
import uuid
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
        self._caches: dict[str, ReferenceCache] = {}
        self._infos: dict[str, AvatarInfo] = {}
        self._default_portrait: np.ndarray | None = None
        self._lock = asyncio.Lock()

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
        self._caches[DEFAULT_AVATAR_ID] = self.pipeline.prepare_reference(portrait)
        self._infos[DEFAULT_AVATAR_ID] = AvatarInfo(DEFAULT_AVATAR_ID, "Default", 0.0, box is not None, builtin=True)
        self._default_portrait = portrait

    def _load_directory(self, directory: Path) -> None:
        info = AvatarInfo(**json.loads((directory / "avatar.json").read_text()))
        cache_path = directory / "reference.safetensors"
        try:
            cache = ReferenceCache.load(cache_path, expected_model_id=self.pipeline.model_id)
        except EmoteError:  # made by another model: recompute from the stored crop
            portrait = np.asarray(Image.open(directory / "portrait.png").convert("RGB"))
            cache = self.pipeline.prepare_reference(resize(portrait, self.pipeline.resolution))
            cache.save(cache_path)
        self._caches[info.id] = cache
        self._infos[info.id] = info

    # ---- queries ------------------------------------------------------------------------------------------------

    def list(self) -> list[AvatarInfo]:
        return sorted(self._infos.values(), key=lambda i: (not i.builtin, i.created))

    def info(self, avatar_id: str) -> AvatarInfo:
        if avatar_id not in self._infos:
            raise AvatarNotFound(avatar_id)
        return self._infos[avatar_id]

    def reference(self, avatar_id: str) -> ReferenceCache:
        """The shared, read-only reference cache of an avatar."""
        if avatar_id not in self._caches:
            raise AvatarNotFound(avatar_id)
        return self._caches[avatar_id]

    def streaming_avatar(self, avatar_id: str) -> Avatar:
        """What the streaming engine needs: the shared reference cache and the portrait shown before frame one."""
        reference = self.reference(avatar_id)
        if avatar_id == DEFAULT_AVATAR_ID:
            portrait = self._default_portrait
        else:
            portrait = np.asarray(Image.open(self.root / avatar_id / "portrait.png").convert("RGB"))
        return Avatar(avatar_id, reference, portrait)

    def portrait_png(self, avatar_id: str) -> bytes:
        self.info(avatar_id)
        if avatar_id == DEFAULT_AVATAR_ID:
            import io

            buffer = io.BytesIO()
            Image.fromarray(self._default_portrait).save(buffer, format="PNG")
            return buffer.getvalue()
        return (self.root / avatar_id / "portrait.png").read_bytes()

    def __len__(self) -> int:
        return len(self._infos)

    # ---- changes ------------------------------------------------------------------------------------------------

    async def create(self, data: bytes, name: str) -> AvatarInfo:
        """Validate and crop an uploaded image, compute its reference cache once, persist it atomically."""
        image = decode_image(data, "upload")
        if min(image.shape[:2]) < 64:
            raise EmoteError(f"upload is too small ({image.shape[1]}x{image.shape[0]}); at least 64x64 pixels")
        loop = asyncio.get_running_loop()
        box = await loop.run_in_executor(None, find_face, image)
        portrait = resize(crop_square(image, box), self.pipeline.resolution)
        cache = await loop.run_in_executor(None, self.pipeline.prepare_reference, portrait)
        info = AvatarInfo(uuid.uuid4().hex, name[:80] or "Avatar", time.time(), box is not None)
        async with self._lock:
            await loop.run_in_executor(None, self._write, info, portrait, cache)
            self._caches[info.id] = cache
            self._infos[info.id] = info
        return info

    def _write(self, info: AvatarInfo, portrait: np.ndarray, cache: ReferenceCache) -> None:
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        try:
            Image.fromarray(portrait).save(tmp / "portrait.png")
            cache.save(tmp / "reference.safetensors")
            (tmp / "avatar.json").write_text(json.dumps(asdict(info)) + "\n")
            os.replace(tmp, self.root / info.id)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def delete(self, avatar_id: str) -> None:
        info = self.info(avatar_id)
        if info.builtin:
            raise PermissionError("the bundled default avatar cannot be deleted")
        async with self._lock:
            self._infos.pop(avatar_id, None)
            self._caches.pop(avatar_id, None)
            trash = self.root / f".tmp-{avatar_id}"
            os.replace(self.root / avatar_id, trash)  # one rename: the avatar is gone at once, then cleaned up
            shutil.rmtree(trash, ignore_errors=True)
