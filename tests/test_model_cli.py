"""`emote render` and `emote bench`: the success path and every bad-input case (exit 2, one line, no OUT file)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, speech_like, write_wav

ROOT = Path(__file__).resolve().parents[1]


def probe(path: Path) -> tuple[int, float, int, bool]:
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video=0))
        has_audio = bool(container.streams.audio)
        return frames, float(video.average_rate), video.width, has_audio


def test_render_with_a_model_directory(tiny_model_dir, media_files, tmp_path, capsys):
    image, audio = media_files
    out = tmp_path / "out.mp4"
    code, _, err = run_cli(["render", image, audio, "-o", out, "--model", tiny_model_dir, "--seed", "3"], capsys)
    assert code == 0, err
    frames, fps, width, has_audio = probe(out)
    assert fps == 25 and width == 32 and has_audio
    assert abs(frames - 1.3 * 25) <= 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp file left behind"


@pytest.mark.parametrize("suffix,codec", [(".flac", "flac"), (".ogg", "libopus"), (".m4a", "aac"), (".mp3", "libmp3lame")])
def test_render_reads_compressed_audio(tiny_model_dir, media_files, tmp_path, capsys, suffix, codec):
    image, _ = media_files
    path = tmp_path / f"speech{suffix}"
    samples = speech_like(0.8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate={"libmp3lame": 22050, "libopus": 48000}.get(codec, 16000), layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None], format="flt", layout="mono")
        frame.sample_rate = 16000
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=stream.rate)
        for f in resampler.resample(frame) + resampler.resample(None):
            container.mux(stream.encode(f))
        container.mux(stream.encode(None))
    out = tmp_path / "out.mp4"
    code, _, err = run_cli(["render", image, path, "-o", out, "--model", tiny_model_dir], capsys)
    assert code == 0, err
    from avatar.media import load_audio

    decoded_seconds = len(load_audio(path)) / 16000  # lossy codecs add priming/padding samples
    assert abs(decoded_seconds - 0.8) < 0.2
    assert abs(probe(out)[0] - decoded_seconds * 25) <= 1


DRAWN = ROOT / "avatar" / "assets" / "default_portrait.png"


def test_render_with_the_default_model_animates_the_portraits_own_pixels(tmp_path, capsys):
    """No --model: the motion backbone with the photo renderer at the requested crop size. The frames are the
    portrait's own pixels, moving, and watermarked. (Lip sync itself: tests/test_motion_shipped.py and
    tests/test_photo_renderer.py.)"""
    from avatar.media import load_portrait
    from avatar.photo.analysis import analyse_portrait
    from avatar.watermark import detect_frames

    audio = write_wav(tmp_path / "speech.wav", speech_like(2.0))
    out = tmp_path / "out.mp4"
    code, _, err = run_cli(["render", DRAWN, audio, "-o", out, "--size", "256"], capsys)
    assert code == 0, err
    frames, rate, width, has_audio = probe(out)
    assert (frames, rate, width, has_audio) == (50, 25.0, 256, True)
    with av.open(str(out)) as container:
        video = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    crop = analyse_portrait(load_portrait(DRAWN), size=256).crop.astype(np.float64)
    psnr = 10 * np.log10(255.0**2 / ((video - crop) ** 2).mean(axis=(1, 2, 3)))
    assert psnr.min() > 22, psnr  # the portrait itself, moved a little
    assert np.abs(np.diff(video.astype(np.float64), axis=0)).mean() > 0.2  # not a still image
    assert detect_frames(list(video))["found"]


def test_render_full_frame_pastes_back_into_the_whole_photo(tmp_path, capsys):
    photo = tmp_path / "wide.png"
    drawn = np.asarray(Image.open(DRAWN).convert("RGB"))
    Image.fromarray(np.pad(drawn, ((0, 0), (101, 100), (0, 0)), mode="edge")).save(photo)  # 713 wide: odd
    audio = write_wav(tmp_path / "speech.wav", speech_like(0.4))
    out = tmp_path / "out.mp4"
    code, _, err = run_cli(["render", photo, audio, "-o", out, "--full-frame"], capsys)
    assert code == 0, err
    frames, _, width, _ = probe(out)
    assert frames == 10 and width == 712  # yuv420p needs even sides: the odd last column is dropped


def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "empty.png": b"",
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(200)),
        "text.jpg": b"hello, not an image",
        "empty.wav": b"",
        "corrupt.wav": b"RIFF" + bytes(300),
        "text.mp3": b"just text, not audio at all" * 20,
    }
    paths = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths[name] = tmp_path / name
    Image.new("RGB", (300, 300), (200, 180, 160)).save(tmp_path / "blank.png")
    paths["blank.png"] = tmp_path / "blank.png"
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(bomb)
    paths["bomb.png"] = bomb
    return paths


BAD_CASES = [
    ("missing portrait", lambda f, img, aud, m: ["render", f["_dir"] / "nope.png", aud], "does not exist"),
    ("missing audio", lambda f, img, aud, m: ["render", img, f["_dir"] / "nope.wav"], "does not exist"),
    ("empty image", lambda f, img, aud, m: ["render", f["empty.png"], aud], "empty"),
    ("corrupt image", lambda f, img, aud, m: ["render", f["corrupt.png"], aud], "not a readable image"),
    ("text as image", lambda f, img, aud, m: ["render", f["text.jpg"], aud], "not a readable image"),
    ("decompression bomb", lambda f, img, aud, m: ["render", f["bomb.png"], aud], "too large"),
    ("empty audio", lambda f, img, aud, m: ["render", img, f["empty.wav"]], "empty"),
    ("corrupt audio", lambda f, img, aud, m: ["render", img, f["corrupt.wav"]], "not readable"),
    ("text as audio", lambda f, img, aud, m: ["render", img, f["text.mp3"]], "audio"),
    ("missing model dir", lambda f, img, aud, m: ["render", img, aud, "--model", f["_dir"] / "nomodel"], "does not exist"),
    ("not a model dir", lambda f, img, aud, m: ["render", img, aud, "--model", f["_dir"]], "is not a model directory"),
    ("no face", lambda f, img, aud, m: ["render", f["blank.png"], aud], "no face found in"),
    ("strength on the default model", lambda f, img, aud, m: ["render", img, aud, "--strength", "0.5"],
     "--strength applies to the pixel model only"),
    ("full frame on the pixel model", lambda f, img, aud, m: ["render", img, aud, "--model", m, "--full-frame"],
     "--full-frame needs the photo renderer"),
    ("size too small", lambda f, img, aud, m: ["render", img, aud, "--size", "128"], "--size must be between 256 and 512"),
    ("negative face", lambda f, img, aud, m: ["render", img, aud, "--face", "-1"], "--face must be 0 or more"),
    ("certificate without a key", lambda f, img, aud, m: ["render", img, aud, "--sign-cert", aud],
     "--sign-cert and --sign-key go together"),
    ("unusable signing key", lambda f, img, aud, m: ["render", img, aud, "--sign-cert", aud, "--sign-key", aud],
     "not an unencrypted PEM private key"),
    ("steps zero", lambda f, img, aud, m: ["render", img, aud, "--steps", "0"], "--steps must be between"),
    ("steps huge", lambda f, img, aud, m: ["render", img, aud, "--steps", "5000"], "--steps must be between"),
    ("steps text", lambda f, img, aud, m: ["render", img, aud, "--steps", "two"], "--steps must be an integer"),
    ("strength zero", lambda f, img, aud, m: ["render", img, aud, "--strength", "0"], "--strength must be in (0, 1]"),
    ("strength text", lambda f, img, aud, m: ["render", img, aud, "--strength", "half"], "--strength must be a number"),
    ("negative seed", lambda f, img, aud, m: ["render", img, aud, "--seed", "-1"], "--seed must be between"),
    ("bad device", lambda f, img, aud, m: ["render", img, aud, "--device", "tpu"], "invalid choice"),
    ("output not mp4", lambda f, img, aud, m: ["render", img, aud, "--model", m, "-o", f["_dir"] / "out.avi"], "must end in .mp4"),
]


@pytest.mark.parametrize("label,build,message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_render_bad_input_exits_2_with_one_line_and_no_output(
    label, build, message, tmp_path, media_files, tiny_model_dir, capsys
):
    files = bad_files(tmp_path)
    files["_dir"] = tmp_path
    image, audio = media_files
    args = build(files, image, audio, tiny_model_dir)
    out = tmp_path / "out.mp4"
    if "-o" not in args:
        args += ["-o", out]
    before = set(tmp_path.iterdir())
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err
    assert set(tmp_path.iterdir()) == before, "a failed render must leave no file behind"


def test_render_with_silence_too_short_for_a_frame(tiny_model_dir, media_files, tmp_path, capsys):
    image, _ = media_files
    audio = write_wav(tmp_path / "blip.wav", np.zeros(100, np.float32))
    code, _, err = run_cli(["render", image, audio, "-o", tmp_path / "o.mp4", "--model", tiny_model_dir], capsys)
    assert code == 2 and "shorter than one video frame" in err
    assert not (tmp_path / "o.mp4").exists()


def test_bench_prints_stage_timings_as_json(capsys):
    code, out, err = run_cli(["bench", "--preset", "tiny", "--steps", "2", "--strength", "0.5", "--repeats", "1",
                              "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["steps"] == 2 and result["strength"] == 0.5
    for stage in ("audio_encode", "motion_reference", "unet_step", "decode", "window_total"):
        assert result["ms_per_frame"][stage] > 0
    assert result["fps"] > 0 and result["peak_memory_mb"] > 0
    assert set(result["params"]) == {"vae", "reference_net", "backbone", "audio_encoder"}


def test_bench_compile_wraps_the_backbone(capsys, monkeypatch):
    """The plumbing of --compile; torch.compile itself is stood in for (inductor takes a minute on this CPU)."""
    import torch

    modes = []

    def fake_compile(module, mode=None):
        modes.append((type(module).__name__, mode))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    code, out, err = run_cli(["bench", "--preset", "tiny", "--steps", "1", "--repeats", "1", "--compile",
                              "reduce-overhead", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert modes == [("EmoBackbone", "reduce-overhead")]
    assert result["compile"] == "reduce-overhead" and result["compile_s"] >= 0
    code, _, err = run_cli(["bench", "--preset", "tiny", "--compile", "fast"], capsys)
    assert code == 2 and "--compile" in err


def test_bench_bad_preset_and_missing_gpu(capsys):
    code, _, err = run_cli(["bench", "--preset", "huge"], capsys)
    assert code == 2 and "unknown preset 'huge'" in err
    import torch

    if not torch.cuda.is_available():
        code, _, err = run_cli(["bench", "--preset", "tiny", "--device", "cuda"], capsys)
        assert code == 2 and "no CUDA GPU" in err


def test_console_script_runs(tmp_path):
    """The installed `emote` entry point (not just main()) starts and reports errors with exit 2."""
    emote = Path(sys.executable).parent / "emote"
    result = subprocess.run([str(emote), "render", "x.png", "y.wav", "-o", str(tmp_path / "o.mp4")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["emote render: error: image x.png does not exist"]
