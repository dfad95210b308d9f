"""`emote render` and `emote bench`. Heavy imports live inside the handlers so `emote --help` stays fast."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .errors import EmoteError

MAX_STEPS = 1000


def _steps(value: str) -> int:
    try:
        steps = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps must be an integer, got {value!r}") from None
    if not 1 <= steps <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"--steps must be between 1 and {MAX_STEPS}, got {steps}")
    return steps


def strength_arg(value: str) -> float:
    """argparse type of --strength: a warm start's fraction of the noise schedule, in (0, 1]."""
    try:
        strength = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--strength must be a number, got {value!r}") from None
    if not 0 < strength <= 1:
        raise argparse.ArgumentTypeError(f"--strength must be in (0, 1], got {value}")
    return strength


def _seed(value: str) -> int:
    try:
        seed = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an integer, got {value!r}") from None
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"--seed must be between 0 and 2^63-1, got {seed}")
    return seed


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory (default: the bundled motion model with the photo renderer; "
                             "avatar/checkpoints/pixel is the pixel EMO model)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")


def _size(value: str) -> int:
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be an integer, got {value!r}") from None
    if not 256 <= size <= 512:
        raise argparse.ArgumentTypeError(f"--size must be between 256 and 512, got {size}")
    return size


def _face(value: str) -> int:
    try:
        face = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--face must be an integer, got {value!r}") from None
    if face < 0:
        raise argparse.ArgumentTypeError(f"--face must be 0 or more, got {face}")
    return face


def register(subparsers) -> None:
    render = subparsers.add_parser("render", help="animate a portrait with an audio file into an MP4")
    render.add_argument("portrait", type=Path, help="PNG/JPEG/WebP portrait")
    render.add_argument("audio", type=Path, help="WAV/MP3/FLAC/OGG/M4A audio")
    render.add_argument("-o", "--output", type=Path, required=True, help="output .mp4")
    add_model_options(render)
    render.add_argument("--size", type=_size, default=512,
                        help="side of the animated face crop, 256-512 pixels (default 512; the motion model only)")
    render.add_argument("--full-frame", action="store_true",
                        help="paste the animated face back into the whole photo (the motion model only)")
    render.add_argument("--face", type=_face, default=None,
                        help="which face to animate when the photo has several, 0 = the largest (default)")
    render.add_argument("--steps", type=_steps, default=None, help="sampling steps (default: the model's)")
    render.add_argument("--strength", type=strength_arg, default=None,
                        help="pixel model only: warm start from the previous frame noised to this fraction of the "
                             "schedule; 1 starts from pure noise (default: the model's)")
    render.add_argument("--seed", type=_seed, default=0)
    render.add_argument("--badge", action="store_true",
                        help='a small visible "AI-generated" badge in a corner (every frame always carries the '
                             "invisible watermark; `emote detect` finds it)")
    render.add_argument("--sign-cert", type=Path, default=None,
                        help="PEM certificate chain to sign a C2PA provenance manifest into the MP4 (with --sign-key); "
                             "without it the MP4 gets plain provenance tags only")
    render.add_argument("--sign-key", type=Path, default=None, help="PEM private key for --sign-cert")
    render.set_defaults(func=run_render)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def add_bench_options(bench: argparse.ArgumentParser) -> None:
    """Options of `emote bench` for the model; the top-level CLI composes them with the streaming bench's."""
    bench.add_argument("--preset", default=None, help="benchmark a preset with random weights instead of --model")
    add_model_options(bench)
    bench.add_argument("--steps", type=_steps, default=None)
    bench.add_argument("--strength", type=strength_arg, default=None, help="warm-start strength (default: the model's)")
    bench.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--compile", choices=COMPILE_MODES, default=None,
                       help="torch.compile the backbone first (reduce-overhead: CUDA graphs on a GPU)")
    bench.add_argument("--size", type=_size, default=512, help="the photo renderer's output side (default 512)")
    bench.add_argument("--json", action="store_true", help="print one JSON line (the default prints it indented)")


def load_pipeline(model: Path | None, device: str, dtype_name: str = "float32", preset: str | None = None):
    """The pipeline a command asked for: a preset with random weights, a model directory, or the bundled model."""
    import torch

    from .pipeline import AvatarPipeline, UntrainedModelWarning

    dtype = getattr(torch, dtype_name)
    if preset is not None:
        return AvatarPipeline.from_config(preset, device=device, dtype=dtype, trained=False, random_wav2vec2=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UntrainedModelWarning)
        pipe = AvatarPipeline.from_pretrained(model, device=device, dtype=dtype)
    if any(issubclass(w.category, UntrainedModelWarning) for w in caught):
        sys.stderr.write("emote: warning: the model is untrained (random weights); output will not look like a face\n")
    return pipe


def is_pixel_model(model: Path | None) -> bool:
    """A `--model DIR` that holds the pixel EMO pipeline (its `model_index.json`) rather than a motion model."""
    return model is not None and (model / "model_index.json").is_file()


def check_model_dir(model: Path | None) -> None:
    if model is None:
        return
    if not model.exists():
        raise EmoteError(f"--model {model} does not exist")
    if not ((model / "config.json").is_file() or (model / "model_index.json").is_file()):
        raise EmoteError(f"--model {model} is not a model directory (no config.json or model_index.json)")


def run_render(args: argparse.Namespace) -> int:
    if args.output.suffix.lower() != ".mp4":
        raise EmoteError(f"output {args.output} must end in .mp4")
    check_model_dir(args.model)
    if (args.sign_cert is None) != (args.sign_key is None):
        raise EmoteError("--sign-cert and --sign-key go together")
    for path in (args.sign_cert, args.sign_key):
        if path is not None and not path.is_file():
            raise EmoteError(f"{path} does not exist")
    if args.sign_cert is not None:  # an unusable key is refused before a long render, not after it
        from .watermark.provenance import load_signer

        load_signer(args.sign_cert, args.sign_key)
    if is_pixel_model(args.model):
        return _render_pixel(args)
    return _render_photo(args)


def _write_marked_video(args: argparse.Namespace, frames, audio, model_name: str) -> int:
    """Every frame watermarked (and badged when asked), the MP4 written atomically, then its provenance added."""
    from .media import write_video
    from .watermark import Watermarker, default_payload, write_provenance
    from .watermark.model import mark_frame

    marker = Watermarker(default_payload(model_name))

    def marked():
        for frame in frames:
            yield mark_frame(marker, _even(frame), args.badge)

    staging = args.output.with_name(f".{args.output.stem}.render.mp4")  # renamed into place once tagged/signed
    try:
        count = write_video(staging, marked(), audio=audio)
        write_provenance(staging, model_name, args.sign_cert, args.sign_key)
        os.replace(staging, args.output)
    finally:
        staging.unlink(missing_ok=True)
    return count


def _load_audio(path: Path):
    from .media import frame_count, load_audio

    audio = load_audio(path)
    if frame_count(len(audio)) == 0:
        raise EmoteError(f"audio {path} is shorter than one video frame (40 ms)")
    return audio


def _render_photo(args: argparse.Namespace) -> int:
    from .media import load_portrait
    from .photo_model import MotionPhotoModel

    if args.strength is not None:
        raise EmoteError("--strength applies to the pixel model only (--model DIR with a model_index.json)")
    if args.device != "cpu":
        raise EmoteError("the motion model with the photo renderer runs on the CPU; --device cuda is for the pixel model")
    image = load_portrait(args.portrait)
    audio = _load_audio(args.audio)
    model = MotionPhotoModel.from_pretrained(args.model, size=args.size)
    avatar = model.prepare_avatar("render", image, face=args.face, name=str(args.portrait),
                                  keep_original=args.full_frame)
    for warning in avatar.state.analysis.warnings:
        sys.stderr.write(f"emote: warning: {warning}\n")
    frames = model.render_offline(avatar, audio, seed=args.seed, steps=args.steps or model.spec.default_steps,
                                  full_frame=args.full_frame)
    count = _write_marked_video(args, frames, audio, model.spec.name)
    sys.stderr.write(f"wrote {args.output}: {count} frames at 25 fps\n")
    return 0


def _even(frame):
    """H.264 in yuv420p needs even sides: drop a last odd row or column (full-frame output of odd-sized photos)."""
    h, w = frame.shape[:2]
    return frame[: h - h % 2, : w - w % 2]


def _render_pixel(args: argparse.Namespace) -> int:
    from .media import crop_square, load_image
    from .portrait import find_face

    if args.full_frame:
        raise EmoteError("--full-frame needs the photo renderer (the default model), not the pixel model")
    image = load_image(args.portrait)
    audio = _load_audio(args.audio)
    pipe = load_pipeline(args.model, args.device)
    portrait = crop_square(image, find_face(image))
    frames = pipe.render(portrait, audio, steps=args.steps, seed=args.seed, strength=args.strength)
    count = _write_marked_video(args, frames, audio, f"pixel-{pipe.config.preset}")
    sys.stderr.write(f"wrote {args.output}: {count} frames at 25 fps, {pipe.resolution}x{pipe.resolution}\n")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench as bench

    if args.repeats < 1:
        raise EmoteError("--repeats must be at least 1")
    if args.preset is None and not is_pixel_model(args.model):
        from .photo_bench import run_photo_bench
        from .photo_model import MotionPhotoModel

        check_model_dir(args.model)
        model = MotionPhotoModel.from_pretrained(args.model, size=args.size)
        result = run_photo_bench(model, steps=args.steps or model.spec.default_steps, repeats=args.repeats)
        print(json.dumps(result) if args.json else json.dumps(result, indent=2))
        return 0
    pipe = load_pipeline(args.model, args.device, args.dtype, preset=args.preset)
    result = bench(pipe, steps=args.steps or pipe.default_steps, repeats=args.repeats, strength=args.strength,
                   compile_mode=args.compile)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0
