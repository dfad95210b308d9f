"""Loading and saving motion backbones (diffusers-style: config.json + diffusion_pytorch_model.safetensors)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from avatar.errors import CheckpointError
from avatar.motion.backbone import MotionBackbone

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "motion"


def load_backbone(path: str | os.PathLike | None = None) -> MotionBackbone:
    """The backbone saved in `path` (default: the shipped model); CheckpointError (an EmoteError) if unusable."""
    root = Path(path) if path is not None else DEFAULT_DIR
    if not (root / "config.json").is_file():
        raise CheckpointError(f"{root}: not a motion model directory (no config.json)")
    try:
        model = MotionBackbone.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{root}: cannot load the motion model ({str(exc).splitlines()[0]})") from None
    return model.eval()


def save_backbone(model: MotionBackbone, path: str | os.PathLike) -> Path:
    """Write the model to `path` atomically (a temp directory beside it, then a rename); other files stay."""
    root = Path(path)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-"))
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        root.mkdir(exist_ok=True)
        for item in staging.iterdir():
            os.replace(item, root / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
