"""The EMO training stages: which parameters each stage trains, and the loss it minimises on a batch of windows.

- stage `vae`: the preset's own AutoencoderTiny, as an autoencoder on corpus frames (L1 + L2, weighted up on the
  lips, plus a light pull of the latents towards zero mean and unit variance, which is what the diffusion model
  assumes);
- stage `decoder`: the same loss, the decoder alone: the latent space stays as it is, so a sharper decoder can be
  trained at any time and dropped into a model whose backbone was trained on that latent space;
- stage `refiner`: the same loss for the model's PortraitRefiner (`avatar/refiner.py`), which sharpens the
  autoencoder's decoding of a frame with another frame of the same clip as the portrait; nothing else trains;
- stage `audio`: the mel audio encoder alone, made to predict the corpus's exact mouth parameters (opening, width,
  rounding, teeth, tongue) from its per-frame features through a linear probe: a fast supervised start, so that
  stage 2's cross-attention finds lip-relevant features instead of learning them from the diffusion loss alone, where
  the mouth is ~4% of a frame (the probe is not part of the model);
- stage `1` (image): ReferenceNet + the backbone's spatial layers + face locator, on single frames;
- stage `2` (video): temporal layers, audio cross-attention, the audio projection and the mel encoder, on windows of
  F frames preceded by M motion frames; everything spatial is frozen;
- stage `3` (speed): the speed layers only (EMO froze audio here: training it jointly weakened audio control);
- stage `warm`: a distilled student's whole backbone, on the input it samples from warm-started (`warm.py`);
- stage `warm-refiner`: a student's PortraitRefiner, on the latents the student draws there (`warm.py`);
- stage `warm-guidance`: a student's whole backbone, taught to give in one pass what it gives with audio guidance in
  two (`warm.py`).

Every objective is an `nn.Module` whose `forward(batch, generator)` returns the loss, so that `accelerate` (DDP,
autocast) wraps the whole computation. All randomness comes from `generator`, which makes a step reproducible.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avatar import vae as vae_ops
from avatar.audio import MelAudioEncoder, window_features
from avatar.config import ModelConfig
from avatar.data.corpus import MOUTH_COLUMNS
from avatar.data.visemes import MOUTH_FIELDS
from avatar.errors import EmoteError
from avatar.unet import BackboneConditions, lip_region_grid, parameter_group

from .lipsync import MouthExpert, lip_crops, mouth_error

STAGES = ("vae", "decoder", "refiner", "audio", "1", "2", "3", "warm", "warm-refiner", "warm-guidance")
# the stages that need --init
CONTINUING_STAGES = ("decoder", "refiner", "2", "3", "warm", "warm-refiner", "warm-guidance")
AUTOENCODER_STAGES = ("vae", "decoder", "refiner")  # VaeObjective's
# the stages that may add the lip-reading term
LIP_READING_STAGES = (*AUTOENCODER_STAGES, "warm-refiner", "warm-guidance")
# the trainable networks of a pipeline
COMPONENTS = ("vae", "reference_net", "backbone", "audio_encoder", "portrait_refiner")

# Condition dropout, so that the teacher supports the pipeline's guidance (drop audio; drop reference and audio).
DROP_AUDIO_P = 0.05
DROP_REFERENCE_P = 0.05
# Probability that a window is trained as a clip's first window: motion features from the reference frame.
FIRST_WINDOW_P = 0.2
# Extra frames of audio before the window, so the causal mel encoder sees history as it does at inference.
AUDIO_HISTORY_FRAMES = 8
# Layers that start from zero beside trained ones (the audio locator, the refiner's audio path; the warm stage's mouth
# expert) train at this multiple of --lr. The locator's signal, the mouth's opening, is a small part of any loss
# (docs/training.md), and at the run's LR it stayed near its zero start: output std 1e-4 after 1,000 warm-stage steps.
FAST_LR_SCALE = 30.0
# Stages with a lip-reading term: the mouth expert's LR (the autoencoder's is --lr), and its loss's weight
# (Adam makes the weight matter only where gradients are clipped, which is joint with the autoencoder's). An expert
# fitted alone on true lip crops at this LR read the mouth's opening at r 0.94 within identity (docs/training.md).
LIP_READER_LR = 1e-3
LIP_READER_LOSS_WEIGHT = 0.1
# Every objective but stage 1 weights its loss by 1 + LIP_LOSS_WEIGHT inside the lip region (cf. Hallo's lip loss):
# the mouth covers ~4% of a latent frame, and without the weight its error is drowned by the static rest.
LIP_LOSS_WEIGHT = 4.0


def stage_trains(stage: str, component: str, name: str, cfg: ModelConfig) -> bool:
    """Whether `stage` trains parameter `name` of pipeline component `component`."""
    if stage == "vae":
        return component == "vae"
    if stage == "decoder":
        return component == "vae" and name.startswith("decoder.")
    if stage in ("refiner", "warm-refiner"):
        return component == "portrait_refiner"
    if stage == "audio":
        return component == "audio_encoder" and cfg.audio_encoder == "mel"
    if stage == "1":
        return component == "reference_net" or (component == "backbone" and parameter_group(name) == "spatial")
    if stage == "2":
        if component == "audio_encoder":
            return cfg.audio_encoder == "mel"
        return component == "backbone" and parameter_group(name) in ("temporal", "audio")
    if stage == "3":
        return component == "backbone" and parameter_group(name) == "speed"
    if stage in ("warm", "warm-guidance"):
        return component == "backbone"
    raise EmoteError(f"unknown stage {stage!r} (choose from {', '.join(STAGES)})")


def images_from_uint8(frames: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, R, R) in [-1, 1], resized if the corpus was written at another size."""
    images = vae_ops.from_uint8(frames)
    if images.shape[-1] != resolution or images.shape[-2] != resolution:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return images


def face_masks(face_box: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, F, 4) normalised boxes -> (B, 1, R, R) masks of the union of each window's boxes (EMO's face locator)."""
    x0 = face_box[..., 0].amin(1)
    y0 = face_box[..., 1].amin(1)
    x1 = face_box[..., 2].amax(1)
    y1 = face_box[..., 3].amax(1)
    grid = (torch.arange(resolution, device=face_box.device, dtype=torch.float32) + 0.5) / resolution
    inside_x = (grid[None] >= x0[:, None]) & (grid[None] <= x1[:, None])
    inside_y = (grid[None] >= y0[:, None]) & (grid[None] <= y1[:, None])
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()[:, None]


def lip_weights(face_box: torch.Tensor, size: int) -> torch.Tensor:
    """(B, F, 4) normalised face boxes -> (B, F, 1, size, size) loss weights: 1 + LIP_LOSS_WEIGHT on the lips."""
    _, _, lips = lip_region_grid(face_box.float(), size)
    return (1 + LIP_LOSS_WEIGHT * lips.float())[:, :, None]


def weighted_mean(errors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of per-element `errors` under `weights` (broadcast to them), normalised by the total weight so the loss
    keeps the scale of a plain mean."""
    weights = weights.expand_as(errors)
    return (weights * errors).sum() / weights.sum()


def encode_audio_differentiable(encoder: nn.Module, wave: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T // 640, D), the same features as `encoder.encode` but in one pass that autograd can follow."""
    if not isinstance(encoder, MelAudioEncoder):
        with torch.no_grad():
            return encoder.encode(wave)
    frames = wave.shape[-1] // 640
    padded = F.pad(wave[:, : frames * 640], (encoder.mel.n_fft - encoder.mel.hop, encoder.lookahead_samples))
    return encoder.frame_features(encoder.mel(padded), frames)


def diffusion_target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    raise EmoteError(f"training does not support prediction_type {prediction_type!r}")


def expand_like(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against `target`."""
    return values.reshape(-1, *([1] * (target.dim() - 1))).to(target.dtype)


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    # torch's CPU GroupNorm backward crashes (segfault) on a channels-last-strided input that needs no gradient
    # while the norm's weight does, which is what stage 2 hits at the first trainable temporal layer.
    return (args[0].contiguous(), *args[1:])


class PipelineModules(nn.Module):
    """The pipeline's networks under one module, the unit that `accelerate` prepares and checkpoints."""

    def __init__(self, pipe, stage: str, frozen: tuple[str, ...] = ()):
        super().__init__()
        self.cfg: ModelConfig = pipe.config
        self.stage = stage
        self.frozen = frozen
        self.vae = pipe.vae
        self.reference_net = pipe.reference_net
        self.backbone = pipe.backbone
        self.audio_encoder = pipe.audio_encoder
        self.portrait_refiner = pipe.portrait_refiner
        for module in (*self.backbone.modules(), *self.reference_net.modules()):
            if isinstance(module, nn.GroupNorm):
                module.register_forward_pre_hook(_contiguous_input)
        self.register_buffer(
            "alphas_cumprod", pipe.scheduler.alphas_cumprod.detach().clone().float(), persistent=False
        )
        self.expert: MouthExpert | None = None
        self.expert_warmup = 0
        self.expert_only = False

    def add_expert(self, expert: MouthExpert | None, warmup: int) -> None:
        """Train a mouth expert alongside (`expert`, or a new one; `lipsync.py`), which is not part of the model; its
        first `warmup` steps train it alone (the objective's forward then skips the model)."""
        self.expert = expert if expert is not None else MouthExpert(len(MOUTH_FIELDS))
        self.expert_warmup = warmup
        self.expert_only = warmup > 0

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        picked = []
        for component in COMPONENTS:
            if component in self.frozen or getattr(self, component) is None:
                continue
            for name, param in getattr(self, component).named_parameters():
                if stage_trains(self.stage, component, name, self.cfg):
                    picked.append((f"{component}.{name}", param))
        if self.expert is not None:
            picked += [(f"expert.{n}", p) for n, p in self.expert.named_parameters()]
        return picked

    def set_trainable(self) -> list[nn.Parameter]:
        """requires_grad on exactly the stage's parameters; BatchNorm statistics update only where trained."""
        self.requires_grad_(False)
        self.eval()
        named = self.trainable_named_parameters()
        params = [p for _, p in named]
        for p in params:
            p.requires_grad_(True)
        if any(name.startswith("audio_encoder.") for name, _ in named):
            self.audio_encoder.train()
        if not params:
            raise EmoteError(f"stage {self.stage} has no parameters to train in preset {self.cfg.preset}")
        return params

    def begin_step(self, step: int) -> None:
        """Called by the loop before each optimizer step: the expert trains alone for its warmup steps."""
        self.expert_only = step < self.expert_warmup

    def fast_parameters(self) -> list[nn.Parameter]:
        """Parameters that train at FAST_LR_SCALE x the LR (if the stage trains them): the paths that carry the audio
        to the mouth, whose output layers start from zero (their embeddings with them)."""
        fast = list(self.backbone.audio_locator.parameters()) if self.backbone.audio_locator is not None else []
        return fast + (self.portrait_refiner.audio_parameters() if self.portrait_refiner is not None else [])

    def optimizer_groups(self, params: list[nn.Parameter], lr: float) -> list[dict]:
        """`params` (from `set_trainable`) as optimizer parameter groups: `fast_parameters` at FAST_LR_SCALE x `lr`,
        the rest at `lr`."""
        fast = {id(p) for p in self.fast_parameters()}
        groups = [{"params": [p for p in params if id(p) not in fast], "lr": lr},
                  {"params": [p for p in params if id(p) in fast], "lr": lr * FAST_LR_SCALE}]
        return [g for g in groups if g["params"]]

    # ---- shared pieces of the diffusion objectives -------------------------------------------------------------

    def encode_latents(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, N, H, W, 3) uint8 -> (B, N, C, h, w) latents of the frozen VAE."""
        b, n = frames.shape[:2]
        with torch.no_grad():
            images = images_from_uint8(frames.flatten(0, 1), self.cfg.resolution).to(self.alphas_cumprod.device)
            latents = vae_ops.encode(self.vae, images.to(next(self.vae.parameters()).dtype))
        return latents.reshape(b, n, *latents.shape[1:])

    def add_noise(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random timesteps and noise: returns (noisy, timesteps (B,), diffusion target)."""
        b = x0.shape[0]
        t = torch.randint(0, self.cfg.num_train_timesteps, (b,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        alpha_bar = expand_like(self.alphas_cumprod[t], x0)
        return self.noised(x0, noise, t), t, diffusion_target(self.cfg.prediction_type, x0, noise, alpha_bar)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 noised to timesteps t (B,), as the schedulers' add_noise: sqrt(a) x0 + sqrt(1 - a) noise."""
        alpha_bar = expand_like(self.alphas_cumprod[t], noise)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def window_audio(self, wave: torch.Tensor, skip_frames: int, frames: int) -> torch.Tensor:
        """Dataset audio (starting `skip_frames` frames before the first target frame) -> (B, F, tokens, D)."""
        grad = any(p.requires_grad for p in self.audio_encoder.parameters())
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            features = encode_audio_differentiable(self.audio_encoder, wave.float())
        windows = window_features(features, self.cfg.audio_context_frames)
        return windows[:, skip_frames : skip_frames + frames]

    def drop_conditions(self, cond: BackboneConditions, generator: torch.Generator) -> BackboneConditions:
        b = cond.audio.shape[0]
        keep_audio = (torch.rand(b, generator=generator) >= DROP_AUDIO_P).to(cond.audio.device, cond.audio.dtype)
        drop_reference = bool(torch.rand(1, generator=generator) < DROP_REFERENCE_P)
        audio = cond.audio * keep_audio.reshape(b, 1, 1, 1)
        if drop_reference:
            audio = torch.zeros_like(audio)  # the pipeline's unconditional pass drops both
        return BackboneConditions(
            reference_bank=None if drop_reference else cond.reference_bank,
            motion=cond.motion, audio=audio, speed=cond.speed, face_mask=cond.face_mask,
        )

    def refine_frames(self, latents: torch.Tensor, decoded: torch.Tensor, portrait: torch.Tensor,
                      portrait_latent: torch.Tensor, portrait_decoded: torch.Tensor, audio: torch.Tensor | None = None,
                      face_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The PortraitRefiner over (B*F) frames' latents and decodings, each window's F frames refined with its
        own portrait: (B, 3, R, R) image, its latent and its decoding; for a refiner that hears audio, the frames'
        audio contexts (B*F, tokens, D) and each window's face mask (B, 1, R, R)."""
        frames = len(latents) // len(portrait)
        features = [f.repeat_interleave(frames, 0)
                    for f in self.portrait_refiner.portrait_features(portrait, portrait_decoded)]
        masks = None if face_mask is None else face_mask.repeat_interleave(frames, 0)
        return self.portrait_refiner(latents, decoded, portrait_latent.repeat_interleave(frames, 0), features,
                                     audio, masks).float()

    def window_lip_weights(self, batch: dict, x0: torch.Tensor) -> torch.Tensor:
        """Loss weights for the target latents x0 (B, F, C, h, w) of a window: the frames after the motion frames."""
        return lip_weights(batch["face_box"][:, self.cfg.motion_frames :], x0.shape[-1]).to(x0.device)

    def reference_features(self, batch: dict):
        """The window's portrait through the frozen VAE and ReferenceNet: (latent (B, C, h, w), SlotFeatures)."""
        with torch.no_grad():
            latent = self.encode_latents(batch["reference"][:, None])[:, 0]
            return latent, self.reference_net(latent)

    def video_conditions(
        self, batch: dict, generator: torch.Generator, motion_latents: torch.Tensor | None = None, reference=None
    ) -> tuple[torch.Tensor, BackboneConditions, torch.Tensor]:
        """A window of M motion + F target frames -> (target latents (B, F, C, h, w), conditions, warm-start latents
        (B, C, h, w)).

        ReferenceNet is frozen here; motion features come from the ground-truth previous frames (or `motion_latents`
        (B, M, C, h, w) in their place), or (with FIRST_WINDOW_P) from the reference frame repeated, as inference does
        for a clip's first window. The warm-start latent is what a warm-started window starts from at inference
        (`ModelConfig.warm_start`): the last motion frame (the reference for a first window), or the reference.
        `reference`: `reference_features(batch)`, if the caller has it already."""
        cfg = self.cfg
        m, f = cfg.motion_frames, cfg.frames_per_window
        latents = self.encode_latents(batch["frames"])
        b = latents.shape[0]
        x0 = latents[:, m:]
        motion_latents = latents[:, :m] if motion_latents is None else motion_latents
        reference_latent, reference = reference or self.reference_features(batch)
        with torch.no_grad():
            motion = self.reference_net(motion_latents.flatten(0, 1)).outputs
        first = (torch.rand(b, generator=generator) < FIRST_WINDOW_P).to(latents.device)
        from_reference = first if cfg.warm_start == "previous" else torch.ones_like(first)
        start = torch.where(from_reference.reshape(b, 1, 1, 1), reference_latent, motion_latents[:, -1])
        motion = [
            torch.where(
                first.reshape(b, 1, 1, 1, 1),
                ref_out[:, None].expand(-1, m, -1, -1, -1),
                mot.reshape(b, m, *mot.shape[1:]),
            ).flatten(0, 1)
            for ref_out, mot in zip(reference.outputs, motion)
        ]
        cond = BackboneConditions(
            reference_bank=reference.bank,
            motion=motion,
            audio=self.window_audio(batch["audio"], AUDIO_HISTORY_FRAMES + cfg.audio_context_frames + m, f),
            speed=batch["speed"][:, m:].float(),
            face_mask=face_masks(batch["face_box"][:, m:], cfg.resolution).to(latents.device, latents.dtype),
        )
        return x0, cond, start


class LipReadingTerm(PipelineModules):
    """The lip-reading term, for the objectives that draw frames in pixels (`LIP_READING_STAGES`): a mouth expert
    (`lipsync.py`) learns the corpus's mouth parameters from the true frames' lip region, and its reading of the drawn
    frames is pulled to its reading of the true ones. It never trains on a drawn frame, so the network cannot teach it
    to read its mouths kindly. An L1/L2 loss sees a mouth's opening as a few dark pixels; the term sees nothing else
    (docs/training.md: it raised the student's lip sync with a decoder trained under it)."""

    lip_reading_weight = 0.0

    def add_lip_reader(self, weight: float, expert: MouthExpert | None, warmup: int) -> None:
        self.lip_reading_weight = weight
        if weight > 0:
            self.add_expert(expert, warmup)

    def optimizer_groups(self, params: list[nn.Parameter], lr: float) -> list[dict]:
        """The expert fits its own task at LIP_READER_LR, whatever LR the network trains at (the warmup and
        schedule apply to it as to every group, and so does a --resume with another --lr)."""
        if self.expert is None:
            return super().optimizer_groups(params, lr)
        own = list(self.expert.parameters())
        ids = {id(p) for p in own}
        rest = [p for p in params if id(p) not in ids]
        return super().optimizer_groups(rest, lr) + [{"params": own, "lr": LIP_READER_LR}]

    def read_true_lips(self, truth: torch.Tensor, boxes: torch.Tensor,
                       params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, R, R) true frames, their (N, 4) face boxes and (N, P) corpus parameters -> (the expert's reading of
        their mouths, the expert's own loss)."""
        reading = self.expert(lip_crops(truth, boxes))
        true_mouths = params[..., self.mouth_columns].float().to(truth.device)
        return reading, LIP_READER_LOSS_WEIGHT * mouth_error(reading, true_mouths)

    def lip_reading(self, drawn: torch.Tensor, boxes: torch.Tensor, true_reading: torch.Tensor) -> torch.Tensor:
        """The term (unweighted) for (N, 3, R, R) drawn frames against `read_true_lips`'s reading."""
        drawn_reading = self.expert.frozen_reading(lip_crops(drawn, boxes))
        # in float32: under bf16 autocast both readings come out of the expert's Linear in bf16
        return mouth_error(drawn_reading.float(), true_reading.detach().float())


class VaeObjective(LipReadingTerm):
    """Stages `vae` and `decoder`: reconstruct corpus frames through the AutoencoderTiny (no latent quantisation),
    L1 + L2 weighted up on the lips like the video stages (the oracle's lip-sync measure lives there). Stage
    `refiner`: the same, through the frozen encoder and the PortraitRefiner, with the window's reference frame
    (another frame of the clip) as the portrait. With `lip_reading_weight` > 0, the lip-reading term
    (`LipReadingTerm`) on the reconstructions."""

    window_frames = 1
    audio_context = 0
    latent_reg_weight = 0.01

    def __init__(self, pipe, stage: str = "vae", frozen: tuple[str, ...] = (), lip_reading_weight: float = 0.0,
                 expert: MouthExpert | None = None, expert_warmup: int = 0):
        super().__init__(pipe, stage, frozen)
        if stage in ("decoder", "refiner"):
            self.latent_reg_weight = 0.0  # the encoder is frozen: the term has no gradient
        if stage == "refiner" and self.portrait_refiner is None:
            raise EmoteError("stage refiner needs a model with a portrait refiner (portrait_refiner_channels)")
        if stage == "refiner" and self.portrait_refiner.hears_audio:
            raise EmoteError("stage refiner trains on single frames, without audio; this refiner hears audio: "
                             "train it with --stage warm-refiner")
        if stage != "refiner" and pipe.config.vae_type != "tiny":
            raise EmoteError(f"stage {stage} trains the preset's own AutoencoderTiny; a KL autoencoder comes pretrained")
        self.mouth_columns = list(MOUTH_COLUMNS)
        self.add_lip_reader(lip_reading_weight, expert, expert_warmup)

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        device = self.alphas_cumprod.device
        truth = images_from_uint8(batch["frames"].flatten(0, 1), self.cfg.resolution).to(device)
        boxes = batch["face_box"].flatten(0, 1)
        if self.expert is not None:
            true_reading, expert_loss = self.read_true_lips(truth, boxes, batch["params"].flatten(0, 1))
            if self.expert_only:  # --expert-warmup: the autoencoder is not run, so it stays as it is
                return expert_loss
        reference = images_from_uint8(batch["reference"], self.cfg.resolution).to(device)
        res = truth.shape[-1]
        if self.stage == "refiner":
            images, recon = truth, self.decode_with_portrait(truth, reference)
            weights = lip_weights(batch["face_box"], res).flatten(0, 1).to(device)
        else:
            images = torch.cat([truth, reference])
            latents = self.vae.encode(images).latents
            recon = self.vae.decode(latents).sample.float()
            weights = torch.cat([
                lip_weights(batch["face_box"], res).flatten(0, 1).to(device),
                torch.ones(len(batch["reference"]), 1, res, res, device=device),  # its face box is not known
            ])
        error = recon - images
        loss = weighted_mean(error.abs() + error.square(), weights)
        if self.latent_reg_weight:
            lat = latents.float()
            loss = loss + self.latent_reg_weight * (lat.mean().square() + (lat.var() - 1).square())
        if self.expert is None:
            return loss
        term = self.lip_reading(recon[: len(truth)], boxes, true_reading)
        return loss + self.lip_reading_weight * term + expert_loss

    def decode_with_portrait(self, truth: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """(B*F, 3, R, R) true frames, (B, 3, R, R) their windows' reference frames -> the PortraitRefiner's
        reconstructions of the true frames, from the frozen autoencoder's latents and decodings."""
        with torch.no_grad():
            images = torch.cat([truth, reference]).to(next(self.vae.parameters()).dtype)
            latents = vae_ops.encode(self.vae, images)
            decoded = vae_ops.decode(self.vae, latents)
        n = len(truth)
        return self.refine_frames(latents[:n], decoded[:n], reference, latents[n:], decoded[n:])


class AudioObjective(PipelineModules):
    """Stage `audio`: per-frame mouth parameters from the audio features the backbone attends to (the frame and its
    +-context neighbours), through a linear probe; the loss is their mean squared error."""

    window_frames = 12

    def __init__(self, pipe, stage: str = "audio", frozen: tuple[str, ...] = ()):
        super().__init__(pipe, stage, frozen)
        if pipe.config.audio_encoder != "mel":
            raise EmoteError("stage audio trains the mel audio encoder; this model's wav2vec2 encoder is pretrained")
        self.audio_context = AUDIO_HISTORY_FRAMES + pipe.config.audio_context_frames
        self.mouth_columns = list(MOUTH_COLUMNS)
        self.probe = nn.Linear(pipe.config.audio_tokens_per_frame * pipe.config.audio_feature_dim, len(MOUTH_FIELDS))

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return super().trainable_named_parameters() + [(f"probe.{n}", p) for n, p in self.probe.named_parameters()]

    def predict_mouth(self, audio: torch.Tensor, frames: int) -> torch.Tensor:
        """Dataset audio (with `audio_context` frames either side) -> (B, frames, len(MOUTH_FIELDS))."""
        features = self.window_audio(audio, self.audio_context, frames)
        return self.probe(features.flatten(2).float())

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        target = batch["params"][..., self.mouth_columns].float()
        return F.mse_loss(self.predict_mouth(batch["audio"], target.shape[1]), target)


class ImageObjective(PipelineModules):
    """Stage 1: denoise single frames given the reference (ReferenceNet trained) and the face mask; no audio,
    no motion frames (the temporal layers, zero-initialised and frozen, stay the identity)."""

    window_frames = 1
    audio_context = 0

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        x0 = self.encode_latents(batch["frames"])  # (B, 1, C, h, w)
        b = x0.shape[0]
        reference = self.reference_net(self.encode_latents(batch["reference"][:, None])[:, 0])
        cond = BackboneConditions(
            reference_bank=reference.bank,
            motion=None,
            audio=torch.zeros(b, 1, cfg.audio_tokens_per_frame, cfg.audio_feature_dim, device=x0.device, dtype=x0.dtype),
            speed=batch["speed"].float().to(x0.device),
            face_mask=face_masks(batch["face_box"], cfg.resolution).to(x0.device, x0.dtype),
        )
        cond = self.drop_conditions(cond, generator)
        noisy, t, target = self.add_noise(x0, generator)
        return F.mse_loss(self.backbone(noisy, t, cond).float(), target.float())


class VideoObjective(PipelineModules):
    """Stages 2 and 3: denoise F frames with motion frames, audio and speed."""

    def __init__(self, pipe, stage: str, frozen: tuple[str, ...] = ()):
        super().__init__(pipe, stage, frozen)
        self.window_frames = pipe.config.motion_frames + pipe.config.frames_per_window
        self.audio_context = AUDIO_HISTORY_FRAMES + pipe.config.audio_context_frames

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        x0, cond, _ = self.video_conditions(batch, generator)
        cond = self.drop_conditions(cond, generator)
        noisy, t, target = self.add_noise(x0, generator)
        error = self.backbone(noisy, t, cond).float() - target.float()
        return weighted_mean(error.square(), self.window_lip_weights(batch, x0))


def build_objective(stage: str, pipe, frozen: tuple[str, ...] = (), expert_warmup: int = 0,
                    expert: MouthExpert | None = None, lip_reading_weight: float = 0.0,
                    audio_guidance: float | None = None) -> PipelineModules:
    """The objective of `stage`; components named in `frozen` stay fixed even where the stage would train them;
    `lip_reading_weight`: the lip-reading term of `LIP_READING_STAGES` (none at 0); `expert`: the mouth expert that
    stage warm, or the lip-reading term, starts from (a new one if None); `expert_warmup`: the steps that train it
    alone; `audio_guidance`: the scale stage warm-guidance folds in (required there)."""
    unknown = sorted(set(frozen) - set(COMPONENTS))
    if unknown:
        raise EmoteError(f"cannot freeze {', '.join(unknown)} (choose from {', '.join(COMPONENTS)})")
    if stage in AUTOENCODER_STAGES:
        return VaeObjective(pipe, stage, frozen, lip_reading_weight=lip_reading_weight, expert=expert,
                            expert_warmup=expert_warmup)
    if stage == "audio":
        return AudioObjective(pipe, stage, frozen)
    if stage == "1":
        return ImageObjective(pipe, stage, frozen)
    if stage in ("2", "3"):
        return VideoObjective(pipe, stage, frozen)
    if stage == "warm":
        from .warm import WarmStartObjective  # it builds on distillation, which builds on this module

        return WarmStartObjective(pipe, stage, frozen, expert_warmup=expert_warmup, expert=expert)
    if stage == "warm-refiner":
        from .warm import WarmRefinerObjective

        return WarmRefinerObjective(pipe, stage, frozen, lip_reading_weight=lip_reading_weight, expert=expert,
                                    expert_warmup=expert_warmup)
    if stage == "warm-guidance":
        from .warm import AudioGuidanceObjective

        return AudioGuidanceObjective(pipe, stage, frozen, audio_guidance=audio_guidance,
                                      lip_reading_weight=lip_reading_weight, expert=expert, expert_warmup=expert_warmup)
    raise EmoteError(f"unknown stage {stage!r} (choose from {', '.join(STAGES)})")
