"""`emote eval-photo`: the default model on real portraits and speech, read back by an independent face mesh, and
`emote strip`: a PNG strip through an espeak-ng sentence (the photo, then a frame per labelled phoneme)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from avatar.errors import EmoteError

STRIP_SENTENCE = "Mama made a big map, then we stopped."
FACE_ZOOM = (0.22, 0.78)  # the face's part of the aligned crop (eyes at 0.41 of its height), shown in the strip


def register(subparsers) -> None:
    ev = subparsers.add_parser("eval-photo", help="lip sync of the default model on portraits, read from its frames")
    ev.add_argument("portraits", type=Path, nargs="+", help="portrait images")
    ev.add_argument("--audio", type=Path, required=True, help="speech (any format PyAV reads)")
    ev.add_argument("--seconds", type=float, default=30.0, help="use the first S seconds of the audio (default 30)")
    ev.add_argument("--opus", action="store_true", help="send the audio through an Opus round trip first")
    ev.add_argument("--size", type=int, default=512)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=run_eval_photo)

    strip = subparsers.add_parser("strip", help="a PNG strip: the portrait, then frames through a spoken sentence")
    strip.add_argument("portrait", type=Path)
    strip.add_argument("-o", "--output", type=Path, required=True, help="output .png")
    strip.add_argument("--text", default=STRIP_SENTENCE)
    strip.add_argument("--size", type=int, default=200, help="side of each tile (the face, zoomed from the 512 crop)")
    strip.add_argument("--grey", action="store_true", help="convert the portrait to greyscale first")
    strip.set_defaults(func=run_strip)


def _opus(audio):
    from avatar.data.augment import opus_roundtrip

    return opus_roundtrip(audio)


def run_eval_photo(args: argparse.Namespace) -> int:
    import numpy as np

    from avatar.media import load_audio, load_portrait
    from avatar.photo_model import MotionPhotoModel

    from .photo import mouth_gaps, speech_envelope, sync_report

    audio = load_audio(args.audio)[: int(args.seconds * 16000)]
    if args.opus:
        audio = _opus(audio)
    model = MotionPhotoModel.from_pretrained(size=args.size)
    report = {"audio": args.audio.name, "seconds": round(len(audio) / 16000, 2), "opus": args.opus, "portraits": {}}
    for path in args.portraits:
        avatar = model.prepare_avatar(path.stem, load_portrait(path), name=str(path))
        frames = np.stack(list(model.render_offline(avatar, audio, seed=args.seed)))
        gaps = mouth_gaps(frames)
        report["portraits"][path.name] = sync_report(gaps, speech_envelope(audio, len(frames)))
        sys.stderr.write(f"{path.name}: {report['portraits'][path.name]}\n")
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


def run_strip(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image, ImageDraw

    from avatar.data.speech import EspeakEngine, Voice
    from avatar.media import load_portrait, resize
    from avatar.photo_model import MotionPhotoModel

    if args.output.suffix.lower() != ".png":
        raise EmoteError(f"output {args.output} must end in .png")
    image = load_portrait(args.portrait)
    if args.grey:
        image = np.repeat(np.asarray(Image.fromarray(image).convert("L"))[..., None], 3, axis=2)
    utterance = EspeakEngine.get().synthesize(args.text, Voice("en-us"))
    audio = np.concatenate([np.zeros(8000, np.float32), utterance.audio, np.zeros(8000, np.float32)])
    model = MotionPhotoModel.from_pretrained()
    avatar = model.prepare_avatar("strip", image, name=str(args.portrait))
    frames = list(model.render_offline(avatar, audio, seed=0))
    picks = [("photo", None)]
    for phoneme in utterance.phonemes:
        base = phoneme.name.rstrip(":#")
        if base in ("m", "b", "p", "a", "A", "e", "E", "i", "I", "O", "0", "V", "aI", "eI"):
            picks.append((phoneme.name, int((0.5 + (phoneme.start + phoneme.end) / 2) * 25)))
    picks = picks[:1] + picks[1:11] + [("silence", len(frames) - 3)]
    tiles = []
    for label, index in picks:
        tile = avatar.preview if index is None else frames[min(index, len(frames) - 1)]
        side = tile.shape[0]
        lo, hi = int(FACE_ZOOM[0] * side), int(FACE_ZOOM[1] * side)
        tile = Image.fromarray(resize(np.ascontiguousarray(tile[lo:hi, lo:hi]), args.size))
        ImageDraw.Draw(tile).text((6, 4), f"/{label}/" if index is not None and label != "silence" else label,
                                  fill=(255, 255, 0))
        tiles.append(np.asarray(tile))
    strip = np.concatenate(tiles, axis=1)
    tmp = args.output.with_name(f".{args.output.name}.tmp.png")
    Image.fromarray(strip).save(tmp)
    tmp.replace(args.output)
    sys.stderr.write(f"wrote {args.output}: {len(tiles)} tiles\n")
    return 0
