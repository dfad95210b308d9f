"""Diffusers schedulers: DDIM for the many-step teacher, LCM for the distilled 1-4 step student."""
from __future__ import annotations

import torch

from diffusers import DDIMScheduler, LCMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .config import ModelConfig
from .errors import EmoteError

SCHEDULER_CLASSES = {"ddim": DDIMScheduler, "lcm": LCMScheduler}


def build_scheduler(cfg: ModelConfig, sampler: str | None = None, lcm_grid: int | None = None) -> SchedulerMixin:
    """`lcm_grid`: the number of timesteps an LCM student was distilled on (LCMScheduler's original_inference_steps;
    diffusers' default 50 when None)."""
    sampler = sampler or cfg.sampler
    common = dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        set_alpha_to_one=True,
    )
    if sampler == "ddim":
        # "trailing" spacing starts sampling at t = T - 1 (pure noise), which few-step sampling needs.
        return DDIMScheduler(**common, timestep_spacing="trailing")
    if sampler == "lcm":
        return LCMScheduler(**common, **({"original_inference_steps": lcm_grid} if lcm_grid else {}))
    raise ValueError(f"unknown sampler {sampler!r}")


def fresh_scheduler(template: SchedulerMixin, steps: int, device=None, strength: float = 1.0) -> SchedulerMixin:
    """A new scheduler instance (diffusers schedulers keep a step index) with `steps` timesteps set. With
    `strength` < 1 they start at that fraction of the schedule (a warm start from a noised latent, as diffusers'
    img2img pipelines do), still `steps` of them."""
    if not 0 < strength <= 1:
        raise EmoteError(f"strength must be in (0, 1], got {strength}")
    scheduler = type(template).from_config(template.config)
    if isinstance(scheduler, LCMScheduler):
        grid = scheduler.config.original_inference_steps
        usable = int(grid * strength)
        if steps > usable:
            raise EmoteError(f"this model's LCM sampler was distilled on a {grid}-point grid: strength {strength:g} "
                             f"leaves {usable} of its points, so use at most {usable} steps, not {steps}")
        scheduler.set_timesteps(steps, device=device, strength=strength)
        return scheduler
    if strength == 1:
        scheduler.set_timesteps(steps, device=device)
        return scheduler
    # DDIM warm start: `steps` timesteps from t = strength * T - 1 down, spaced by the gap DDIMScheduler.step assumes
    # (T // num_inference_steps), with num_inference_steps the smallest full schedule whose gap lets them all fit.
    total = scheduler.config.num_train_timesteps
    start = round(strength * total)
    if steps > start:
        raise EmoteError(f"{steps} steps do not fit below t = {start} (strength {strength:g})")
    scheduler.set_timesteps(-(-total * steps // start), device=device)
    gap = total // scheduler.num_inference_steps
    scheduler.timesteps = torch.tensor([start - 1 - k * gap for k in range(steps)], device=device)
    return scheduler
