"""`emote train` (the EMO stages), `emote distill` (consistency distillation) and `emote merge` (task vectors).
Heavy imports live in the handlers."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from avatar.config import WARM_STARTS
from avatar.errors import EmoteError

STAGE_CHOICES = ("vae", "decoder", "refiner", "audio", "1", "2", "3", "warm",
                 "warm-refiner", "warm-guidance")
LR_SCHEDULES = ("constant", "cosine")


def add_loop_options(parser: argparse.ArgumentParser, steps: int, lr: float, batch_size: int) -> None:
    parser.add_argument("--data", type=Path, required=True, help="corpus directory (emote corpus --out)")
    parser.add_argument("--out", type=Path, required=True, help="output: model/, state/ and log.jsonl")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps in all (resume counts the done ones)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="windows per process per micro-batch")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                        help="bf16 pays on a GPU or a CPU with AMX or AVX-512 BF16 (elsewhere it is emulated, slower)")
    parser.add_argument("--resume", action="store_true", help="continue exactly from OUT/state")
    parser.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                        help="after the warmup: constant, or a cosine down to 0 at --steps (an anneal)")
    parser.add_argument("--limit-windows", type=int, default=None, help="train on the first N windows only (smoke tests)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or console log lines")


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="train one EMO stage (vae, decoder, refiner, audio, 1 image, 2 video, 3 speed) on a corpus, or "
                      "fine-tune a distilled student, or its portrait refiner, on its warm-start input (warm, "
                      "warm-refiner), or fold audio guidance into it (warm-guidance)")
    train.add_argument("--stage", choices=STAGE_CHOICES, required=True)
    source = train.add_mutually_exclusive_group()
    source.add_argument("--init", type=Path, default=None, help="start from this model (the previous stage's --out)")
    source.add_argument("--preset", default=None, help="start from random weights of this preset (default: default)")
    add_loop_options(train, steps=1000, lr=1e-4, batch_size=2)
    train.add_argument("--ema-decay", type=float, default=0.999)
    train.add_argument("--freeze", action="append", default=[], metavar="COMPONENT",
                       help="keep this network fixed where the stage would train it, e.g. a pretrained audio_encoder "
                            "in stage 2 (repeatable)")
    train.add_argument("--grow-attention", action="append", type=int, default=[], metavar="LEVEL",
                       help="add spatial attention (reference and audio) at this UNet level of the --init model, "
                            "0 = full latent resolution; new blocks start as the identity (repeatable)")
    train.add_argument("--grow-audio-locator", type=int, default=0, metavar="CHANNELS",
                       help="add an audio locator of this many channels to the --init model's backbone: the audio "
                            "painted into the lip region at the full latent resolution; it starts as the identity")
    train.add_argument("--warm-start", choices=WARM_STARTS, default=None,
                       help="stage warm: what the student's windows start from, saved in the model (default: the "
                            "--init model's): the previous frame, or the portrait for every window")
    train.add_argument("--expert-warmup", type=int, default=0, metavar="STEPS",
                       help="stage warm: train the mouth expert alone for the first STEPS steps (the student waits), "
                            "so that a run from a model, with a new expert, moves the student once its sync loss "
                            "reads something; stages vae, decoder, refiner, warm-refiner and warm-guidance: their "
                            "lip reader alone (the network waits)")
    train.add_argument("--audio-guidance", type=float, default=None, metavar="G",
                       help="stage warm-guidance (required there): the audio guidance scale to fold into the student, "
                            "so that one backbone pass gives what two give with guidance G")
    train.add_argument("--lip-reading-weight", type=float, default=0.0, metavar="W",
                       help="stages vae, decoder, refiner, warm-refiner and warm-guidance: add W x a lip-reading "
                            "term: a mouth expert, trained alongside on the true frames, must read the drawn mouths "
                            "as it reads the true ones (0: none)")
    train.add_argument("--refiner-channels", type=_widths, default=None, metavar="W0,W1,...",
                       help="stage refiner, on a model without a portrait refiner: its widths, full resolution "
                            "first, one per autoencoder level (default: 16, 24, 32, then 32 per further level)")
    train.add_argument("--refiner-audio-channels", type=int, default=0, metavar="CHANNELS",
                       help="stage warm-refiner: add an audio path of this many channels to the --init model's "
                            "portrait refiner, which then hears each frame's audio; it starts as the identity")
    train.add_argument("--oversample", action="append", type=_oversample, default=[], metavar="TRAIT=FACTOR",
                       help="draw the windows of identities with this trait (beard, glasses, earrings) FACTOR times "
                            "as often, e.g. beard=3 (repeatable)")
    train.set_defaults(func=run_train)

    distill = subparsers.add_parser("distill", help="consistency-distil a trained teacher into a 1-4 step student")
    distill.add_argument("--teacher", type=Path, required=True, help="the teacher model (stage 3's --out)")
    add_loop_options(distill, steps=1000, lr=1e-5, batch_size=2)
    distill.add_argument("--num-inference-steps", type=int, default=2, help="the student's default steps (1-8)")
    distill.add_argument("--skip", type=int, default=20, help="DDIM solver skip in training timesteps, a divisor of 1000 (LCM: 20; 100 converges faster for 1-2 steps)")
    distill.add_argument("--guidance", type=float, default=2.0, help="teacher guidance folded into the student (>= 1)")
    distill.add_argument("--strength", type=float, default=1.0,
                         help="the student's warm-start strength (0-1]: train only on the grid points it samples from")
    distill.add_argument("--student", type=Path, default=None,
                         help="start the student from this model's backbone (default: the teacher's)")
    distill.set_defaults(func=run_distill)

    merge = subparsers.add_parser("merge", help="task-vector arithmetic: a copy of --base whose backbone (or "
                                                "--component) is base + the sum of SCALE * (TO - FROM)")
    merge.add_argument("--base", type=Path, required=True, help="the model the result is a copy of")
    merge.add_argument("--add", nargs=3, action="append", required=True, metavar=("SCALE", "FROM", "TO"),
                       help="add SCALE times the change from model FROM to model TO (repeatable)")
    merge.add_argument("--component", action="append", default=None,
                       help="the component to merge (repeatable; default: backbone)")
    merge.add_argument("--out", type=Path, required=True, help="the new model directory")
    merge.set_defaults(func=run_merge)


def loop_settings(args: argparse.Namespace, ema_decay: float = 0.999):
    from .loop import LoopSettings

    checks = [
        ("--steps", args.steps, 1, 10**9),
        ("--batch-size", args.batch_size, 1, 4096),
        ("--grad-accum", args.grad_accum, 1, 4096),
        ("--save-every", args.save_every, 1, 10**9),
        ("--log-every", args.log_every, 1, 10**9),
        ("--num-workers", args.num_workers, 0, 256),
        ("--warmup-steps", args.warmup_steps, 0, 10**9),
        ("--seed", args.seed, 0, 2**31 - 1),
    ]
    for flag, value, low, high in checks:
        if not low <= value <= high:
            raise EmoteError(f"{flag} must be between {low} and {high}, got {value}")
    if not 0 < args.lr <= 1:
        raise EmoteError(f"--lr must be in (0, 1], got {args.lr}")
    if not 0 <= ema_decay < 1:
        raise EmoteError(f"--ema-decay must be in [0, 1), got {ema_decay}")
    if args.limit_windows is not None and args.limit_windows < 1:
        raise EmoteError(f"--limit-windows must be at least 1, got {args.limit_windows}")
    if not args.data.is_dir():
        raise EmoteError(f"corpus directory {args.data} does not exist")
    return LoopSettings(
        out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, grad_accum=args.grad_accum,
        mixed_precision=args.mixed_precision, resume=args.resume, save_every=args.save_every,
        log_every=args.log_every, seed=args.seed, num_workers=args.num_workers, ema_decay=ema_decay,
        warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, progress=not args.quiet,
    )


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return widths


def _oversample(text: str) -> tuple[str, int]:
    trait, _, factor = text.partition("=")
    try:
        value = int(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIT=FACTOR, e.g. beard=3, got {text!r}") from None
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"the factor must be between 1 and 100, got {text!r}")
    return trait, value


def _report(result) -> None:
    print(json.dumps({"step": result.step, "model": str(result.model_dir), "steps_per_s": round(result.steps_per_s, 4),
                      "last_loss": result.losses[-1] if result.losses else None}))


def run_train(args: argparse.Namespace) -> int:
    settings = loop_settings(args, args.ema_decay)
    if args.init is not None and not args.init.exists():
        raise EmoteError(f"--init {args.init} does not exist")
    if not 0 <= args.expert_warmup < args.steps:
        raise EmoteError(f"--expert-warmup must be between 0 and --steps - 1, got {args.expert_warmup}")
    if (args.grow_attention or args.grow_audio_locator) and args.init is None:
        raise EmoteError("--grow-attention and --grow-audio-locator add layers to a trained model: pass --init DIR")
    from avatar.config import get_preset

    preset = args.preset or "default"
    get_preset(preset)  # an unknown preset is an EmoteError before anything loads
    from .loop import train_stage

    _report(train_stage(args.stage, args.data, settings, init=args.init, preset=preset,
                        limit_windows=args.limit_windows, frozen=tuple(args.freeze),
                        grow_attention_levels=tuple(args.grow_attention), warm_start=args.warm_start,
                        grow_audio_locator=args.grow_audio_locator, expert_warmup=args.expert_warmup,
                        lip_reading_weight=args.lip_reading_weight,
                        portrait_refiner_channels=args.refiner_channels,
                        refiner_audio_channels=args.refiner_audio_channels,
                        oversample=dict(args.oversample), audio_guidance=args.audio_guidance))
    return 0


def run_distill(args: argparse.Namespace) -> int:
    settings = loop_settings(args)
    if not args.teacher.exists():
        raise EmoteError(f"--teacher {args.teacher} does not exist")
    if not 1 <= args.num_inference_steps <= 8:
        raise EmoteError(f"--num-inference-steps must be between 1 and 8, got {args.num_inference_steps}")
    if not 1 <= args.guidance <= 20:
        raise EmoteError(f"--guidance must be between 1 and 20, got {args.guidance}")
    if not 0 < args.strength <= 1:
        raise EmoteError(f"--strength must be in (0, 1], got {args.strength}")
    if args.student is not None and not args.student.exists():
        raise EmoteError(f"--student {args.student} does not exist")
    from .distill import distill

    result = distill(args.teacher, args.data, settings, num_inference_steps=args.num_inference_steps,
                     skip=args.skip, guidance=args.guidance, limit_windows=args.limit_windows,
                     strength=args.strength, student=args.student)
    _report(result)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    terms = []
    for scale, src, dst in args.add:
        try:
            terms.append((float(scale), Path(src), Path(dst)))
        except ValueError:
            raise EmoteError(f"--add SCALE must be a number, got {scale!r}") from None
    from .merge import merge_task_vectors

    out = merge_task_vectors(args.base, terms, args.out, components=tuple(args.component or ("backbone",)))
    print(json.dumps({"model": str(out), "terms": len(terms)}))
    return 0
