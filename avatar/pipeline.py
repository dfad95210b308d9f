"""AvatarPipeline: portrait + audio -> frames, over sliding windows with motion frames from the previous window.

The pipeline is the model's whole public surface for the layers above it:
- `prepare_reference` runs the VAE encoder and ReferenceNet once per portrait and returns a `ReferenceCache`;
- `encode_audio` turns a waveform into per-frame features, `audio_windows` into each frame's ±m context;
- `denoise_windows` runs the sampler over a batch of windows, possibly from different sessions and portraits;
- `decode` turns latents into uint8 frames (sharpened by the PortraitRefiner, with the portrait, if the model has
  one);
- `render` strings these together for offline use, with memory bounded by one window.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from diffusers.models.modeling_utils import ModelMixin

from . import vae as vae_ops
from .audio import MelAudioEncoder, Wav2Vec2AudioEncoder, mel_encoder_kwargs, window_features
from .checkpoint import load_checkpoint, save_checkpoint, state_fingerprint
from .config import AUDIO_SAMPLE_RATE, ModelConfig, get_preset
from .errors import EmoteError
from .media import frame_count, resize
from .reference import ReferenceCache, stack_banks
from .refiner import PortraitRefiner, build_portrait_refiner, portrait_refiner_kwargs
from .schedulers import build_scheduler, fresh_scheduler
from .unet import BackboneConditions, EmoBackbone, ReferenceNet, backbone_kwargs, reference_net_kwargs
from .vae import build_vae, vae_kwargs

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "checkpoints" / "pixel"
# x0, y0, x1, y1 (normalised) of the face in a face-centred portrait crop: the corpus's framing, which the shipped
# model was trained on (mean neutral face box of its identities: 0.294, 0.178, 0.706, 0.702).
DEFAULT_FACE_BOX = (0.3, 0.18, 0.7, 0.7)


class UntrainedModelWarning(UserWarning):
    """Raised (as a warning) when no trained model is available and random weights are used."""


@dataclass
class WindowInput:
    """One window of F frames for one session."""

    reference: ReferenceCache
    audio: torch.Tensor  # (F, tokens, D): windowed audio features of the window's frames
    speed: torch.Tensor  # (F,) head-rotation speed, deg/frame
    motion_latents: torch.Tensor | None  # (M, C, h, w) last frames of the previous window; None for the first window
    seed: int  # noise for this window: `AvatarPipeline.window_seed` of the session's seed and the window index


def window_seed(seed: int, window_index: int) -> int:
    return (seed * 1_000_003 + window_index) % (2**63)


class AvatarPipeline:
    def __init__(
        self,
        config: ModelConfig,
        vae: torch.nn.Module,
        reference_net: ReferenceNet,
        backbone: EmoBackbone,
        audio_encoder: torch.nn.Module,
        scheduler,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        trained: bool = True,
        portrait_refiner: PortraitRefiner | None = None,
    ):
        self.config = config.validate()
        if (portrait_refiner is None) != (not config.portrait_refiner_channels):
            raise EmoteError("a portrait refiner is needed exactly when the config has portrait_refiner_channels")
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae = _place(vae, self.device, dtype)
        self.reference_net = _place(reference_net, self.device, dtype)
        self.backbone = _place(backbone, self.device, dtype)
        self.audio_encoder = _place(audio_encoder, self.device, torch.float32)  # audio features stay float32
        self.portrait_refiner = None if portrait_refiner is None else _place(portrait_refiner, self.device, dtype)
        self.scheduler = scheduler
        fresh_scheduler(scheduler, self.config.default_steps, strength=self.config.strength)  # fail at load, not later
        self.trained = trained
        self._model_id: str | None = None

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ModelConfig | str, seed: int = 0, device: str = "cpu", random_wav2vec2: bool = False,
                    **kwargs) -> "AvatarPipeline":
        """Randomly initialised weights (seeded) for a preset or config. A wav2vec2 preset needs
        `random_wav2vec2=True`, which is only good for timing: a random wav2vec2 hears nothing."""
        _check_device(device)
        cfg = get_preset(config) if isinstance(config, str) else config.validate()
        if cfg.audio_encoder != "mel" and not random_wav2vec2:
            raise EmoteError("a randomly initialised model needs the mel audio encoder; load wav2vec2 from a directory")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            components = cls._build_components(cfg)
        return cls(cfg, **components, device=device, **kwargs)

    @staticmethod
    def _build_components(cfg: ModelConfig) -> dict:
        return dict(
            vae=build_vae(cfg),
            reference_net=ReferenceNet(**reference_net_kwargs(cfg)),
            backbone=EmoBackbone(**backbone_kwargs(cfg)),
            audio_encoder=(MelAudioEncoder(**mel_encoder_kwargs(cfg)) if cfg.audio_encoder == "mel"
                           else Wav2Vec2AudioEncoder.randomly_initialised(cfg)),
            scheduler=build_scheduler(cfg),
            portrait_refiner=build_portrait_refiner(cfg),
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> "AvatarPipeline":
        """Load a model directory. `None` means the bundled default model; if it has not been trained and shipped
        yet, the `default` preset with random weights, with an UntrainedModelWarning."""
        if path is None:
            if not (BUNDLED_MODEL_DIR / "model_index.json").is_file():
                warnings.warn("no trained model is bundled yet: using the untrained default preset", UntrainedModelWarning, stacklevel=2)
                return cls.from_config("default", device=device, dtype=dtype, trained=False)
            path = BUNDLED_MODEL_DIR
        _check_device(device)
        cfg, components = load_checkpoint(path, expected_component_configs(path))
        return cls(cfg, **components, device=device, dtype=dtype)

    def save_pretrained(self, path: str | Path, training_modules: dict[str, ModelMixin] | None = None) -> None:
        """Write the model directory; `training_modules` are stored with it for training to continue from."""
        save_checkpoint(
            path,
            self.config,
            {
                "vae": self.vae,
                "reference_net": self.reference_net,
                "backbone": self.backbone,
                "audio_encoder": self.audio_encoder,
                "scheduler": self.scheduler,
                **({"portrait_refiner": self.portrait_refiner} if self.portrait_refiner is not None else {}),
            },
            training_modules=training_modules,
        )

    # ---- properties ---------------------------------------------------------------------------------------------

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def default_steps(self) -> int:
        return self.config.default_steps

    @property
    def frames_per_window(self) -> int:
        return self.config.frames_per_window

    @property
    def model_id(self) -> str:
        if self._model_id is None:
            modules = [self.vae, self.reference_net, *([self.portrait_refiner] if self.portrait_refiner else [])]
            self._model_id = state_fingerprint(modules, self.config)
        return self._model_id

    # ---- reference ----------------------------------------------------------------------------------------------

    def face_mask(self, face_box: tuple[float, float, float, float] | None = None) -> torch.Tensor:
        x0, y0, x1, y1 = face_box or DEFAULT_FACE_BOX
        r = self.resolution
        mask = torch.zeros(1, 1, r, r)
        mask[..., int(y0 * r) : max(int(y1 * r), int(y0 * r) + 1), int(x0 * r) : max(int(x1 * r), int(x0 * r) + 1)] = 1
        return mask

    @torch.no_grad()
    def prepare_reference(
        self, portrait: np.ndarray, face_box: tuple[float, float, float, float] | None = None
    ) -> ReferenceCache:
        """portrait: uint8 (S, S, 3), resized to the model resolution. face_box: normalised (x0, y0, x1, y1)."""
        if portrait.ndim != 3 or portrait.shape[2] != 3 or portrait.shape[0] != portrait.shape[1]:
            raise EmoteError(f"portrait must be a square RGB image, got shape {portrait.shape}")
        image = vae_ops.from_uint8(torch.from_numpy(np.array(resize(portrait, self.resolution)))[None]).to(self.device, self.dtype)
        latent = vae_ops.encode(self.vae, image)
        features = self.reference_net(latent)
        return ReferenceCache(
            bank=features.bank,
            motion=features.outputs,
            latent=latent,
            face_mask=self.face_mask(face_box).to(self.device, self.dtype),
            model_id=self.model_id,
            refiner=[] if self.portrait_refiner is None else self.portrait_refiner.portrait_features(
                image, vae_ops.decode(self.vae, latent)),
        )

    # ---- audio --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_audio(self, audio: np.ndarray, sample_rate: int = AUDIO_SAMPLE_RATE) -> torch.Tensor:
        """Mono float audio -> (N, D) per-frame features, N = round(duration * 25)."""
        wave = torch.as_tensor(np.asarray(audio, dtype=np.float32))
        if sample_rate != AUDIO_SAMPLE_RATE:
            wave = resample(wave, sample_rate, AUDIO_SAMPLE_RATE)
        frames = frame_count(wave.shape[0])
        needed = frames * (AUDIO_SAMPLE_RATE // 25)
        wave = torch.nn.functional.pad(wave, (0, max(0, needed - wave.shape[0])))[:needed]
        return self.audio_encoder.encode(wave[None].to(self.device))[0]

    def audio_windows(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, tokens, D): each frame's audio context, frames t-m..t+m."""
        return window_features(features[None], self.config.audio_context_frames)[0]

    # ---- denoising ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def motion_features(self, motion_latents: torch.Tensor) -> list[torch.Tensor]:
        """(B*M, C, h, w) latents of previous frames -> per-slot ReferenceNet outputs for the temporal layers."""
        return self.reference_net(motion_latents.to(self.device, self.dtype)).outputs

    def _motion_for(self, windows: list[WindowInput]) -> list[torch.Tensor]:
        m = self.config.motion_frames
        fresh = [w.motion_latents for w in windows if w.motion_latents is not None]
        computed = iter(zip(*[f.split(m) for f in self.motion_features(torch.cat(fresh))])) if fresh else iter(())
        per_window = []
        for w in windows:
            if w.motion_latents is None:
                per_window.append([t.expand(m, -1, -1, -1) for t in w.reference.motion])
            else:
                per_window.append(list(next(computed)))
        return [torch.cat(slot, dim=0) for slot in zip(*per_window)]

    def window_seed(self, seed: int, window_index: int) -> int:
        """The noise seed of window `window_index` of a session seeded `seed`: its own, or with shared noise
        (`ModelConfig.noise`) the session's first window's, so that every window draws the same noise."""
        return window_seed(seed, 0 if self.config.noise == "shared" else window_index)

    @torch.no_grad()
    def denoise_windows(
        self,
        windows: list[WindowInput],
        steps: int | None = None,
        guidance_scale: float = 1.0,
        audio_guidance_scale: float | None = None,
        sampler: str | None = None,
        strength: float | None = None,
    ) -> torch.Tensor:
        """Sample a batch of windows in one backbone call per step. Returns clean latents (B, F, C, h, w).

        strength (default: the model's): below 1, a warm start: each window starts from its last motion frame (the
        reference for a first window), or from the reference for every window if the model's `warm_start` is
        "portrait", noised to that fraction of the schedule, instead of from pure noise.

        Guidance (for the teacher): eps = e_u + g_ref (e_ref - e_u) + g_audio (e_full - e_ref), where e_u drops the
        reference and the audio, e_ref drops the audio. With both scales 1 only the conditional pass runs; with
        guidance_scale 1 (audio guidance alone, which a student's warm-guidance stage folds in), e_u does not run.
        """
        if not windows:
            raise ValueError("no windows to denoise")
        cfg = self.config
        steps = steps or cfg.default_steps
        strength = cfg.strength if strength is None else strength
        frames = windows[0].audio.shape[0]
        if any(w.audio.shape[0] != frames for w in windows):
            raise ValueError("all windows in a batch must have the same number of frames")
        template = self.scheduler if sampler is None else build_scheduler(cfg, sampler)
        scheduler = fresh_scheduler(template, steps, device=self.device, strength=strength)
        generators = [torch.Generator().manual_seed(w.seed) for w in windows]
        shape = (frames, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        if cfg.noise == "shared":  # one noise image for every frame
            noise = [torch.randn(shape[1:], generator=g).expand(shape) for g in generators]
        else:
            noise = [torch.randn(shape, generator=g) for g in generators]
        latents = torch.stack(noise).to(self.device, self.dtype)
        if strength < 1.0:
            # motion latents may live on the CPU (the streaming engine keeps them there), the reference on the device
            starts = torch.stack([
                _warm_start_latent(w, frames, cfg.warm_start).to(self.device, self.dtype) for w in windows
            ])
            latents = scheduler.add_noise(starts, latents, scheduler.timesteps[:1])
        else:
            latents = latents * scheduler.init_noise_sigma

        cond = BackboneConditions(
            reference_bank=stack_banks([w.reference for w in windows]),
            motion=self._motion_for(windows),
            audio=torch.stack([w.audio for w in windows]).to(self.device, self.dtype),
            speed=torch.stack([w.speed for w in windows]).to(self.device, torch.float32),
            face_mask=torch.cat([w.reference.face_mask for w in windows]).to(self.device, self.dtype),
        )
        g_audio = guidance_scale if audio_guidance_scale is None else audio_guidance_scale
        guided = guidance_scale != 1.0 or g_audio != 1.0
        if guided:
            no_audio = BackboneConditions(**{**cond.__dict__, "audio": torch.zeros_like(cond.audio)})
            uncond = BackboneConditions(**{**no_audio.__dict__, "reference_bank": None})

        denoised = latents
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(latents, t)
            out = self.backbone(model_in, t, cond)
            if guided:
                e_ref = self.backbone(model_in, t, no_audio)
                # with guidance_scale 1 the formula drops e_u: audio guidance alone takes two passes
                e_u = self.backbone(model_in, t, uncond) if guidance_scale != 1.0 else e_ref
                out = e_u + guidance_scale * (e_ref - e_u) + g_audio * (out - e_ref)
            step = scheduler.step(out, t, latents, generator=generators if len(generators) > 1 else generators[0])
            latents = step.prev_sample
            denoised = getattr(step, "denoised", None)
            if denoised is None:
                denoised = step.pred_original_sample
        return denoised

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, references: ReferenceCache | list[ReferenceCache] | None = None,
               refine: bool = True, audio: torch.Tensor | None = None) -> np.ndarray:
        """(N, C, h, w) -> uint8 (N, H, W, 3). `references`: the portrait behind every frame, or a list of N
        (a batch of several sessions); only a model with a PortraitRefiner needs them, and `audio`, each frame's
        audio context (N, tokens, D) as `audio_windows` gives it, only one whose refiner hears audio.
        `refine=False` skips the refiner (the autoencoder's frames, as a model without one decodes)."""
        latents = latents.to(self.device, self.dtype)
        decoded = vae_ops.decode(self.vae, latents)
        if self.portrait_refiner is None or not refine:
            return vae_ops.to_uint8(decoded).numpy()
        if references is None:
            raise ValueError("this model refines its frames with the portrait: pass its ReferenceCache")
        if isinstance(references, ReferenceCache):
            references = [references]
        elif len(references) != len(latents):
            raise ValueError(f"decode needs one reference per latent, got {len(references)} for {len(latents)}")
        levels = len(self.portrait_refiner.decoder_levels)
        if any(len(r.refiner) != levels for r in references):
            raise EmoteError("a reference cache has no portrait-refiner features for this model: prepare it again "
                             "with this model's prepare_reference")
        if not self.portrait_refiner.hears_audio:
            audio = None
        elif audio is None or len(audio) != len(latents):
            raise ValueError("this model's refiner hears each frame's audio: pass one audio context per latent")
        else:
            audio = audio.to(self.device, self.dtype)
        portrait_latent, features, face_mask = _refiner_inputs(references, self.device, self.dtype)
        images = self.portrait_refiner(latents, decoded, portrait_latent, features, audio, face_mask).clamp(-1, 1)
        return vae_ops.to_uint8(images).numpy()

    # ---- offline rendering --------------------------------------------------------------------------------------

    def render(
        self,
        portrait: np.ndarray,
        audio: np.ndarray,
        sample_rate: int = AUDIO_SAMPLE_RATE,
        steps: int | None = None,
        seed: int = 0,
        speed: float | None = None,
        face_box: tuple[float, float, float, float] | None = None,
        guidance_scale: float = 1.0,
        reference: ReferenceCache | None = None,
        strength: float | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield uint8 (R, R, 3) frames, exactly round(duration * 25) of them, one window at a time. `strength`:
        see `denoise_windows` (default: the model's)."""
        cfg = self.config
        reference = reference or self.prepare_reference(portrait, face_box)
        contexts = self.audio_windows(self.encode_audio(audio, sample_rate))
        total = contexts.shape[0]
        speed_value = cfg.default_speed if speed is None else float(speed)
        f, m = cfg.frames_per_window, cfg.motion_frames
        motion = None
        for index, start in enumerate(range(0, total, f)):
            chunk = contexts[start : start + f]
            valid = chunk.shape[0]
            if valid < f:  # the last window: pad with the final frame's context, keep only the valid frames
                chunk = torch.cat([chunk, chunk[-1:].expand(f - valid, -1, -1)])
            window = WindowInput(
                reference=reference,
                audio=chunk,
                speed=torch.full((f,), speed_value),
                motion_latents=motion,
                seed=self.window_seed(seed, index),
            )
            latents = self.denoise_windows([window], steps=steps, guidance_scale=guidance_scale, strength=strength)[0]
            motion = latents[f - m :]
            yield from self.decode(latents[:valid], reference, audio=chunk[:valid])


def _warm_start_latent(window: WindowInput, frames: int, source: str) -> torch.Tensor:
    """What a warm-started window's frames start from: the newest frame before the window ("previous"), or the
    portrait ("portrait")."""
    previous = source == "previous" and window.motion_latents is not None
    last = window.motion_latents[-1:] if previous else window.reference.latent
    return last.expand(frames, -1, -1, -1)


def _refiner_inputs(references: list[ReferenceCache], device: torch.device,
                    dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The PortraitRefiner's portrait inputs for a batch (latent, pyramid, face mask): batch 1 if every frame has the
    same portrait (the common case, no copies), else one row per frame."""
    if all(r is references[0] for r in references):
        references = references[:1]
    latent = torch.cat([r.latent for r in references]).to(device, dtype)
    features = [torch.cat(level).to(device, dtype) for level in zip(*(r.refiner for r in references))]
    return latent, features, torch.cat([r.face_mask for r in references]).to(device, dtype)


def expected_component_configs(path: str | Path) -> dict[str, dict]:
    """What each component's config.json must say, derived from the model index (the single source of truth)."""
    from .checkpoint import read_index

    cfg = ModelConfig.from_dict(read_index(path)["model"])
    expected = {
        "vae": vae_kwargs(cfg),
        "reference_net": reference_net_kwargs(cfg),
        "backbone": backbone_kwargs(cfg),
    }
    if cfg.audio_encoder == "mel":
        expected["audio_encoder"] = mel_encoder_kwargs(cfg)
    if cfg.portrait_refiner_channels:
        expected["portrait_refiner"] = portrait_refiner_kwargs(cfg)
    return expected


def resample(wave: torch.Tensor, source_rate: int, target_rate: int) -> torch.Tensor:
    """Band-limited resampling (scipy's polyphase filter) of a 1-D float waveform."""
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(source_rate, target_rate)
    out = resample_poly(wave.numpy(), target_rate // g, source_rate // g)
    return torch.from_numpy(out.astype(np.float32))


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module.eval()


def _check_device(device: str) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise EmoteError("--device cuda was requested but no CUDA GPU is available")
