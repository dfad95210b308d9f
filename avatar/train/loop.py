"""The training loop, shared by the EMO stages and consistency distillation; read it top to bottom.

Built on HuggingFace `accelerate`: the same code runs on one CPU, one GPU, or many with `accelerate launch`.

An output directory holds:
    model/       the EMA weights as a normal model directory (`AvatarPipeline.from_pretrained`), rewritten atomically
    state/       the exact training state (`accelerate` save_state: weights, optimizer, LR scheduler, RNG states, EMA,
                 step), replaced atomically; `--resume` continues from it bit for bit
    log.jsonl    one JSON line per logged step

Reproducibility: the data order is a pure function of (seed, micro-batch index), and each micro-batch's noise comes
from a generator seeded by (seed, step, micro-batch, rank), so the data position and the sampling randomness are
both determined by the step counter alone.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from avatar.errors import EmoteError


@dataclass
class LoopSettings:
    out: Path
    steps: int = 1000
    batch_size: int = 2
    lr: float = 1e-4
    grad_accum: int = 1
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    resume: bool = False
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay ramps up as (1 + step) / (10 + step): early EMA weights follow the model
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # after the warmup: "constant", or "cosine" down to 0 at `steps`
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    progress: bool = True  # tqdm bar and console log lines


# ---- exact-resume building blocks -------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a list of parameters. `shadow` may be given (live tensors of a target network,
    as in consistency distillation); otherwise it is a private copy."""

    def __init__(self, params: list[nn.Parameter], decay: float, warmup: bool, shadow: list[torch.Tensor] | None = None):
        self.params = params
        self.decay = decay
        self.warmup = warmup
        self.shadow = shadow if shadow is not None else [p.detach().clone() for p in params]
        self.updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().to(s.dtype), 1 - decay)
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the parameters (to export them)."""
        saved = [p.detach().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)
        try:
            yield
        finally:
            for s, p in zip(saved, self.params):
                p.copy_(s)

    def state_dict(self) -> dict:
        return {"shadow": [s.detach().cpu().clone() for s in self.shadow], "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for s, saved in zip(self.shadow, state["shadow"]):
                s.copy_(saved)
        self.updates = int(state["updates"])


class Counter:
    """The optimizer-step counter, checkpointed with the rest of the state."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class SeededOrder(Sampler):
    """An endless index stream: epoch e visits the dataset in a permutation seeded by (seed, e). Each process takes
    its own slice of every global micro-batch, so `start_microbatch` alone fixes the data position on resume."""

    def __init__(self, length: int, batch_size: int, seed: int, start_microbatch: int, rank: int = 0, world: int = 1):
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.start, self.rank, self.world = start_microbatch, rank, world

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self) -> Iterator[int]:
        epoch, order = -1, None
        micro = self.start
        while True:
            first = (micro * self.world + self.rank) * self.batch_size
            for g in range(first, first + self.batch_size):
                if g // self.length != epoch:
                    epoch = g // self.length
                    order = self._permutation(epoch)
                yield int(order[g % self.length])
            micro += 1


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 131 + rank)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it replaces `path` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def truncate_log(log_path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again)."""
    if not log_path.is_file():
        return
    kept = [line for line in log_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    log_path.write_text("".join(line + "\n" for line in kept))


# ---- the loop -----------------------------------------------------------------------------------------------------


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The LR multiplier at `step`: a linear warmup, then constant or a cosine down to 0 at `total_steps` (an
    anneal)."""
    factor = step / max(1, warmup_steps) if step < warmup_steps else 1.0
    if schedule == "cosine":
        factor *= 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
    return factor


def rescale_lr(optimizer: torch.optim.Optimizer, lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
               factor: float) -> None:
    """Multiply every parameter group's LR, and the schedule's base LRs it is computed from, by `factor` (1.0 is
    exact, so an unchanged --lr resumes bit for bit)."""
    lr_scheduler.base_lrs = [lr * factor for lr in lr_scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor
        group["initial_lr"] *= factor


@dataclass
class LoopResult:
    step: int
    losses: list[float]  # per optimizer step, this run only
    steps_per_s: float
    model_dir: Path


def cpu_emulates_bf16() -> bool:
    """True on an x86 CPU without AVX-512 BF16 or AMX: bf16 autocast there is emulated, not faster than float32 but
    about 10x slower (the `warm-refiner` and `warm-guidance` stages: 57-76 s/step against 5.1-6.4, AMD EPYC, 1
    thread)."""
    def has(feature: str) -> bool:  # torch's own CPU probes; private, so a missing one reads as absent
        return bool(getattr(torch.cpu, f"_is_{feature}_supported", lambda: False)())

    return has("avx2") and not (has("avx512_bf16") or has("amx_tile"))


def run_loop(
    objective: nn.Module,
    dataset,
    settings: LoopSettings,
    export_model: Callable[[Path], None],
    make_ema: Callable[[list[nn.Parameter], LoopSettings], EMA] | None = None,
    objective_settings: dict | None = None,
) -> LoopResult:
    """Train `objective` (an nn.Module whose forward(batch, generator) returns the loss) on `dataset`.

    `objective.set_trainable()` picks the parameters; `export_model(dir)` writes the model directory (called with the
    EMA weights applied). `objective_settings` (JSON values, e.g. distillation's grid) are stored with the state, and
    `--resume` refuses different ones: they are not in the weights, so a mismatch would train on silently."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    s = settings
    out = Path(s.out)
    state_dir, model_dir, log_path = out / "state", out / "model", out / "log.jsonl"
    if s.resume and not (state_dir / "loop.json").is_file():
        raise EmoteError(f"--resume: no training state in {state_dir}")
    if not s.resume and state_dir.exists():
        raise EmoteError(f"{out} already holds a training state: pass --resume, or choose another --out")
    objective_settings = dict(objective_settings or {})
    stored_loop = json.loads((state_dir / "loop.json").read_text()) if s.resume else {}
    if s.resume:  # a state saved before settings were stored has none to compare
        stored = stored_loop.get("objective", objective_settings)
        changed = sorted(k for k in set(stored) | set(objective_settings) if stored.get(k) != objective_settings.get(k))
        if changed:
            raise EmoteError(f"--resume: the state in {state_dir} was trained with other settings ("
                             + ", ".join(f"{k} {stored.get(k)} now {objective_settings.get(k)}" for k in changed)
                             + "); resume with the first run's")
    if s.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise EmoteError("--mixed-precision fp16 needs a CUDA GPU; use bf16 on a CPU")

    accelerator = Accelerator(
        mixed_precision=s.mixed_precision,
        gradient_accumulation_steps=s.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    emulated_bf16 = s.mixed_precision == "bf16" and accelerator.device.type == "cpu" and cpu_emulates_bf16()
    if emulated_bf16 and accelerator.is_main_process:
        print("emote: warning: this CPU has neither AVX-512 BF16 nor AMX, so --mixed-precision bf16 is emulated "
              "and about 10x slower than float32 here; drop the flag on this machine", file=sys.stderr)
    torch.manual_seed(s.seed)

    # Model, optimizer, LR schedule, EMA. The LR scheduler is stepped by hand once per optimizer step.
    params = objective.set_trainable()
    optimizer = torch.optim.AdamW(objective.optimizer_groups(params, s.lr), lr=s.lr, weight_decay=s.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup_steps=s.warmup_steps, total_steps=s.steps, schedule=s.lr_schedule))
    counter = Counter()
    model, optimizer = accelerator.prepare(objective, optimizer)
    # After prepare, which moves the parameters to the accelerator's device: the EMA copies must live beside them.
    ema = make_ema(params, s) if make_ema else EMA(params, s.ema_decay, s.ema_warmup)
    accelerator.register_for_checkpointing(lr_scheduler, ema, counter)

    if s.resume:
        try:
            accelerator.load_state(str(state_dir))
        except RuntimeError as exc:  # torch's state-dict mismatch: another architecture or trainable set
            raise EmoteError(f"--resume: the state in {state_dir} does not fit this model; resume with the first "
                             f"run's --init, --freeze, --grow-attention, --grow-audio-locator and "
                             f"--refiner-audio-channels "
                             f"({str(exc).splitlines()[0]})") from None
        if accelerator.is_main_process:
            truncate_log(log_path, counter.step)
        # The state restores its own LR; a different --lr on resume rescales every group (e.g. to anneal a run).
        rescale_lr(optimizer, lr_scheduler, s.lr / stored_loop["lr"])
    start_step = counter.step

    # Data: this process's slice of each global micro-batch, starting where the checkpoint left off.
    sampler = SeededOrder(
        len(dataset), s.batch_size, s.seed, start_step * s.grad_accum, accelerator.process_index, accelerator.num_processes
    )
    loader = DataLoader(dataset, batch_size=s.batch_size, sampler=sampler, num_workers=s.num_workers, drop_last=True)
    batches = iter(loader)

    def save() -> None:
        accelerator.wait_for_everyone()
        with atomic_dir(state_dir) as tmp:
            accelerator.save_state(str(tmp))
            if accelerator.is_main_process:
                (tmp / "loop.json").write_text(json.dumps({"step": counter.step, **_jsonable(asdict(s)),
                                                                "objective": objective_settings}, indent=2))
        if accelerator.is_main_process:
            with ema.applied():
                export_model(model_dir)
        accelerator.wait_for_everyone()

    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=s.steps, initial=start_step, disable=not (main and s.progress), desc="train", dynamic_ncols=True)
    log_file = open(log_path, "a") if main else None
    losses: list[float] = []
    started = time.perf_counter()
    try:
        while counter.step < s.steps:
            step_loss = torch.zeros((), device=accelerator.device)
            objective.begin_step(counter.step)
            for micro in range(s.grad_accum):
                batch = to_device(next(batches), accelerator.device)
                with accelerator.accumulate(model):
                    generator = step_generator(s.seed, counter.step, micro, accelerator.process_index)
                    loss = model(batch, generator)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and s.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, s.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach().float() / s.grad_accum
            lr_scheduler.step()
            ema.update()
            counter.step += 1

            mean_loss = accelerator.gather(step_loss[None]).mean().item()
            if not math.isfinite(mean_loss):
                raise EmoteError(f"loss became {mean_loss} at step {counter.step}; lower --lr or use fp32")
            losses.append(mean_loss)
            bar.update(1)
            if counter.step % s.log_every == 0 or counter.step == s.steps:
                elapsed = time.perf_counter() - started
                record = {
                    "step": counter.step,
                    "loss": round(sum(losses[-s.log_every :]) / len(losses[-s.log_every :]), 6),
                    "lr": lr_scheduler.get_last_lr()[0],
                    "steps_per_s": round((counter.step - start_step) / elapsed, 4),
                    "elapsed_s": round(elapsed, 1),
                }
                if log_file:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                if main and s.progress:
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    tqdm.write(json.dumps(record), file=sys.stderr)
            if counter.step % s.save_every == 0 and counter.step < s.steps:
                save()
        save()
    finally:
        bar.close()
        if log_file:
            log_file.close()
    elapsed = time.perf_counter() - started
    done = counter.step - start_step
    return LoopResult(counter.step, losses, done / elapsed if elapsed > 0 else 0.0, model_dir)


def _jsonable(values: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


# ---- entry points: data, model directories, one EMO stage ---------------------------------------------------------

TEACHER_STEPS = 25  # the many-step teacher's default sampling steps, saved into each stage's model directory
# A training split whose decoded frames fit in this many bytes, shared by the data-loading processes, is decoded
# once and kept in memory by each of them.
DECODED_CORPUS_BUDGET = 6 * 2**30


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a training output directory holding one under `model/`."""
    path = Path(path)
    if (path / "model" / "model_index.json").is_file():
        return path / "model"
    if (path / "model_index.json").is_file():
        return path
    raise EmoteError(f"{path} is neither a model directory nor a training output directory")


def open_dataset(data: str | Path, num_frames: int, audio_context: int, seed: int, limit_windows: int | None = None,
                 loader_processes: int = 1, oversample: dict[str, int] | None = None):
    """The corpus's training split as windows of `num_frames` frames (optionally only the first `limit_windows`).
    `loader_processes` (data-loading workers, at least 1) share the memory budget for keeping clips decoded.
    `oversample` repeats the windows of identities with a trait (`ClipWindowDataset.oversampled`)."""
    from torch.utils.data import Subset

    from avatar.data.dataset import ClipWindowDataset

    data = Path(data)
    if not data.is_dir():
        raise EmoteError(f"corpus directory {data} does not exist")
    try:
        dataset = ClipWindowDataset(data, "train", num_frames=num_frames, audio_context=audio_context, seed=seed)
        if dataset.decoded_bytes() * max(loader_processes, 1) <= DECODED_CORPUS_BUDGET:
            dataset.keep_all_decoded()
    except (OSError, ValueError, KeyError) as exc:
        raise EmoteError(f"cannot read the corpus in {data}: {exc}") from None
    if len(dataset) == 0:
        raise EmoteError(f"the corpus in {data} has no training window of {num_frames} frames")
    everything = list(range(len(dataset)))
    indices = everything
    if oversample:
        try:
            indices = dataset.oversampled(oversample)
        except ValueError as exc:
            raise EmoteError(f"--oversample: {exc}") from None
    if limit_windows:
        indices = [i for i in indices if i < limit_windows]
    return dataset if indices == everything else Subset(dataset, indices)


def as_teacher(pipe) -> None:
    """Stage outputs are many-step teachers: DDIM sampling from pure noise, TEACHER_STEPS steps by default."""
    from avatar.schedulers import build_scheduler

    pipe.config = pipe.config.replace(sampler="ddim", default_steps=TEACHER_STEPS, min_steps=1, strength=1.0)
    pipe.scheduler = build_scheduler(pipe.config)


def train_stage(stage: str, data: str | Path, settings: LoopSettings, init: str | Path | None = None,
                preset: str = "default", limit_windows: int | None = None, frozen: tuple[str, ...] = (),
                grow_attention_levels: tuple[int, ...] = (), warm_start: str | None = None,
                grow_audio_locator: int = 0, expert_warmup: int = 0, lip_reading_weight: float = 0.0,
                portrait_refiner_channels: tuple[int, ...] | None = None,
                refiner_audio_channels: int = 0, oversample: dict[str, int] | None = None,
                audio_guidance: float | None = None) -> LoopResult:
    """Run one EMO stage (`vae`, `decoder`, `refiner`, `audio`, `1`, `2`, `3`), or `warm` or `warm-refiner` on a
    distilled student, starting from `init` (a model directory) or a fresh `preset`; the components in `frozen` keep
    their weights; `grow_attention_levels` adds spatial attention at those UNet levels of `init` first,
    `grow_audio_locator` an audio locator of that many channels (avatar/grow.py). Stage `refiner` adds a
    PortraitRefiner of widths `portrait_refiner_channels` (default: `grow.default_refiner_channels`) to an `init`
    without one; stage `warm-refiner` adds an audio path of `refiner_audio_channels` to a refiner without one
    (`grow.add_refiner_audio`). Stage outputs are teachers (DDIM); `warm`, `refiner` and `warm-refiner` keep the
    `init` model's sampler, and `warm_start` sets what `warm`'s windows start from (`ModelConfig.warm_start`); it
    continues the mouth expert stored with `init` if there is one (a new one, seeded by `settings.seed`, otherwise),
    stores it with each export, and its first `expert_warmup` steps train the expert alone. `lip_reading_weight` > 0
    adds the lip-reading term (stages vae, decoder, refiner, warm-refiner and warm-guidance), whose expert
    (LIP_READER_MODULE) is kept the same way. Every run exports the experts of `init` that it does not train,
    unchanged. `oversample` draws the windows of identities with a trait more often (`open_dataset`). Stage
    `warm-guidance` folds audio guidance of scale `audio_guidance` into a student's one pass."""
    from avatar.checkpoint import load_training_module
    from avatar.grow import add_portrait_refiner, add_refiner_audio, grow_attention
    from avatar.grow import grow_audio_locator as add_audio_locator
    from avatar.pipeline import AvatarPipeline

    from .lipsync import EXPERT_MODULE, LIP_READER_MODULE, MouthExpert
    from .stages import CONTINUING_STAGES, LIP_READING_STAGES, build_objective

    if stage in CONTINUING_STAGES and init is None:
        raise EmoteError(f"stage {stage} continues a trained model: pass --init DIR (the previous stage's output)")
    if warm_start is not None and stage != "warm":
        raise EmoteError("--warm-start applies to --stage warm only")
    if not 0 <= lip_reading_weight <= 100:  # also refuses nan
        raise EmoteError(f"--lip-reading-weight must be between 0 and 100, got {lip_reading_weight}")
    if lip_reading_weight > 0 and stage not in LIP_READING_STAGES:
        raise EmoteError("--lip-reading-weight applies to --stage vae, decoder, refiner, warm-refiner and "
                         "warm-guidance only")
    if portrait_refiner_channels is not None and stage != "refiner":
        raise EmoteError("--refiner-channels applies to --stage refiner only")
    if (audio_guidance is None) != (stage != "warm-guidance"):
        raise EmoteError("--audio-guidance G is what --stage warm-guidance needs, and applies to it only")
    if refiner_audio_channels and stage != "warm-refiner":
        raise EmoteError("--refiner-audio-channels applies to --stage warm-refiner only")
    if lip_reading_weight > 0 and stage in ("vae", "decoder") and "vae" in frozen:
        raise EmoteError("--lip-reading-weight trains the autoencoder, which --freeze vae keeps fixed")
    expert_module = EXPERT_MODULE if stage == "warm" else LIP_READER_MODULE if lip_reading_weight > 0 else None
    if expert_warmup and expert_module is None:
        raise EmoteError("--expert-warmup applies to --stage warm, or vae, decoder, refiner, warm-refiner and "
                         "warm-guidance with --lip-reading-weight")
    init_dir = resolve_model_dir(init) if init is not None else None
    if init_dir is not None:
        pipe = AvatarPipeline.from_pretrained(init_dir)
    else:
        pipe = AvatarPipeline.from_config(preset, seed=settings.seed)
    if grow_attention_levels:
        if init is None:
            raise EmoteError("growing attention continues a trained model: pass --init DIR")
        pipe = grow_attention(pipe, grow_attention_levels, seed=settings.seed)
    if grow_audio_locator:
        if init is None:
            raise EmoteError("growing an audio locator continues a trained model: pass --init DIR")
        pipe = add_audio_locator(pipe, grow_audio_locator, seed=settings.seed)
    if stage == "refiner" and pipe.portrait_refiner is None:
        pipe = add_portrait_refiner(pipe, portrait_refiner_channels, seed=settings.seed)
    elif portrait_refiner_channels is not None:
        raise EmoteError("--refiner-channels: the --init model has a portrait refiner already")
    if refiner_audio_channels:
        pipe = add_refiner_audio(pipe, refiner_audio_channels, seed=settings.seed)
    if stage not in ("warm", "refiner", "warm-refiner", "warm-guidance"):  # the portrait refiner changes no sampling
        as_teacher(pipe)
    if warm_start is not None:
        pipe.config = pipe.config.replace(warm_start=warm_start).validate()
    # the experts `init` carries: the run continues its own, and exports the others unchanged (the lip reader reads
    # true frames, so no stage makes it stale; the warm stage's expert is a better start than a new one)
    carried = {}
    for name in (EXPERT_MODULE, LIP_READER_MODULE) if init_dir is not None else ():
        module = load_training_module(init_dir, name, MouthExpert)
        if module is not None:
            carried[name] = module
    expert = carried.pop(expert_module, None)
    torch.manual_seed(settings.seed)  # a new expert's initial weights
    objective = build_objective(stage, pipe, frozen, expert_warmup=expert_warmup, expert=expert,
                                lip_reading_weight=lip_reading_weight, audio_guidance=audio_guidance)
    dataset = open_dataset(data, objective.window_frames, objective.audio_context, settings.seed, limit_windows,
                           loader_processes=settings.num_workers, oversample=oversample)
    # what the warm stage and the lip-reading term train for is in no weight, nor what a resume grows: a resume in
    # another mode would train on silently, or fail to load the state
    if stage == "warm":
        objective_settings = dict(warm_start=pipe.config.warm_start, strength=pipe.config.strength,
                                  expert_warmup=expert_warmup)
    elif stage == "warm-guidance":
        objective_settings = dict(warm_start=pipe.config.warm_start, strength=pipe.config.strength,
                                  audio_guidance=audio_guidance)
        if lip_reading_weight > 0:  # (a state from before the term stored neither, and resumes without it)
            objective_settings.update(lip_reading_weight=lip_reading_weight, expert_warmup=expert_warmup)
    elif lip_reading_weight > 0 or refiner_audio_channels:  # (a state from before the options stored none, and
        # resumes as a plain run)
        objective_settings = dict(lip_reading_weight=lip_reading_weight, expert_warmup=expert_warmup)
        if refiner_audio_channels:
            objective_settings["refiner_audio_channels"] = refiner_audio_channels
    else:
        objective_settings = None
    if oversample:  # the data order depends on it
        objective_settings = {**(objective_settings or {}), "oversample": dict(sorted(oversample.items()))}
    export_model = partial(pipe.save_pretrained,
                           training_modules={**carried, **({expert_module: objective.expert} if expert_module else {})})
    return run_loop(objective, dataset, settings, export_model=export_model, objective_settings=objective_settings)
