"""The shipped motion model (avatar/checkpoints/motion): silence closes the mouth, speech opens it, in time."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from avatar.errors import EmoteError
from avatar.motion import spec
from avatar.motion.checkpoint import DEFAULT_DIR, load_backbone
from avatar.motion.generate import MotionGenerator, motion_for_audio

torch.set_num_threads(1)
REFERENCE = np.array([0.68, 1.06, 2.22, 0.077, 0.107, 0.183, 0.67, 0.59], np.float32)  # a corpus face's geometry


@pytest.fixture(scope="module")
def generator() -> MotionGenerator:
    return MotionGenerator(load_backbone())


@pytest.fixture(scope="module")
def speech():
    from avatar.data.speech import EspeakEngine, Voice

    utterance = EspeakEngine.get().synthesize("Maybe the bright morning will bring a better plan.", Voice("en"))
    lead = np.zeros(8000, np.float32)
    audio = np.concatenate([lead, utterance.audio, lead])
    return audio, [(p.name, p.start + 0.5, p.end + 0.5) for p in utterance.phonemes]


def test_shipped_model_is_small_and_loads():
    weights = list(DEFAULT_DIR.glob("*.safetensors"))
    assert (DEFAULT_DIR / "config.json").is_file() and len(weights) == 1
    assert weights[0].stat().st_size < 5 * 1024 * 1024
    assert (DEFAULT_DIR / "README.md").is_file()


def test_noise_floor_keeps_the_mouth_closed(generator):
    floor = (np.random.default_rng(0).normal(0, 1, 3 * 16000) * 10 ** (-60 / 20)).astype(np.float32)
    motion = motion_for_audio(generator, floor, REFERENCE)
    assert spec.column(motion, "mouth_open").mean() < 0.05


@pytest.mark.parametrize("steps", [1, 2])
def test_espeak_speech_opens_the_mouth_in_time(generator, speech, steps):
    audio, phonemes = speech
    motion = motion_for_audio(generator, audio, REFERENCE, seed=1, steps=steps)
    opening = spec.column(motion, "mouth_open")
    centres = (np.arange(len(opening)) + 0.5) / 25
    voiced = np.zeros(len(opening), bool)
    for name, start, end in phonemes:
        if not name.startswith("_"):
            voiced |= (centres >= start) & (centres < end)
    assert opening[voiced].mean() > 0.15
    assert opening[:10].mean() < 0.05  # the leading half second of silence
    assert opening[voiced].mean() > 4 * opening[~voiced].mean()


def test_train_motion_cli_rejects_bad_arguments(tmp_path):
    from avatar.motion.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    for argv, message in ((["--steps", "0"], "--steps"), (["--clips", "1"], "--clips"),
                          (["--guidance", "0.5"], "--guidance")):
        args = parser.parse_args(["train-motion", "--out", str(tmp_path / "m"), *argv])
        with pytest.raises(EmoteError, match=message):
            args.func(args)
    (tmp_path / "file").write_text("x")
    args = parser.parse_args(["train-motion", "--out", str(tmp_path / "file")])
    with pytest.raises(EmoteError, match="not a directory"):
        args.func(args)
