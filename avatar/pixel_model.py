"""The pixel EMO pipeline behind the `FrameModel` interface (`--model DIR`, the GPU/research path).

carry = the last `motion_frames` clean latents of the session's previous window; window seeds come from
`AvatarPipeline.window_seed`; `step_seconds` is the denoising time, `fixed_seconds` the decoding time.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import EmoteError
from .frame_model import AvatarHandle, BatchResult, ModelSpec, WindowRequest, WindowResult
from .media import crop_square, resize
from .pipeline import AvatarPipeline, WindowInput
from .portrait import find_face
from .reference import ReferenceCache

CACHE_FILE = "reference.safetensors"


class PixelFrameModel:
    def __init__(self, pipeline: AvatarPipeline, strength: float | None = None, refine: bool = False):
        """`strength`: warm start (`ModelConfig.strength`; 1.0: from pure noise), None: the model's. `refine`: decode
        through the model's portrait refiner (off by default: on a 2-core CPU it adds about 17 ms per frame, and a
        live window then takes longer than it lasts; docs/benchmarks.md)."""
        cfg = pipeline.config
        self.pipeline = pipeline
        self.strength = cfg.strength if strength is None else strength
        self.refine = refine
        if not 0 < self.strength <= 1:
            raise EmoteError(f"strength must be in (0, 1], got {self.strength}")
        if refine and not cfg.portrait_refiner_channels:
            raise EmoteError("refine needs a model with a portrait refiner")
        self.spec = ModelSpec(
            name=f"pixel-{cfg.preset}", width=cfg.resolution, height=cfg.resolution,
            frames_per_window=cfg.frames_per_window, context_frames=cfg.audio_context_frames,
            feature_dim=pipeline.audio_encoder.feature_dim, default_steps=cfg.default_steps, min_steps=cfg.min_steps,
        )

    # ---- avatars ------------------------------------------------------------------------------------------------

    def prepare_avatar(self, avatar_id: str, portrait: np.ndarray, cache_dir: Path | None = None) -> AvatarHandle:
        """Crop the portrait to its face (the centre without one), resize it to the model resolution and run the
        ReferenceNet; with `cache_dir`, its `reference.safetensors` is reused when this model made it."""
        image = np.asarray(portrait)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise EmoteError(f"portrait must be a uint8 RGB image, got {image.dtype} {image.shape}")
        crop = np.array(resize(crop_square(image, find_face(image)), self.spec.width))
        reference = None
        if cache_dir is not None:
            try:
                cached = ReferenceCache.load(Path(cache_dir) / CACHE_FILE, expected_model_id=self.pipeline.model_id)
                reference = cached.to(self.pipeline.device, self.pipeline.dtype)  # safetensors loads onto the CPU
            except EmoteError:  # missing, damaged or made by another model: recompute
                pass
        if reference is None:
            reference = self.pipeline.prepare_reference(crop)
            if cache_dir is not None:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
                reference.save(Path(cache_dir) / CACHE_FILE)  # atomic
        return AvatarHandle(avatar_id, crop, reference)

    def example_avatar(self) -> AvatarHandle:
        r = self.spec.width
        return self.prepare_avatar("example", np.full((r, r, 3), 128, np.uint8))

    def new_audio_encoder(self):
        from .audio_stream import streaming_encoder_for

        return streaming_encoder_for(self.pipeline.audio_encoder)

    # ---- generation ---------------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[WindowRequest], steps: int) -> BatchResult:
        inputs = [
            WindowInput(reference=r.avatar.state, audio=torch.from_numpy(np.ascontiguousarray(r.audio, np.float32)),
                        speed=torch.from_numpy(np.asarray(r.speed, np.float32)), motion_latents=r.carry,
                        seed=self.pipeline.window_seed(r.seed, r.index))
            for r in requests
        ]
        t0 = time.perf_counter()
        latents = self.pipeline.denoise_windows(inputs, steps=steps, strength=self.strength)
        t1 = time.perf_counter()
        b, f = latents.shape[:2]
        references = [w.reference for w in inputs for _ in range(f)]
        audio = torch.cat([w.audio for w in inputs]) if self.refine else None  # what a refiner may hear
        images = self.pipeline.decode(latents.flatten(0, 1), references, refine=self.refine, audio=audio)
        images = images.reshape(b, f, *images.shape[1:])
        latents = latents.cpu()
        windows = [WindowResult(images[j], self._carry(latents[j], r.carry)) for j, r in enumerate(requests)]
        return BatchResult(windows, t1 - t0, time.perf_counter() - t1)

    def _carry(self, latents: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        m = self.pipeline.config.motion_frames
        if latents.shape[0] < m:  # windows shorter than the motion context: keep earlier frames too
            base = previous if previous is not None else latents[:1].expand(m, -1, -1, -1)
            latents = torch.cat([base, latents])
        return latents[-m:].clone()
