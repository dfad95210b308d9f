"""Shared fixtures: a tiny random model (saved once per run), a portrait and audio files."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from avatar.config import AUDIO_SAMPLE_RATE

# The suite starts servers in subprocesses next to this process; with both spinning two OpenMP threads on a
# 2-core machine, oversubscription slows everything down many times. Tiny models gain nothing from two threads.
torch.set_num_threads(1)


def write_wav(path: Path, samples: np.ndarray, rate: int = AUDIO_SAMPLE_RATE, channels: int = 1) -> Path:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def speech_like(seconds: float, rate: int = AUDIO_SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """Syllable-rate amplitude-modulated harmonics: cheap, deterministic, not silent."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (0.3 * voiced * envelope + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def make_audible(pipe, seed: int = 0):
    """Random weights in the spatial transformers' outputs, which start at zero: a fresh tiny model ignores its audio,
    so audio guidance would change nothing. Returns the pipeline."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in pipe.backbone.named_modules():
            if name.endswith("proj_out"):
                module.weight.copy_(0.05 * torch.randn(module.weight.shape, generator=generator))
    return pipe


@pytest.fixture(scope="session")
def tiny_pipe():
    from avatar.pipeline import AvatarPipeline

    return AvatarPipeline.from_config("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_pipe) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny"
    tiny_pipe.save_pretrained(path)
    return path


@pytest.fixture
def portrait() -> np.ndarray:
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:48, 0:48]
    image = np.zeros((48, 48, 3), np.uint8) + np.array([50, 80, 120], np.uint8)
    face = ((x - 24) / 14) ** 2 + ((y - 26) / 18) ** 2 < 1
    image[face] = (225, 185, 160)
    return (image + rng.integers(0, 8, image.shape)).astype(np.uint8)


@pytest.fixture
def media_files(tmp_path, portrait):
    from PIL import Image

    image_path = tmp_path / "portrait.png"
    Image.fromarray(np.kron(portrait, np.ones((4, 3, 1), np.uint8))).save(image_path)  # non-square, larger
    audio_path = write_wav(tmp_path / "speech.wav", speech_like(1.3))
    return image_path, audio_path


def with_portrait_refiner(pipe, seed: int = 0):
    """`pipe` with a PortraitRefiner whose last layer is random, not zero, so that it changes the decoded frames (a
    new one starts as the autoencoder's decoder)."""
    import torch

    from avatar.grow import add_portrait_refiner

    refined = add_portrait_refiner(pipe, seed=seed)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for p in refined.portrait_refiner.conv_out.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return refined


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    """`emote ARGS` in this process: its exit code (argparse's too), stdout and stderr."""
    from server.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
