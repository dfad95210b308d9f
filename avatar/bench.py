"""`emote bench`: per-stage timings of the model on one device, as one JSON object.

Stages, each reported per video frame: audio encoding, motion-frame ReferenceNet, one backbone (UNet) step, VAE
decode, plus the once-per-portrait reference computation. `fps` is steady-state frames/s of whole windows (audio,
motion features, all steps, decode), i.e. what the streaming engine can sustain on this device with one session.
"""
from __future__ import annotations

import platform
import resource
import time
from statistics import median
from typing import Callable

import numpy as np
import torch

from .config import SAMPLES_PER_FRAME
from .pipeline import AvatarPipeline, WindowInput, window_seed


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return median(times)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_bench(pipe: AvatarPipeline, steps: int, repeats: int = 5, seed: int = 0, strength: float | None = None,
              compile_mode: str | None = None) -> dict:
    """Times each stage; `compile_mode` wraps the backbone in torch.compile first (the first runs compile it, so
    they stay out of the timings like any warm-up)."""
    cfg = pipe.config
    compile_s = 0.0
    if compile_mode is not None:
        pipe.backbone = torch.compile(pipe.backbone, mode=compile_mode)
    strength = cfg.strength if strength is None else strength
    device = pipe.device
    f, m = cfg.frames_per_window, cfg.motion_frames
    rng = np.random.default_rng(seed)
    portrait = rng.integers(0, 256, (cfg.resolution, cfg.resolution, 3), dtype=np.uint8)
    audio = (rng.standard_normal(SAMPLES_PER_FRAME * f * 4) * 0.1).astype(np.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    reference_s = _timed(lambda: pipe.prepare_reference(portrait), device, repeats)
    reference = pipe.prepare_reference(portrait)
    window_audio = audio[: SAMPLES_PER_FRAME * f]
    audio_s = _timed(lambda: pipe.encode_audio(window_audio), device, repeats)
    contexts = pipe.audio_windows(pipe.encode_audio(audio))[:f]
    motion_latents = reference.latent.expand(m, -1, -1, -1).clone()
    motion_s = _timed(lambda: pipe.motion_features(motion_latents), device, repeats)

    def window(steps_: int) -> torch.Tensor:
        w = WindowInput(reference, contexts, torch.full((f,), cfg.default_speed), motion_latents, window_seed(seed, 0))
        return pipe.denoise_windows([w], steps=steps_, strength=strength)

    if compile_mode is not None:
        start = time.perf_counter()
        for _ in range(3):  # compilation, and reduce-overhead's CUDA-graph recording, happen in the first calls
            window(steps)
        compile_s = time.perf_counter() - start
    one_step_s = _timed(lambda: window(1), device, repeats) - motion_s
    latents = window(steps)[0]
    decode_s = _timed(lambda: pipe.decode(latents, reference, audio=contexts), device, repeats)

    def full_window() -> None:
        pipe.encode_audio(window_audio)
        pipe.decode(window(steps)[0], reference, audio=contexts)

    window_s = _timed(full_window, device, repeats)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "preset": cfg.preset,
        "resolution": cfg.resolution,
        "device": str(device),
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "steps": steps,
        "strength": strength,
        "frames_per_window": f,
        "motion_frames": m,
        "threads": torch.get_num_threads(),
        "compile": compile_mode,
        **({"compile_s": round(compile_s, 1)} if compile_mode is not None else {}),
        "ms_per_frame": {
            "audio_encode": 1000 * audio_s / f,
            "motion_reference": 1000 * motion_s / f,
            "unet_step": 1000 * one_step_s / f,
            "decode": 1000 * decode_s / f,  # the autoencoder's decoder, and the portrait refiner if any
            "window_total": 1000 * window_s / f,
        },
        "reference_ms": 1000 * reference_s,
        "fps": f / window_s,
        "params": {
            "vae": _count(pipe.vae),
            "reference_net": _count(pipe.reference_net),
            "backbone": _count(pipe.backbone),
            "audio_encoder": _count(pipe.audio_encoder),
            **({"portrait_refiner": _count(pipe.portrait_refiner)} if pipe.portrait_refiner is not None else {}),
        },
        "peak_memory_mb": round(peak_mb, 1),
        "peak_memory_kind": "cuda_allocated" if device.type == "cuda" else "process_max_rss",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "trained": pipe.trained,
    }
