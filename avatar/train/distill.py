"""Latent consistency distillation (LCM, arXiv 2310.04378) of a trained many-step teacher into a 1-4-step student.

Per training window:
1. pick a point t of the skipping grid (every `skip` training timesteps: 19, 39, ..., 999 for skip 20) and noise the
   clean latents to x_t; the student's LCMScheduler samples on the same grid (`original_inference_steps` T / skip);
2. the frozen teacher, with classifier-free guidance at a FIXED scale w (the pipeline's guidance: reference+audio vs.
   nothing), takes one DDIM step from t to t - skip;
3. the target is the EMA copy of the student (decay 0.95) evaluated at t - skip, the student is evaluated at t, both
   through the consistency boundary scalings c_skip(t) x_t + c_out(t) x0(t) (sigma_data 0.5, timestep scale 10, as
   diffusers' LCMScheduler uses at inference);
4. the loss is the pseudo-Huber distance sqrt(d^2 + c^2) - c, c = 0.001, weighted up on the lips as the video
   stages' loss is (`stages.lip_weights`).

Guidance is folded in at one fixed w (`--guidance`) rather than through a w-embedding: a w-embedding would need a new
input in EmoBackbone. The student therefore samples with guidance 1 (one backbone pass per step) and behaves like
the teacher at scale w. The student's EMA target is the model that is exported, with the LCM scheduler.

A student that will sample warm-started at `strength` s (each window from the previous one's latent noised to about
s T, `AvatarPipeline.denoise_windows`) only ever runs at grid points up to s T: `--strength` trains on those points
alone, so all of a short run goes where the student samples, and the student is exported with that strength.
`--student` starts the student (and its target) from another student's backbone instead of the teacher's, to
continue a distillation with new settings.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from avatar.errors import EmoteError
from avatar.unet import BackboneConditions, backbone_kwargs

from .loop import EMA, LoopResult, LoopSettings, open_dataset, resolve_model_dir, run_loop
from .stages import AUDIO_HISTORY_FRAMES, PipelineModules, expand_like, weighted_mean

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
HUBER_C = 0.001
TARGET_EMA_DECAY = 0.95


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip, c_out of the consistency parameterisation at training timesteps t; c_skip(0) = 1, c_out(0) = 0."""
    scaled = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def x0_and_eps(output: torch.Tensor, noisy: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str):
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (noisy - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * noisy - s * output, s * noisy + a * output
    raise EmoteError(f"distillation does not support prediction_type {prediction_type!r}")


def consistency_output(net: nn.Module, noisy: torch.Tensor, t: torch.Tensor, cond: BackboneConditions,
                       alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The consistency model's clean estimate c_skip(t) x_t + c_out(t) x0(t), as `LCMScheduler.step` denoises."""
    alpha_bar = expand_like(alphas_cumprod[t], noisy)
    x0, _ = x0_and_eps(net(noisy, t, cond).float(), noisy.float(), alpha_bar.float(), prediction_type)
    c_skip, c_out = boundary_scalings(t)
    return expand_like(c_skip, noisy) * noisy.float() + expand_like(c_out, noisy) * x0


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-element sqrt(d^2 + c^2) - c (LCM's loss)."""
    return ((prediction - target) ** 2 + HUBER_C**2).sqrt() - HUBER_C


class ConsistencyDistillation(PipelineModules):
    """Student (trained), teacher (frozen) and target (EMA of the student) backbones over one frozen pipeline."""

    def __init__(self, teacher_pipe, skip: int, guidance: float, strength: float = 1.0, student_backbone=None):
        super().__init__(teacher_pipe, stage="distill")
        cfg = teacher_pipe.config
        if not 1 <= skip < cfg.num_train_timesteps or cfg.num_train_timesteps % skip:
            raise EmoteError(f"--skip must divide the {cfg.num_train_timesteps} training timesteps (e.g. 20, 50, 100), "
                             f"got {skip}")
        self.skip = skip
        self.guidance = guidance
        self.window_frames = cfg.motion_frames + cfg.frames_per_window
        self.audio_context = AUDIO_HISTORY_FRAMES + cfg.audio_context_frames
        self.teacher = copy.deepcopy(teacher_pipe.backbone).requires_grad_(False)
        if student_backbone is not None:
            self.backbone.load_state_dict(student_backbone.state_dict())
        self.target = copy.deepcopy(self.backbone).requires_grad_(False)
        # grid of DDIM solver points: skip-1, 2 skip-1, ..., T-1 (LCMScheduler's origin timesteps); at strength s only
        # the first int(n s) of the n points, which are LCMScheduler.set_timesteps(strength=s)'s
        points = cfg.num_train_timesteps // skip
        kept = int(points * strength) if 0 < strength <= 1 else 0
        if kept < 1:
            raise EmoteError(f"--strength must be in (0, 1] and keep at least one of the {points} grid points, "
                             f"got {strength}")
        self.register_buffer("grid", torch.arange(skip - 1, cfg.num_train_timesteps, skip)[:kept], persistent=False)

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"backbone.{n}", p) for n, p in self.backbone.named_parameters()]

    def consistency(self, net: nn.Module, noisy, t, cond) -> torch.Tensor:
        return consistency_output(net, noisy, t, cond, self.alphas_cumprod, self.cfg.prediction_type)

    @torch.no_grad()
    def teacher_ddim_step(self, noisy, t, t_prev, cond: BackboneConditions) -> torch.Tensor:
        out = self.teacher(noisy, t, cond)
        if self.guidance != 1.0:
            uncond = BackboneConditions(**{**cond.__dict__, "audio": torch.zeros_like(cond.audio), "reference_bank": None})
            out_u = self.teacher(noisy, t, uncond)
            out = out_u + self.guidance * (out - out_u)
        alpha_bar = expand_like(self.alphas_cumprod[t], noisy)
        x0, eps = x0_and_eps(out.float(), noisy.float(), alpha_bar.float(), self.cfg.prediction_type)
        alpha_prev = expand_like(self.alphas_cumprod[t_prev], noisy).float()
        return (alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps).to(noisy.dtype)

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        x0, cond, _ = self.video_conditions(batch, generator)
        b = x0.shape[0]
        index = torch.randint(0, len(self.grid), (b,), generator=generator).to(x0.device)
        t = self.grid[index]
        t_prev = (t - self.skip).clamp(min=0)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        noisy = self.noised(x0, noise, t)

        prediction = self.consistency(self.backbone, noisy, t, cond)
        x_prev = self.teacher_ddim_step(noisy, t, t_prev, cond)
        with torch.no_grad():
            target = self.consistency(self.target, x_prev, t_prev, cond)
        return weighted_mean(pseudo_huber(prediction, target), self.window_lip_weights(batch, x0))


def distill(teacher: str | Path, data: str | Path, settings: LoopSettings, num_inference_steps: int = 2,
            skip: int = 20, guidance: float = 2.0, limit_windows: int | None = None, strength: float = 1.0,
            student: str | Path | None = None) -> LoopResult:
    """Distil `teacher` (a model directory) into a student saved under `settings.out / "model"` with the LCM sampler,
    `num_inference_steps` default steps and warm-start `strength`; `student` (a model directory) sets the student's
    starting weights, by default the teacher's."""
    from avatar.pipeline import AvatarPipeline
    from avatar.schedulers import build_scheduler

    if not 1 <= num_inference_steps <= 8:
        raise EmoteError(f"--num-inference-steps must be between 1 and 8, got {num_inference_steps}")
    if not 1.0 <= guidance <= 20.0:
        raise EmoteError(f"--guidance must be between 1 and 20, got {guidance}")
    pipe = AvatarPipeline.from_pretrained(resolve_model_dir(teacher))
    start = None
    if student is not None:
        start = AvatarPipeline.from_pretrained(resolve_model_dir(student))
        if not same_backbone(start, pipe):
            raise EmoteError(f"--student {student} has another backbone or noise schedule than the teacher's; distil "
                             f"from the teacher it was distilled from")
    objective = ConsistencyDistillation(pipe, skip=skip, guidance=guidance, strength=strength,
                                        student_backbone=start.backbone if start else None)
    del start  # its weights are in the objective now
    grid = len(objective.grid)
    if num_inference_steps > grid:
        raise EmoteError(f"--num-inference-steps {num_inference_steps} exceeds the {grid} points of the "
                         f"--skip {skip} grid at --strength {strength:g}")
    pipe.config = pipe.config.replace(sampler="lcm", default_steps=num_inference_steps, strength=strength,
                                      min_steps=min(pipe.config.min_steps, num_inference_steps)).validate()
    # The student samples on the grid it was trained on: LCMScheduler's origin timesteps are T/n - 1, 2T/n - 1, ...
    pipe.scheduler = build_scheduler(pipe.config, lcm_grid=pipe.config.num_train_timesteps // skip)
    dataset = open_dataset(data, objective.window_frames, objective.audio_context, settings.seed, limit_windows,
                           loader_processes=settings.num_workers)
    target_params = list(objective.target.parameters())

    def target_ema(params: list[nn.Parameter], s: LoopSettings) -> EMA:
        return EMA(params, TARGET_EMA_DECAY, warmup=False, shadow=target_params)

    grid_settings = dict(skip=skip, strength=strength, guidance=guidance, num_inference_steps=num_inference_steps)
    return run_loop(objective, dataset, settings, export_model=pipe.save_pretrained, make_ema=target_ema,
                    objective_settings=grid_settings)


def same_backbone(a, b) -> bool:
    """Two pipelines whose backbones are built alike (so take each other's weights) and predict the same thing on the
    same noise schedule."""
    schedule = ("prediction_type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
    return (backbone_kwargs(a.config) == backbone_kwargs(b.config)
            and all(getattr(a.config, k) == getattr(b.config, k) for k in schedule))
