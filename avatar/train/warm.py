"""Stage `warm`: fine-tune a distilled student on the inputs it gets when it samples warm-started.

Consistency distillation shows the student x_t noised from the true frames, with the true previous frames as motion
frames. When it samples, both come from its own output: x_t is its previous frame (or the portrait, per
`ModelConfig.warm_start`) noised, and the motion frames are the frames it drew last. A student trained on the true
frames learns to lean on them (at t = 499 a noised true frame still shows its mouth), and at inference leans on its
own blurred frames instead, window after window. This stage builds what inference builds:
- the motion frames are drawn by the student itself, as a clip's first window over the motion frames' audio (no
  gradient; the window is then trained as a clip's second window), except for windows trained as a first window;
- the window starts from the last of them, or from the portrait, noised to the sampler's first timestep (pure noise
  at strength 1), with noise drawn as the model samples it (`ModelConfig.noise`: with shared noise one image for
  every frame of the window and of its motion frames).
It regresses the student's output there (through the LCM boundary scalings, as `LCMScheduler.step` denoises) onto
the true frames, pseudo-Huber and lip-weighted like distillation, plus an L1 loss on the decoded lip region
(`PIXEL_LIP_LOSS_WEIGHT`) and a lip-sync loss: a mouth expert (`lipsync.py`), trained alongside on the true frames
(through the autoencoder), reads the mouth parameters off the decoded frames, and its reading is pulled to the
parameters the audio was rendered with (`SYNC_LOSS_WEIGHT`). The whole backbone trains; the model keeps its
sampler, steps and strength. It takes 1-step students only: a student of n steps would need its later steps
trained on its own earlier ones, and its motion frames drawn by all n.
Approximations: the motion frames are drawn as a first window of M frames (at inference they are the last M of an
F-frame window), and the face mask is the union of the window's face boxes, as in stage 2 (at inference, the
portrait's).
"""
from __future__ import annotations

import copy

import torch

from avatar import vae as vae_ops
from avatar.data.corpus import MOUTH_COLUMNS
from avatar.errors import EmoteError
from avatar.schedulers import fresh_scheduler
from avatar.unet import BackboneConditions

from .distill import consistency_output, pseudo_huber
from .lipsync import MouthExpert, lip_crops, mouth_error
from .stages import (AUDIO_HISTORY_FRAMES, LipReadingTerm, PipelineModules, face_masks, images_from_uint8, lip_weights,
                     weighted_mean)

# The decoded lip region's mean L1 error, added with this weight to the latent loss. A mouth's opening barely moves the
# 4-channel latent (measured on the fourth run's student: the opening explains ~2 % of its lip-patch latent error, and
# audio features none of it), while in pixels it is the frame's highest-contrast change; MuseTalk and LatentSync
# supervise decoded frames for the same reason. The weight puts both terms at a similar size at the start.
PIXEL_LIP_LOSS_WEIGHT = 0.5
# The mouth expert's reading of the student's frames against the true mouth parameters (`lipsync.mouth_error`, in
# units of each parameter's spread): the pixel loss sees a wrong mouth as a few dark pixels among many; the expert sees
# nothing else. At 0.1 the term is 1.5x its size in raw units at weight 1 (before the seventh run; measured on 24
# training windows, the shipped student and the run's expert) while the opening's weight in it grows 2.4x and the
# width's falls to 0.8x.
SYNC_LOSS_WEIGHT = 0.1
# The expert's own loss, likewise (1.5x its raw size): gradients are clipped jointly with the student's.
EXPERT_LOSS_WEIGHT = 0.1


class WarmStartObjective(PipelineModules):
    uses_expert = True  # the mouth expert of the sync loss, trained alongside

    def __init__(self, pipe, stage: str = "warm", frozen: tuple[str, ...] = (), expert_warmup: int = 0,
                 expert: MouthExpert | None = None):
        super().__init__(pipe, stage, frozen)
        cfg = pipe.config
        if cfg.sampler != "lcm":
            raise EmoteError(f"stage warm fine-tunes a distilled few-step student (sampler lcm); this model samples "
                             f"with {cfg.sampler}: distil it first (emote distill)")
        if cfg.default_steps != 1:
            raise EmoteError(f"stage warm fine-tunes a 1-step student; this model samples {cfg.default_steps} steps: "
                             f"distil it with --num-inference-steps 1")
        self.window_frames = cfg.motion_frames + cfg.frames_per_window
        self.audio_context = AUDIO_HISTORY_FRAMES + cfg.audio_context_frames
        first_step = fresh_scheduler(pipe.scheduler, cfg.default_steps, strength=cfg.strength).timesteps[0]
        self.start_timestep = int(first_step)
        self.mouth_columns = list(MOUTH_COLUMNS)
        if self.uses_expert:
            self.add_expert(expert, expert_warmup)

    def fast_parameters(self) -> list[torch.nn.Parameter]:
        return super().fast_parameters() + (list(self.expert.parameters()) if self.expert is not None else [])

    def shared_noise(self, latent: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """With the model's shared noise, one noise image per sample of the batch (B, 1, C, h, w) for all its frames;
        None when every frame draws its own."""
        if self.cfg.noise != "shared":
            return None
        return torch.randn((latent.shape[0], 1, *latent.shape[1:]), generator=generator).to(latent.device, latent.dtype)

    def first_step(self, start: torch.Tensor, frames: int, cond: BackboneConditions, generator: torch.Generator,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
        """The student's first sampling step over `frames` frames warm-started from `start` (B, C, h, w), from
        `noise` (`shared_noise`) or, if None, noise drawn for every frame."""
        noisy, t = self.first_input(start, frames, generator, noise)
        return consistency_output(self.backbone, noisy, t, cond, self.alphas_cumprod, self.cfg.prediction_type)

    def first_input(self, start: torch.Tensor, frames: int, generator: torch.Generator,
                    noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the student's first sampling step sees (`first_step`): the noisy latents (B, F, C, h, w) and the
        timesteps (B,)."""
        shape = (start.shape[0], frames, *start.shape[1:])
        t = torch.full((shape[0],), self.start_timestep, dtype=torch.long, device=start.device)
        if noise is None:
            noisy = torch.randn(shape, generator=generator).to(start.device, start.dtype)
        else:
            noisy = noise.expand(shape).to(start.device, start.dtype)
        if self.cfg.strength < 1.0:
            noisy = self.noised(start[:, None], noisy, t)
        return noisy, t

    @torch.no_grad()
    def own_motion_frames(self, batch: dict, reference, generator: torch.Generator,
                          noise: torch.Tensor | None = None) -> torch.Tensor:
        """The motion frames as the student draws them as a clip's first window: (B, M, C, h, w)."""
        cfg = self.cfg
        m = cfg.motion_frames
        latent, features = reference
        cond = BackboneConditions(
            reference_bank=features.bank,
            motion=[out[:, None].expand(-1, m, -1, -1, -1).flatten(0, 1) for out in features.outputs],
            audio=self.window_audio(batch["audio"], AUDIO_HISTORY_FRAMES + cfg.audio_context_frames, m),
            speed=batch["speed"][:, :m].float(),
            face_mask=face_masks(batch["face_box"][:, :m], cfg.resolution).to(latent.device, latent.dtype),
        )
        return self.first_step(latent, m, cond, generator, noise).to(latent.dtype)

    def new_frames(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The window's frames after its motion frames, flattened to (B*F, ...): as images, their face boxes and
        their corpus parameters."""
        m = self.cfg.motion_frames
        truth = images_from_uint8(batch["frames"][:, m:].flatten(0, 1), self.cfg.resolution)
        return (truth.to(self.alphas_cumprod.device), batch["face_box"][:, m:].flatten(0, 1),
                batch["params"][:, m:].flatten(0, 1))

    def refined(self, batch: dict, reference, latents: torch.Tensor, decoded: torch.Tensor,
                cond: BackboneConditions) -> torch.Tensor:
        """The window's (B*F) latents and their decodings through the model's PortraitRefiner, as the pipeline
        refines them: with the window's portrait and, for a refiner that hears audio, each frame's audio context."""
        res = self.cfg.resolution
        with torch.no_grad():
            portrait = images_from_uint8(batch["reference"], res).to(decoded.device)
            portrait_decoded = vae_ops.decode(self.vae, reference[0].to(next(self.vae.parameters()).dtype))
        audio = cond.audio.flatten(0, 1) if self.portrait_refiner.hears_audio else None
        return self.refine_frames(latents, decoded, portrait, reference[0], portrait_decoded, audio, cond.face_mask)

    def expert_loss(self, batch: dict, x0: torch.Tensor) -> torch.Tensor:
        """The expert's error on the window's true frames (latents `x0`) as the autoencoder reconstructs them, the
        look the student's frames have at best."""
        m = self.cfg.motion_frames
        with torch.no_grad():
            reconstructed = vae_ops.decode(self.vae, x0.flatten(0, 1).to(next(self.vae.parameters()).dtype)).float()
        crops = lip_crops(reconstructed, batch["face_box"][:, m:].flatten(0, 1))
        return mouth_error(self.expert(crops), self.true_mouths(batch).to(crops.device))

    def true_mouths(self, batch: dict) -> torch.Tensor:
        return batch["params"][:, self.cfg.motion_frames:][..., self.mouth_columns].flatten(0, 1).float()

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        m, res = self.cfg.motion_frames, self.cfg.resolution
        if self.expert_only:  # --expert-warmup: the student is not run, so it gets no gradient and stays as it is
            return EXPERT_LOSS_WEIGHT * self.expert_loss(batch, self.encode_latents(batch["frames"][:, m:]))
        reference = self.reference_features(batch)
        noise = self.shared_noise(reference[0], generator)
        motion = self.own_motion_frames(batch, reference, generator, noise)
        x0, cond, start = self.video_conditions(batch, generator, motion_latents=motion, reference=reference)
        denoised = self.first_step(start, x0.shape[1], cond, generator, noise)
        latent_loss = weighted_mean(pseudo_huber(denoised, x0.float()), self.window_lip_weights(batch, x0))
        truth = images_from_uint8(batch["frames"][:, m:].flatten(0, 1), res).to(denoised.device)
        decoded = vae_ops.decode(self.vae, denoised.flatten(0, 1).to(next(self.vae.parameters()).dtype)).float()
        boxes = batch["face_box"][:, m:]
        # the decoded lip region's L1 error (the frozen decoder passes the gradient on to the latents)
        lips = (lip_weights(boxes, res).flatten(0, 1) > 1).to(decoded.device, decoded.dtype)
        pixel_loss = weighted_mean((decoded - truth).abs(), lips)
        # the expert learns to read true mouths, through the autoencoder as the student's are; the student learns to
        # draw mouths it reads as the true ones
        sync_loss = mouth_error(self.expert.frozen_reading(lip_crops(decoded, boxes.flatten(0, 1))),
                                self.true_mouths(batch).to(decoded.device))
        return (latent_loss + PIXEL_LIP_LOSS_WEIGHT * pixel_loss + SYNC_LOSS_WEIGHT * sync_loss
                + EXPERT_LOSS_WEIGHT * self.expert_loss(batch, x0))


class WarmRefinerObjective(LipReadingTerm, WarmStartObjective):
    """Stage `warm-refiner`: the student's PortraitRefiner, on the latents the student draws when it samples (built
    as the `warm` stage builds them, no gradient), against the true frames; the student stays as it is. The `refiner`
    stage fits it on the autoencoder's latents of true frames, which the student's only resemble. A refiner that
    hears audio hears the window's, as the backbone does. With `lip_reading_weight` > 0, the lip-reading term
    (`LipReadingTerm`) on the refined frames: the L1/L2 loss alone draws an uncertain mouth as the average one."""

    uses_expert = False  # no sync loss: the student does not train

    def __init__(self, pipe, stage: str = "warm-refiner", frozen: tuple[str, ...] = (), lip_reading_weight: float = 0.0,
                 expert: MouthExpert | None = None, expert_warmup: int = 0):
        super().__init__(pipe, stage, frozen)
        if self.portrait_refiner is None:
            raise EmoteError("stage warm-refiner trains the model's portrait refiner: train one with --stage refiner")
        self.add_lip_reader(lip_reading_weight, expert, expert_warmup)

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        m, res = self.cfg.motion_frames, self.cfg.resolution
        truth, boxes, params = self.new_frames(batch)
        if self.expert is not None:
            true_reading, expert_loss = self.read_true_lips(truth, boxes, params)
            if self.expert_only:  # --expert-warmup: the student is not run
                return expert_loss
        with torch.no_grad():
            reference = self.reference_features(batch)
            noise = self.shared_noise(reference[0], generator)
            motion = self.own_motion_frames(batch, reference, generator, noise)
            x0, cond, start = self.video_conditions(batch, generator, motion_latents=motion, reference=reference)
            denoised = self.first_step(start, x0.shape[1], cond, generator, noise).flatten(0, 1)
            decoded = vae_ops.decode(self.vae, denoised.to(next(self.vae.parameters()).dtype))
        refined = self.refined(batch, reference, denoised, decoded, cond)
        error = refined - truth.to(refined.device)
        weights = lip_weights(batch["face_box"][:, m:], res).flatten(0, 1).to(refined.device)
        loss = weighted_mean(error.abs() + error.square(), weights)
        if self.expert is None:
            return loss
        return loss + self.lip_reading_weight * self.lip_reading(refined, boxes, true_reading) + expert_loss


class AudioGuidanceObjective(LipReadingTerm, WarmStartObjective):
    """Stage `warm-guidance`: fold audio guidance into a 1-step student. Sampled with guidance g, the student's step
    is e_silent + g (e_full - e_silent), where e_silent hears no audio: two backbone passes. This stage trains the
    backbone to give that in one, on the inputs it samples from (built as the `warm` stage builds them), against a
    frozen copy of itself with guidance: a self-distillation with no regression onto the true frames, which pull
    an uncertain mouth towards the average one (docs/training.md, item 1). With `lip_reading_weight` > 0, the
    lip-reading term (`LipReadingTerm`) on the frames the student outputs (decoded, then refined by its portrait
    refiner if it has one, whose weights stay fixed): guidance scales what the backbone draws for the audio, which
    inside a beard is little; the term asks for the mouth the expert reads in the true frame. At guidance 1 the copy
    is the student as it was, and holds it there everywhere the term does not move it."""

    uses_expert = False  # the warm stage's sync loss; the lip-reading term brings its own expert

    def __init__(self, pipe, stage: str = "warm-guidance", frozen: tuple[str, ...] = (),
                 audio_guidance: float | None = None, lip_reading_weight: float = 0.0,
                 expert: MouthExpert | None = None, expert_warmup: int = 0):
        if audio_guidance is None or not 1 <= audio_guidance <= 20:  # also refuses nan
            raise EmoteError(f"--audio-guidance must be between 1 and 20, got {audio_guidance}")
        if audio_guidance == 1 and not lip_reading_weight > 0:
            raise EmoteError("--audio-guidance 1 folds nothing in: it holds the student to itself, beside a "
                             "--lip-reading-weight W > 0")
        super().__init__(pipe, stage, frozen)
        self.audio_guidance = audio_guidance
        self.guided = copy.deepcopy(self.backbone).requires_grad_(False)
        self.add_lip_reader(lip_reading_weight, expert, expert_warmup)

    def guided_step(self, noisy: torch.Tensor, t: torch.Tensor, cond: BackboneConditions) -> torch.Tensor:
        """The frozen copy's first step with audio guidance (guidance is affine in the model's output, so it can be
        applied to the denoised latents)."""
        with torch.no_grad():
            full = consistency_output(self.guided, noisy, t, cond, self.alphas_cumprod, self.cfg.prediction_type)
            if self.audio_guidance == 1:  # the copy as it is: an anchor for the lip-reading term
                return full
            silent = BackboneConditions(**{**cond.__dict__, "audio": torch.zeros_like(cond.audio)})
            heard_nothing = consistency_output(self.guided, noisy, t, silent, self.alphas_cumprod,
                                               self.cfg.prediction_type)
        return heard_nothing + self.audio_guidance * (full - heard_nothing)

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        if self.expert is not None:
            truth, boxes, params = self.new_frames(batch)
            true_reading, expert_loss = self.read_true_lips(truth, boxes, params)
            if self.expert_only:  # --expert-warmup: the student is not run
                return expert_loss
        reference = self.reference_features(batch)
        noise = self.shared_noise(reference[0], generator)
        motion = self.own_motion_frames(batch, reference, generator, noise)
        x0, cond, start = self.video_conditions(batch, generator, motion_latents=motion, reference=reference)
        noisy, t = self.first_input(start, x0.shape[1], generator, noise)
        target = self.guided_step(noisy, t, cond).float()
        denoised = consistency_output(self.backbone, noisy, t, cond, self.alphas_cumprod, self.cfg.prediction_type)
        loss = weighted_mean(pseudo_huber(denoised, target), self.window_lip_weights(batch, x0))
        if self.expert is None:
            return loss
        latents = denoised.flatten(0, 1)
        drawn = vae_ops.decode(self.vae, latents.to(next(self.vae.parameters()).dtype)).float()
        if self.portrait_refiner is not None:  # the frames the model outputs (the refiner's weights stay fixed)
            drawn = self.refined(batch, reference, latents, drawn, cond)
        return loss + self.lip_reading_weight * self.lip_reading(drawn, boxes, true_reading) + expert_loss
