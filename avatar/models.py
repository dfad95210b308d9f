"""Which `FrameModel` a command runs: `load_frame_model(DIR or None, device, **options)`."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import EmoteError
from .frame_model import FrameModel

TEST_MODEL_FILE = "frame_model.json"  # {"type": "solid-colour", "options": {...}}: the streaming test model


def load_frame_model(model_dir: Path | None, device: str = "cpu", **options) -> FrameModel:
    """None: the default motion backbone + photo renderer (option: `size`); a directory with a motion model's
    `config.json`: that motion model. A directory with a pixel `model_index.json`: the pixel EMO pipeline (options:
    `strength`, `refine`, `dtype`, `size` = its resolution). A directory with `frame_model.json` of type
    "solid-colour": `avatar.solid_model.SolidColourModel` (server tests without torch models). Options the chosen
    model does not take raise EmoteError; unset ones (None, False) are ignored."""
    options = {k: v for k, v in options.items() if v is not None and v is not False}
    if model_dir is not None:
        model_dir = Path(model_dir)
        if (model_dir / "model_index.json").is_file():
            return _pixel_model(model_dir, device, **options)
        if (model_dir / TEST_MODEL_FILE).is_file():
            return _test_model(model_dir / TEST_MODEL_FILE, **options)
    if model_dir is None or (model_dir / "config.json").is_file():
        return _motion_photo_model(model_dir, device, **options)
    if not model_dir.is_dir():
        raise EmoteError(f"model directory {model_dir} does not exist")
    raise EmoteError(f"{model_dir} is not a model directory (no model_index.json)")


def _motion_photo_model(model_dir: Path | None, device: str, size: int | None = None, **unknown) -> FrameModel:
    from .photo_model import MotionPhotoModel

    _refuse(unknown, "the motion model")
    if device != "cpu":
        raise EmoteError("the motion model runs on the CPU; --device cuda needs the pixel model (--model DIR)")
    return MotionPhotoModel.from_pretrained(model_dir, **({"size": size} if size is not None else {}))


def _pixel_model(model_dir: Path, device: str, strength: float | None = None, refine: bool = False,
                 dtype: str = "float32", size: int | None = None, **unknown) -> FrameModel:
    from .cli import load_pipeline
    from .pixel_model import PixelFrameModel

    _refuse(unknown, "the pixel model")
    pipeline = load_pipeline(model_dir, device, dtype)
    if size is not None and size != pipeline.resolution:
        raise EmoteError(f"the pixel model renders {pipeline.resolution}x{pipeline.resolution} only; --size {size} "
                         "needs the default model")
    return PixelFrameModel(pipeline, strength=strength, refine=refine)


def _test_model(path: Path, **options) -> FrameModel:
    from .solid_model import SolidColourModel

    try:
        description = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EmoteError(f"cannot read {path}: {exc}") from exc
    if description.get("type") != "solid-colour":
        raise EmoteError(f"{path}: unknown model type {description.get('type')!r}")
    size = options.pop("size", None)
    _refuse(options, "the solid-colour test model")
    settings = dict(description.get("options", {}))
    if size is not None:
        settings.update(width=size, height=size)
    return SolidColourModel(**settings)


def _refuse(unknown: dict, model: str) -> None:
    if unknown:
        raise EmoteError(f"{model} does not take {', '.join('--' + k.replace('_', '-') for k in sorted(unknown))}")


def default_model_threads() -> int:
    """Intra-op threads for the model on a CPU: all cores but one. The event loop, audio encoding and the WebRTC
    encoders need a core of their own; the model's small kernels gain little from a second thread (measured on 2
    cores: 33.7 vs 35.8 fps alone, but 25 vs 12 fresh fps when the event loop competes for the cores)."""
    return max(1, (os.cpu_count() or 1) - 1)


def use_model_threads(device: str, threads: int | None = None) -> None:
    """Set torch's process-wide thread count for a live server or bench, once, before the model runs (changing it
    under a running model stalls it)."""
    if device == "cpu":
        import torch

        torch.set_num_threads(threads or default_model_threads())
