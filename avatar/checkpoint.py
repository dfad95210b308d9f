"""Checkpoint directories, diffusers style: `model_index.json` plus one sub-directory per component with its
`config.json` and safetensors weights. Loading never touches the network and names any missing or mismatched file.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers.models.modeling_utils import ModelMixin
from safetensors import SafetensorError
from safetensors.torch import load_file

from .audio import MelAudioEncoder, Wav2Vec2AudioEncoder
from .config import ModelConfig
from .errors import CheckpointError
from .refiner import PortraitRefiner
from .schedulers import SCHEDULER_CLASSES
from .unet import EmoBackbone, ReferenceNet
from .vae import VAE_CLASSES

INDEX_FILE = "model_index.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
FORMAT_VERSION = 1
MODEL_COMPONENTS = ("vae", "reference_net", "backbone")


def component_classes(cfg: ModelConfig) -> dict[str, type]:
    return {
        "vae": VAE_CLASSES[cfg.vae_type],
        "reference_net": ReferenceNet,
        "backbone": EmoBackbone,
        "audio_encoder": MelAudioEncoder if cfg.audio_encoder == "mel" else Wav2Vec2AudioEncoder,
        "scheduler": SCHEDULER_CLASSES[cfg.sampler],
        "portrait_refiner": PortraitRefiner,
    }


def save_checkpoint(path: str | Path, cfg: ModelConfig, components: dict[str, Any], extra: dict | None = None,
                    training_modules: dict[str, ModelMixin] | None = None) -> None:
    """Write the whole directory next to `path`, then rename it into place, so a reader never sees half of it.
    `training_modules` (e.g. the warm stage's mouth expert) are stored beside the components for a later run to
    continue from; loading the model ignores them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        training_modules = training_modules or {}
        for name, component in {**components, **training_modules}.items():
            component.save_pretrained(tmp / name)
        index = {
            "_class_name": "AvatarPipeline",
            "format_version": FORMAT_VERSION,
            "components": {name: type(c).__name__ for name, c in components.items()},
            "model": cfg.to_dict(),
            **({"training_modules": {name: type(m).__name__ for name, m in training_modules.items()}}
               if training_modules else {}),
            **(extra or {}),
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        publish_directory(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_directory(tmp: Path, path: Path) -> None:
    """Move the finished directory `tmp` to `path` (a sibling), replacing any old one by renames only."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def read_index(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    index_file = path / INDEX_FILE
    if not index_file.is_file():
        raise CheckpointError(f"{index_file} is missing: not a model directory")
    try:
        index = json.loads(index_file.read_text())
        index["model"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_file} is not a valid model index: {exc}") from exc
    return index


def _load_model_component(directory: Path, cls: type[ModelMixin], expected: dict[str, Any]) -> ModelMixin:
    config_file = directory / "config.json"
    weights_file = directory / WEIGHTS_FILE
    for f in (config_file, weights_file):
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
    try:
        config = cls.load_config(directory)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise CheckpointError(f"{config_file} is unreadable: {exc}") from exc
    signature = inspect.signature(cls.__init__).parameters
    for key, value in expected.items():
        # a key newer than the stored config holds the value that config was built with: the class default
        stored = config.get(key, signature[key].default if key in signature else None)
        if isinstance(stored, list):
            stored = tuple(tuple(v) if isinstance(v, list) else v for v in stored)
        if stored != value:
            raise CheckpointError(f"{config_file}: {key} is {stored!r} but the model index says {value!r}")
    accepted = set(signature)
    model = cls.from_config({k: v for k, v in config.items() if k in accepted or k.startswith("_")})
    try:
        state = load_file(str(weights_file))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{weights_file} is unreadable: {exc}") from exc
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                details.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise CheckpointError(f"{weights_file} does not match {config_file}: " + ", ".join(details))
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_training_module(path: str | Path, name: str, cls: type[ModelMixin]) -> ModelMixin | None:
    """The training module `name` stored with the model directory `path` (`save_checkpoint`), or None if it has none."""
    directory = Path(path) / name
    return _load_model_component(directory, cls, {}) if directory.exists() else None


def load_checkpoint(path: str | Path, expected_components: dict[str, dict[str, Any]]) -> tuple[ModelConfig, dict[str, Any]]:
    """Load every component; `expected_components` maps component name -> config values it must have."""
    path = Path(path)
    index = read_index(path)
    cfg = ModelConfig.from_dict(index["model"])
    classes = component_classes(cfg)
    components: dict[str, Any] = {}
    for name in MODEL_COMPONENTS + (("portrait_refiner",) if cfg.portrait_refiner_channels else ()):
        components[name] = _load_model_component(path / name, classes[name], expected_components.get(name, {}))
    audio_dir = path / "audio_encoder"
    if cfg.audio_encoder == "mel":
        components["audio_encoder"] = _load_model_component(audio_dir, MelAudioEncoder, expected_components.get("audio_encoder", {}))
    else:
        components["audio_encoder"] = Wav2Vec2AudioEncoder.from_pretrained(audio_dir, tuple(cfg.wav2vec2_layers))
    components["scheduler"] = load_scheduler(path, cfg)
    return cfg, components


def load_scheduler(path: str | Path, cfg: ModelConfig):
    """The model directory's sampler (`scheduler/`), of the class its config names."""
    scheduler_file = Path(path) / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise CheckpointError(f"{scheduler_file} is missing")
    try:
        return SCHEDULER_CLASSES[cfg.sampler].from_pretrained(scheduler_file.parent)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{scheduler_file} is unreadable: {exc}") from exc


def state_fingerprint(modules: list[torch.nn.Module], cfg: ModelConfig) -> str:
    """A digest of the config and the weights that produce reference features, to tag ReferenceCaches."""
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for module in modules:
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
