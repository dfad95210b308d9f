"""The reference bank as a first-class object: computed once per portrait, reused by every window and step."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import EmoteError


@dataclass
class ReferenceCache:
    """ReferenceNet features of one portrait.

    bank:      per UNet slot, the self-attention inputs (1, HW, C), or None where the slot has no spatial attention.
    motion:    per UNet slot, the portrait's slot outputs (1, C, h, w): the motion-frame features of the first window.
    latent:    the portrait latent (1, C, h, w).
    face_mask: the face-region mask (1, 1, H, W) fed to the face locator.
    model_id:  fingerprint of the model that computed it; a cache only fits that model.
    refiner:   the portrait's features for the model's PortraitRefiner, full resolution first (empty without one).
    """

    bank: list[torch.Tensor | None]
    motion: list[torch.Tensor]
    latent: torch.Tensor
    face_mask: torch.Tensor
    model_id: str
    refiner: list[torch.Tensor] = field(default_factory=list)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "ReferenceCache":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return ReferenceCache(
            bank=[move(t) for t in self.bank],
            motion=[move(t) for t in self.motion],
            latent=move(self.latent),
            face_mask=move(self.face_mask),
            model_id=self.model_id,
            refiner=[move(t) for t in self.refiner],
        )

    @property
    def device(self) -> torch.device:
        return self.latent.device

    @property
    def nbytes(self) -> int:
        tensors = [t for t in (*self.bank, *self.motion, self.latent, self.face_mask, *self.refiner) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def save(self, path: str | Path) -> None:
        """Atomic write (temp file + rename) of a safetensors file."""
        path = Path(path)
        tensors = {"latent": self.latent, "face_mask": self.face_mask}
        tensors.update({f"bank.{i}": t for i, t in enumerate(self.bank) if t is not None})
        tensors.update({f"motion.{i}": t for i, t in enumerate(self.motion)})
        tensors.update({f"refiner.{i}": t for i, t in enumerate(self.refiner)})
        metadata = {"model_id": self.model_id, "slots": str(len(self.motion)), "refiner_levels": str(len(self.refiner))}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | Path, expected_model_id: str | None = None) -> "ReferenceCache":
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
            slots = int(metadata["slots"])
            cache = cls(
                bank=[tensors.get(f"bank.{i}") for i in range(slots)],
                motion=[tensors[f"motion.{i}"] for i in range(slots)],
                latent=tensors["latent"],
                face_mask=tensors["face_mask"],
                model_id=metadata["model_id"],
                refiner=[tensors[f"refiner.{i}"] for i in range(int(metadata.get("refiner_levels", 0)))],
            )
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            raise EmoteError(f"cannot read reference cache {path}: {exc}") from exc
        if expected_model_id is not None and cache.model_id != expected_model_id:
            raise EmoteError(f"reference cache {path} was computed by another model ({cache.model_id[:12]})")
        return cache


def stack_banks(caches: list[ReferenceCache]) -> list[torch.Tensor | None]:
    """Per slot, the banks of several portraits stacked on the batch axis (B, HW, C)."""
    return [None if slot[0] is None else torch.cat(slot, dim=0) for slot in zip(*(c.bank for c in caches))]
