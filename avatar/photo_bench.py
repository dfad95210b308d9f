"""`emote bench` for the default model: the motion backbone's and the photo renderer's cost on one thread, as the
live engine runs them (windows of `frames_per_window` frames, incremental audio encoding)."""
from __future__ import annotations

import os
import platform
import time

import numpy as np
import torch

from .frame_model import WindowRequest
from .photo_model import MotionPhotoModel


def _context(features: np.ndarray, start: int, count: int, m: int) -> np.ndarray:
    """(count, 2m+1, D) per-frame contexts for frames start..start+count, edges repeated (no future waited)."""
    last = start + count - 1
    index = [[min(max(t + j, 0), last) for j in range(-m, m + 1)] for t in range(start, start + count)]
    return features[np.asarray(index)]


def run_photo_bench(model: MotionPhotoModel, steps: int = 1, seconds: float = 4.0, repeats: int = 3,
                    threads: int = 1) -> dict:
    import cv2

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    avatar = model.example_avatar()
    spec = model.spec
    f, m = spec.frames_per_window, spec.context_frames
    num_frames = int(seconds * spec.fps)
    t = np.arange(num_frames * 640) / spec.sample_rate
    audio = (0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)

    motion_s, render_s, encode_s = [], [], []
    for _ in range(repeats + 1):  # the first pass warms up
        encoder = model.new_audio_encoder()
        t0 = time.perf_counter()
        features = np.asarray(encoder.push(torch.from_numpy(audio)))
        t1 = time.perf_counter()
        carry, motion_time, render_time = None, 0.0, 0.0
        for index, start in enumerate(range(0, min(num_frames, len(features)) - f + 1, f)):
            request = WindowRequest(avatar, _context(features, start, f, m), np.ones(f, bool),
                                    np.ones(f, np.float32), carry, 0, index)
            a = time.perf_counter()
            motion = model.generate_motion([request], steps)[0]
            b = time.perf_counter()
            avatar.state.renderer.render_many(motion)
            motion_time += b - a
            render_time += time.perf_counter() - b
            carry = model.next_carry(carry, motion)
        encode_s.append(t1 - t0)
        motion_s.append(motion_time)
        render_s.append(render_time)
    frames = (min(num_frames, len(features)) // f) * f
    per_second = spec.fps / frames
    motion_ms = 1000 * min(motion_s) * per_second
    encode_ms = 1000 * min(encode_s) / seconds
    render_ms = 1000 * min(render_s) / frames
    frame_ms = (motion_ms + encode_ms) / spec.fps + render_ms
    return {
        "model": spec.name,
        "size": spec.width,
        "steps": steps,
        "threads": threads,
        "frames_per_window": f,
        "motion_ms_per_second_of_video": round(motion_ms + encode_ms, 3),
        "audio_encode_ms_per_second": round(encode_ms, 3),
        "render_ms_per_frame": round(render_ms, 3),
        "frame_ms": round(frame_ms, 3),
        "fps_one_thread": round(1000 / frame_ms, 1),
        "headroom_vs_40ms": round(40 / frame_ms, 2),
        "parameters": sum(p.numel() for p in model.generator.backbone.parameters()),
        "machine": machine(),
    }


def machine() -> dict:
    """CPU model, cores and vector extensions: CPUs differ between machines (AVX2-only ones run about half speed)."""
    name, flags = platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "avx512": "avx512f" in flags, "amx": "amx_tile" in flags,
            "torch": torch.__version__}
