"""Training and distillation on the tiny preset, CPU: losses fall, stages touch only their parameters, resume is exact,
the distilled student loads and renders, and the CLI rejects bad input with exit 2."""
from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from avatar.errors import EmoteError
from avatar.grow import grow_attention, grow_audio_locator
from avatar.pipeline import AvatarPipeline
from avatar.train.distill import ConsistencyDistillation, distill
from avatar.train.loop import (EMA, LoopSettings, as_teacher, cpu_emulates_bf16, lr_factor, open_dataset, run_loop,
                              train_stage)
from avatar.train.stages import FAST_LR_SCALE, build_objective
from conftest import make_audible
from server.cli import main as emote

STAGE_LR = {"vae": 3e-3, "decoder": 3e-3, "audio": 3e-3, "1": 2e-3, "2": 3e-3, "3": 3e-2}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    from avatar.data.corpus import write_corpus

    root = tmp_path_factory.mktemp("train_corpus")
    write_corpus(root, identities=2, hours=20 / 3600, seed=1, size=32, log=lambda line: None)
    return root


def fixed_loss(objective, batch: dict) -> float:
    """The objective on one batch with fixed noise and timesteps (4 draws), so before/after are comparable."""
    with torch.no_grad():
        return sum(objective(batch, torch.Generator().manual_seed(k)).item() for k in range(4)) / 4


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{c}.{n}": p.detach().clone()
        for c in ("vae", "reference_net", "backbone", "audio_encoder")
        for n, p in getattr(pipe, c).named_parameters()
    }


def overfit(objective, corpus: Path, out: Path, steps: int, lr: float, make_ema=None):
    """Train on one window (batch of 2 copies); returns (loss before, loss after, parameter names that changed)."""
    dataset = open_dataset(corpus, objective.window_frames, objective.audio_context, seed=0, limit_windows=1)
    batch = default_collate([dataset[0], dataset[0]])
    objective.set_trainable()
    before_params = {n: p.detach().clone() for n, p in objective.named_parameters()}
    before = fixed_loss(objective, batch)
    settings = LoopSettings(out=out, steps=steps, batch_size=2, lr=lr, save_every=10**6, log_every=5, progress=False)
    run_loop(objective, dataset, settings, export_model=lambda d: None, make_ema=make_ema)
    changed = {n for n, p in objective.named_parameters() if not torch.equal(p, before_params[n])}
    return before, fixed_loss(objective, batch), changed


@pytest.fixture(scope="module")
def staged(corpus, tmp_path_factory):
    """vae -> decoder -> audio -> 1 -> 2 -> 3 in one process on one tiny pipeline: each stage's loss and what it
    changed."""
    out = tmp_path_factory.mktemp("stages")
    pipe = AvatarPipeline.from_config("tiny", seed=0)
    as_teacher(pipe)
    results = {}
    for stage, steps in (("vae", 25), ("decoder", 20), ("audio", 30), ("1", 30), ("2", 30), ("3", 30)):
        objective = build_objective(stage, pipe)
        expected = {f"{n}" for n, _ in objective.trainable_named_parameters()}
        results[stage] = (*overfit(objective, corpus, out / stage, steps, STAGE_LR[stage]), expected)
    return pipe, results


@pytest.mark.parametrize(
    "stage,ratio", [("vae", 0.5), ("decoder", 0.95), ("audio", 0.5), ("1", 0.6), ("2", 0.97), ("3", 0.999)]
)
def test_stage_loss_goes_down(staged, stage, ratio):
    before, after, _, _ = staged[1][stage]
    assert after < ratio * before, (stage, before, after)


def test_stage_2_learns_from_scratch(corpus, tmp_path):
    """Temporal and audio layers alone can fit a window well, from an untrained spatial part."""
    pipe = AvatarPipeline.from_config("tiny", seed=1)
    before, after, _ = overfit(build_objective("2", pipe), corpus, tmp_path, steps=30, lr=3e-3)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("stage", ["vae", "decoder", "audio", "1", "2", "3"])
def test_stage_changes_only_its_parameters(staged, stage):
    _, _, changed, expected = staged[1][stage]
    assert changed, stage
    assert changed <= expected, sorted(changed - expected)[:5]
    if stage == "decoder":  # the latent space the backbone learned stays put
        assert all(n.startswith("vae.decoder.") for n in changed)
    if stage == "audio":  # the mel encoder and its probe; the probe is not part of the model
        assert {n.split(".")[0] for n in changed} == {"audio_encoder", "probe"}
    if stage == "3":
        assert all("speed" in n for n in changed)
    if stage == "2":
        assert any(n.startswith("audio_encoder.") for n in changed)
        assert not any(n.startswith("reference_net.") for n in changed)


def test_frozen_component_keeps_its_weights(corpus, tmp_path):
    """Stage 2 with a pretrained audio encoder frozen: the temporal and audio layers train, the encoder does not."""
    pipe = AvatarPipeline.from_config("tiny", seed=2)
    _, _, changed = overfit(build_objective("2", pipe, frozen=("audio_encoder",)), corpus, tmp_path, steps=3, lr=3e-3)
    assert changed and all(n.startswith("backbone.") for n in changed), sorted(changed)[:5]


def test_lip_weights_follow_the_face_box():
    from avatar.train.stages import LIP_LOSS_WEIGHT, lip_weights, weighted_mean

    boxes = torch.tensor([[[0.25, 0.2, 0.75, 0.7], [0.0, 0.0, 0.5, 0.5]]])  # one window, two frames
    weights = lip_weights(boxes, 16)
    assert weights.shape == (1, 2, 1, 16, 16)
    lips = weights[0, :, 0] > 1
    assert set(weights.unique().tolist()) == {1.0, 1 + LIP_LOSS_WEIGHT}
    rows, cols = torch.nonzero(lips[0], as_tuple=True)
    assert 8 <= rows.min() and rows.max() <= 11 and 5 <= cols.min() and cols.max() <= 10  # lower middle of the face
    rows, cols = torch.nonzero(lips[1], as_tuple=True)
    assert rows.max() <= 7 and cols.max() <= 6  # moves with the face
    prediction, target = torch.zeros(1, 2, 4, 16, 16), torch.ones(1, 2, 4, 16, 16)
    assert weighted_mean((prediction - target).square(), weights).item() == pytest.approx(1.0)  # normalised by the weights
    target = torch.zeros_like(target)
    target[0, 0, :, lips[0]] = 1  # error only on the first frame's lips: weighted up against the plain mean
    assert weighted_mean((prediction - target).square(), weights).item() > 2 * torch.mean(target).item()


def test_audio_locator_paints_the_lip_region_the_loss_weights():
    """The audio locator's region, found from the face mask alone, is the lip region the loss weights up."""
    from avatar.train.stages import face_masks, lip_weights
    from avatar.unet import lip_region_maps

    boxes = torch.tensor([[[0.25, 0.125, 0.75, 0.75]], [[0.0, 0.0, 0.5, 0.5]]])  # two windows of one frame
    maps = lip_region_maps(face_masks(boxes, 128), 16)
    assert maps.shape == (2, 3, 16, 16)
    assert torch.equal(maps[:, 0] > 0, lip_weights(boxes, 16)[:, 0, 0] > 1)
    inside = maps[:, 0] > 0
    for channel in (1, 2):  # relative x and y: in [0, 1] inside, zero outside
        assert maps[:, channel][inside].min() >= 0 and maps[:, channel][inside].max() <= 1
        assert not maps[:, channel][~inside].any()
    assert maps[0, 1][inside[0]].unique().numel() > 2 and maps[0, 2][inside[0]].unique().numel() > 2
    assert not lip_region_maps(torch.zeros(1, 1, 128, 128), 16).any()  # no face, no region


def test_mouth_expert_reads_the_lip_region_and_cannot_be_trained_by_the_student():
    from avatar.train.lipsync import CROP_SIZE, MouthExpert, lip_crops
    from avatar.train.stages import lip_weights

    box = torch.tensor([[0.25, 0.125, 0.75, 0.75]])
    images = -torch.ones(1, 3, 128, 128)
    images[:, :, lip_weights(box[:, None], 128)[0, 0, 0] > 1] = 1.0  # white exactly where the lip region is
    crops = lip_crops(images, box)
    assert crops.shape == (1, 3, *CROP_SIZE) and crops[:, :, 1:-1, 1:-1].min() > 0.99  # the region, nothing else
    expert = MouthExpert(fields=5)
    student_frames = images.clone().requires_grad_(True)
    expert.frozen_reading(lip_crops(student_frames, box)).sum().backward()
    assert student_frames.grad.abs().sum() > 0 and all(p.grad is None for p in expert.parameters())


def test_mouth_error_counts_each_parameter_in_units_of_its_spread():
    from avatar.train.lipsync import MOUTH_FIELD_SCALE, mouth_error

    truth = torch.rand(6, 5)
    scale = torch.tensor(MOUTH_FIELD_SCALE)
    for field in range(5):  # one spread off in any one field costs the same, whatever that field's raw range
        off = truth.clone()
        off[:, field] += scale[field]
        assert mouth_error(off, truth).item() == pytest.approx(1 / 5)
    assert mouth_error(truth, truth).item() == 0
    # the opening's spread is below the width's: the same raw error costs more on the opening
    zero = torch.zeros(6, 5)
    opening, width = torch.eye(5)[0] * 0.1, torch.eye(5)[1] * 0.1
    assert mouth_error(zero + opening, zero) > mouth_error(zero + width, zero)


def test_training_keeps_a_small_corpus_decoded(corpus):
    dataset = open_dataset(corpus, num_frames=3, audio_context=2, seed=0)
    assert dataset._load.cache_info().maxsize is None  # decoded once: shuffled windows do not decode per item
    first = dataset[0]["frames"]
    assert torch.equal(dataset[0]["frames"], first) and dataset._load.cache_info().hits >= 1


def _train(corpus: Path, init: Path, out: Path, steps: int, resume: bool, lr: float = 3e-3):
    settings = LoopSettings(out=out, steps=steps, batch_size=1, grad_accum=2, lr=lr, resume=resume,
                            save_every=10**6, log_every=1, progress=False, ema_decay=0.9)
    return train_stage("2", corpus, settings, init=init, limit_windows=3)


def _load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return snapshot(AvatarPipeline.from_pretrained(model_dir))


def test_resume_is_bit_exact(corpus, tmp_path):
    """Stage 2 (audio encoder BatchNorm, gradient accumulation, EMA): 4 steps straight == 2 + resume + 2."""
    init = tmp_path / "init"
    AvatarPipeline.from_config("tiny", seed=0).save_pretrained(init)
    straight = _train(corpus, init, tmp_path / "straight", 4, resume=False)
    _train(corpus, init, tmp_path / "split", 2, resume=False)
    resumed = _train(corpus, init, tmp_path / "split", 4, resume=True)
    assert resumed.step == straight.step == 4
    assert resumed.losses == straight.losses[2:]
    a, b = _load_weights(straight.model_dir), _load_weights(resumed.model_dir)  # EMA weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file

    raw_a = load_file(tmp_path / "straight" / "state" / "model.safetensors")
    raw_b = load_file(tmp_path / "split" / "state" / "model.safetensors")
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)  # trained weights too
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_resume_with_another_lr_trains_at_that_lr(corpus, tmp_path):
    """The saved state carries its own LR; `--resume --lr` must not be silently ignored (annealing a run)."""
    init = tmp_path / "init"
    AvatarPipeline.from_config("tiny", seed=0).save_pretrained(init)
    _train(corpus, init, tmp_path / "run", 2, resume=False, lr=3e-3)
    _train(corpus, init, tmp_path / "run", 4, resume=True, lr=1e-3)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["lr"] for r in log][1:] == pytest.approx([3e-3, 1e-3, 1e-3])
    assert json.loads((tmp_path / "run" / "state" / "loop.json").read_text())["lr"] == 1e-3  # the next resume's base


def test_distillation_loss_goes_down_against_a_fixed_target(staged, corpus, tmp_path):
    """With the target frozen (decay 1) the consistency loss is a plain regression and must fall; the real run uses
    an EMA target (decay 0.95), which moves with the student, so its loss is not monotone."""
    objective = ConsistencyDistillation(staged[0], skip=20, guidance=2.0)
    frozen = list(objective.target.parameters())
    make_ema = lambda params, s: EMA(params, 1.0, warmup=False, shadow=frozen)  # noqa: E731
    before, after, changed = overfit(objective, corpus, tmp_path, steps=30, lr=1e-4, make_ema=make_ema)
    assert after < 0.8 * before, (before, after)
    assert changed and all(n.startswith("backbone.") for n in changed)


def test_distilled_student_loads_and_renders(staged, corpus, tmp_path):
    pipe = staged[0]
    teacher_dir = tmp_path / "teacher"
    pipe.save_pretrained(teacher_dir)
    settings = LoopSettings(out=tmp_path / "student", steps=3, batch_size=1, lr=1e-4, save_every=10**6, progress=False)
    result = distill(teacher_dir, corpus, settings, num_inference_steps=2, skip=100, guidance=2.0, limit_windows=2)
    student = AvatarPipeline.from_pretrained(result.model_dir)
    assert student.config.sampler == "lcm" and student.config.default_steps == 2
    assert type(student.scheduler).__name__ == "LCMScheduler"
    student.scheduler.set_timesteps(2)  # samples on the skip-100 grid it was trained on
    assert student.scheduler.timesteps.tolist() == [999, 499]
    with pytest.raises(EmoteError, match="10-point grid"):
        list(student.render(np.full((32, 32, 3), 128, np.uint8), np.zeros(16000 // 5, np.float32), steps=11))
    portrait = np.full((32, 32, 3), 128, np.uint8)
    audio = np.zeros(16000 // 5, np.float32)
    for steps in (1, 2):
        frames = list(student.render(portrait, audio, steps=steps))
        assert len(frames) == 5 and frames[0].shape == (32, 32, 3)


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_warm_start_distillation_trains_where_the_student_samples(corpus, tmp_path):
    """--strength s keeps the first int(n s) grid points, LCMScheduler.set_timesteps(strength=s)'s; --student starts
    the student and its target from another model's backbone while the teacher stays the teacher; a resume with
    other grid settings is refused."""
    teacher, other = AvatarPipeline.from_config("tiny", seed=0), AvatarPipeline.from_config("tiny", seed=7)
    as_teacher(teacher)
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "start"
    teacher.save_pretrained(teacher_dir)
    other.save_pretrained(student_dir)
    objective = ConsistencyDistillation(AvatarPipeline.from_pretrained(teacher_dir), skip=100, guidance=2.0,
                                        strength=0.5, student_backbone=other.backbone)
    assert objective.grid.tolist() == [99, 199, 299, 399, 499]
    assert same(objective.backbone, other.backbone) and same(objective.target, other.backbone)
    assert same(objective.teacher, teacher.backbone) and not same(objective.teacher, other.backbone)

    # A learning rate too small to move the weights: the exported EMA target is the --student's backbone.
    settings = LoopSettings(out=tmp_path / "student", steps=2, batch_size=1, lr=1e-12, save_every=10**6, progress=False)
    result = distill(teacher_dir, corpus, settings, num_inference_steps=1, skip=100, guidance=2.0, limit_windows=2,
                     strength=0.5, student=student_dir)
    student = AvatarPipeline.from_pretrained(result.model_dir)
    assert (student.config.default_steps, student.config.strength) == (1, 0.5)
    exported = student.backbone.state_dict()
    assert all(torch.allclose(exported[k], v, atol=1e-6) for k, v in other.backbone.state_dict().items())
    assert not same(student.backbone, teacher.backbone)
    frames = list(student.render(np.full((32, 32, 3), 128, np.uint8), np.zeros(16000 // 5, np.float32)))
    assert len(frames) == 5

    resumed = LoopSettings(**{**settings.__dict__, "steps": 3, "resume": True})
    with pytest.raises(EmoteError, match="strength 0.5 now 1.0"):
        distill(teacher_dir, corpus, resumed, num_inference_steps=1, skip=100, guidance=2.0, limit_windows=2,
                strength=1.0, student=student_dir)


def test_video_windows_warm_start_where_the_pipeline_does(corpus):
    """What `AvatarPipeline.denoise_windows` starts a warm window from: the newest frame before it, or the portrait
    for a clip's first window (whose motion features are the reference's) and, with warm_start "portrait", for
    every window."""
    pipe = AvatarPipeline.from_config("tiny", seed=0)
    objective = build_objective("2", pipe)
    dataset = open_dataset(corpus, objective.window_frames, objective.audio_context, seed=0, limit_windows=8)
    batch = default_collate([dataset[i] for i in range(8)])
    _, _, start = objective.video_conditions(batch, torch.Generator().manual_seed(3))
    last = objective.encode_latents(batch["frames"])[:, pipe.config.motion_frames - 1]
    reference = objective.encode_latents(batch["reference"][:, None])[:, 0]
    from_last = [torch.allclose(s, x) for s, x in zip(start, last)]
    from_reference = [torch.allclose(s, x) for s, x in zip(start, reference)]
    assert all(a != b for a, b in zip(from_last, from_reference))
    assert any(from_last) and any(from_reference)

    objective.cfg = pipe.config.replace(warm_start="portrait")  # every window starts from the portrait
    _, _, start = objective.video_conditions(batch, torch.Generator().manual_seed(3))
    assert all(torch.allclose(s, x) for s, x in zip(start, reference))


def tiny_student(seed: int = 0) -> AvatarPipeline:
    """A tiny pipeline set up as a 1-step student warm-started at 0.5 on a 10-point LCM grid."""
    from avatar.schedulers import build_scheduler

    pipe = AvatarPipeline.from_config("tiny", seed=seed)
    pipe.config = pipe.config.replace(sampler="lcm", default_steps=1, min_steps=1, strength=0.5).validate()
    pipe.scheduler = build_scheduler(pipe.config, lcm_grid=10)
    return pipe


def test_warm_stage_fits_the_students_warm_start_and_keeps_its_sampler(corpus, tmp_path):
    student = tiny_student()
    objective = build_objective("warm", student)
    assert objective.start_timestep == 499  # LCMScheduler.set_timesteps(1, strength=0.5) on the 10-point grid
    before, after, changed = overfit(objective, corpus, tmp_path / "fit", steps=30, lr=1e-3)
    assert after < 0.8 * before, (before, after)
    assert all(n.startswith(("backbone.", "expert.")) for n in changed)  # the mouth expert trains alongside
    assert any(n.startswith("backbone.") for n in changed) and any(n.startswith("expert.") for n in changed)

    tiny_student(seed=1).save_pretrained(tmp_path / "student")
    settings = LoopSettings(out=tmp_path / "warm", steps=2, batch_size=1, lr=1e-4, save_every=10**6, progress=False)
    tuned = AvatarPipeline.from_pretrained(train_stage("warm", corpus, settings, init=tmp_path / "student",
                                                       limit_windows=2, warm_start="portrait").model_dir)
    assert (tuned.config.sampler, tuned.config.default_steps, tuned.config.strength) == ("lcm", 1, 0.5)
    assert tuned.config.warm_start == "portrait"
    assert type(tuned.scheduler).__name__ == "LCMScheduler"
    assert tuned.scheduler.config.original_inference_steps == 10


@pytest.mark.parametrize("warmup,student_moves", [(2, False), (1, True)])
def test_expert_warmup_trains_the_mouth_expert_alone_first(corpus, tmp_path, warmup, student_moves):
    """A warm run from a model has a new, random expert: for its first --expert-warmup steps only the expert trains."""
    objective = build_objective("warm", tiny_student(), expert_warmup=warmup)
    _, _, changed = overfit(objective, corpus, tmp_path / "run", steps=2, lr=1e-3)
    assert any(n.startswith("expert.") for n in changed)
    assert any(n.startswith("backbone.") for n in changed) == student_moves


def test_warm_stage_stores_its_mouth_expert_and_continues_from_it(corpus, tmp_path):
    """The expert trains alongside the student and is not part of the model; a run from the exported model must
    continue with it, not with a new, random one (which costs the student lip sync, docs/training.md)."""
    from avatar.checkpoint import load_training_module
    from avatar.train.lipsync import EXPERT_MODULE, MouthExpert

    tiny_student().save_pretrained(tmp_path / "student")

    def run(out: str, init: Path, lr: float, seed: int = 0) -> Path:
        settings = LoopSettings(out=tmp_path / out, steps=1, batch_size=1, lr=lr, seed=seed, save_every=10**6,
                                progress=False)
        return train_stage("warm", corpus, settings, init=init, limit_windows=2).model_dir

    def expert(model_dir: Path) -> dict[str, torch.Tensor]:
        return load_training_module(model_dir, EXPERT_MODULE, MouthExpert).state_dict()

    assert load_training_module(tmp_path / "student", EXPERT_MODULE, MouthExpert) is None
    first = run("a", tmp_path / "student", lr=1e-3)
    assert "training_modules" in json.loads((first / "model_index.json").read_text())
    AvatarPipeline.from_pretrained(first)  # the expert's folder does not disturb loading
    trained = expert(first)
    held = expert(run("b", first, lr=0.0))  # at LR 0 the continued expert is exported unchanged
    assert all(torch.equal(trained[k], held[k]) for k in trained)
    # a new expert is drawn from --seed: the same for the same seed, another for another
    fresh, again, other = (expert(run(out, tmp_path / "student", lr=0.0, seed=seed))
                           for out, seed in (("c", 0), ("d", 0), ("e", 1)))
    assert all(torch.equal(fresh[k], again[k]) for k in fresh)
    assert not torch.equal(fresh["net.0.weight"], other["net.0.weight"])
    assert not torch.equal(fresh["net.0.weight"], trained["net.0.weight"])


def tiny_teacher() -> AvatarPipeline:
    pipe = AvatarPipeline.from_config("tiny", seed=0)
    as_teacher(pipe)
    return pipe


def scale_weights(module: torch.nn.Module, scale: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(scale)


def loss_gradients(objective, batch: dict) -> dict[str, torch.Tensor]:
    """The gradient of one evaluation of the objective's loss, by parameter name (those that get one)."""
    objective.set_trainable()
    objective(batch, torch.Generator().manual_seed(0)).backward()
    return {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage,trained", [("decoder", "vae.decoder."), ("vae", "vae.")])
def test_lip_reading_term_reaches_the_autoencoder_and_its_expert_learns_from_true_frames_only(corpus, stage, trained):
    """The lip-reading term: the reconstruction gets a gradient from the expert's reading of it, while the expert
    learns from the true frames alone: what the decoder draws changes nothing it learns, so the autoencoder cannot
    teach it to read its mouths kindly."""
    dataset = open_dataset(corpus, 1, 0, seed=0, limit_windows=4)
    batch = default_collate([dataset[i] for i in range(4)])

    def gradients(weight: float, decoder_scale: float = 1.0) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the same new expert every time
        objective = build_objective(stage, tiny_teacher(), lip_reading_weight=weight)
        scale_weights(objective.vae.decoder, decoder_scale)
        return loss_gradients(objective, batch)

    plain, term, other_decoder = gradients(0.0), gradients(1.0), gradients(1.0, decoder_scale=0.5)
    assert plain and all(n.startswith(trained) for n in plain)  # weight 0: no expert at all
    assert any(not torch.allclose(term[n], plain[n]) for n in plain)
    expert = [n for n in term if n.startswith("expert.")]
    assert expert and all(torch.equal(term[n], other_decoder[n]) for n in expert)


@pytest.mark.parametrize("warmup,decoder_moves", [(2, False), (1, True)])
def test_lip_reading_expert_warmup_trains_it_alone_first(corpus, tmp_path, warmup, decoder_moves):
    objective = build_objective("decoder", tiny_teacher(), lip_reading_weight=0.1, expert_warmup=warmup)
    _, _, changed = overfit(objective, corpus, tmp_path / "run", steps=2, lr=1e-3)
    assert any(n.startswith("expert.") for n in changed)
    assert any(n.startswith("vae.decoder.") for n in changed) == decoder_moves
    assert all(n.startswith(("expert.", "vae.decoder.")) for n in changed)


def test_decoder_stage_stores_its_lip_reader_and_continues_from_it(corpus, tmp_path, monkeypatch):
    """A run with the term from a model that carries a lip reader starts from it, not from a new one; a run that does
    not train it exports it unchanged."""
    import avatar.train.loop as loop
    from avatar.checkpoint import load_training_module
    from avatar.train.lipsync import EXPERT_MODULE, LIP_READER_MODULE, MouthExpert

    starts = []  # the expert each run starts from
    run_loop = loop.run_loop

    def recording_run_loop(objective, *args, **kwargs):
        if getattr(objective, "expert", None) is not None:
            starts.append({k: v.clone() for k, v in objective.expert.state_dict().items()})
        return run_loop(objective, *args, **kwargs)

    monkeypatch.setattr(loop, "run_loop", recording_run_loop)
    tiny_teacher().save_pretrained(tmp_path / "teacher")

    def run(out: str, init: Path, stage: str = "decoder", weight: float = 0.1) -> Path:
        settings = LoopSettings(out=tmp_path / out, steps=1, batch_size=2, lr=1e-3, save_every=10**6, progress=False)
        return train_stage(stage, corpus, settings, init=init, limit_windows=2, lip_reading_weight=weight).model_dir

    def reader(model_dir: Path) -> dict[str, torch.Tensor]:
        return load_training_module(model_dir, LIP_READER_MODULE, MouthExpert).state_dict()

    first = run("a", tmp_path / "teacher")
    assert load_training_module(first, EXPERT_MODULE, MouthExpert) is None  # not the warm stage's expert
    AvatarPipeline.from_pretrained(first)
    stored = reader(first)
    run("b", first)
    new, continued = starts
    assert all(torch.equal(continued[k], stored[k]) for k in stored)
    assert not torch.equal(new["net.0.weight"], stored["net.0.weight"])
    carried = reader(run("c", first, stage="1", weight=0.0))
    assert all(torch.equal(carried[k], stored[k]) for k in stored)


@pytest.mark.parametrize("noise", ["shared", "independent"])
def test_warm_stage_draws_noise_as_the_model_samples_it(corpus, noise):
    """A student that samples with shared noise (ModelConfig.noise) is trained with one noise image for every frame of
    a window and of its motion frames; one with independent noise, with a new one for every frame."""
    student = tiny_student()
    student.config = student.config.replace(noise=noise)
    objective = build_objective("warm", student)
    dataset = open_dataset(corpus, objective.window_frames, objective.audio_context, seed=0, limit_windows=2)
    batch = default_collate([dataset[0], dataset[1]])
    inputs = []  # the backbone's noisy input of each call: the motion frames', then the window's
    hook = student.backbone.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    try:
        with torch.no_grad():
            objective(batch, torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    motion, window = inputs
    # every frame of a call starts from the same latent (the portrait, or the last motion frame), so frames differ
    # only by their noise
    same = [torch.equal(call[b, 0], call[b, k]) for call in (motion, window) for b in range(2)
            for k in range(1, call.shape[1])]
    assert all(same) if noise == "shared" else not any(same)


def test_lr_schedule_warms_up_then_stays_or_anneals():
    assert [lr_factor(s, 4, 100, "constant") for s in (0, 2, 4, 100)] == [0.0, 0.5, 1.0, 1.0]
    assert [lr_factor(s, 0, 100, "cosine") for s in (0, 50, 100, 150)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert lr_factor(10, 20, 100, "cosine") == pytest.approx(0.5 * 0.5 * (1 + np.cos(np.pi * 0.1)))


def test_warm_stage_draws_its_own_motion_frames(corpus):
    """As at inference, the motion frames the warm stage conditions on are the student's own: the true ones, which
    stage 2 and distillation use, do not change its loss; the true target frames do."""
    student = tiny_student()
    for module in student.backbone.modules():  # a trained model's zero-initialised outputs are not zero any more
        if isinstance(module, torch.nn.Linear) and module.weight.abs().sum() == 0:
            torch.nn.init.normal_(module.weight, std=0.05)
    objective = build_objective("warm", student)
    dataset = open_dataset(corpus, objective.window_frames, objective.audio_context, seed=0, limit_windows=4)
    batch = default_collate([dataset[i] for i in range(4)])
    m = student.config.motion_frames

    def altered(frames: slice) -> dict:
        changed = batch["frames"].clone()
        changed[:, frames] = 255 - changed[:, frames]
        return {**batch, "frames": changed}

    def loss(b: dict) -> float:
        with torch.no_grad():
            return objective(b, torch.Generator().manual_seed(0)).item()

    def motion_features(b: dict) -> torch.Tensor:
        return objective.video_conditions(b, torch.Generator().manual_seed(0))[1].motion[-1]

    assert not torch.allclose(motion_features(altered(slice(0, m))), motion_features(batch))  # the true-frame path
    assert loss(altered(slice(0, m))) == loss(batch)
    assert loss(altered(slice(m, None))) != loss(batch)


def test_lip_reading_resume_in_another_mode_is_a_clear_error(corpus, tmp_path, capsys):
    tiny_teacher().save_pretrained(tmp_path / "teacher")
    run = ["train", "--stage", "decoder", "--init", str(tmp_path / "teacher"), "--data", str(corpus), "--out",
           str(tmp_path / "o"), "--batch-size", "1", "--limit-windows", "2", "--quiet"]
    assert emote([*run, "--steps", "1", "--lip-reading-weight", "0.1"]) == 0
    capsys.readouterr()
    assert emote([*run, "--steps", "2", "--resume"]) == 2
    assert "lip_reading_weight 0.1 now None" in capsys.readouterr().err


def test_oversample_repeats_the_windows_of_identities_with_the_trait(corpus, tmp_path, capsys):
    from avatar.data.dataset import ClipWindowDataset

    dataset = ClipWindowDataset(corpus, "train", num_frames=2)
    identities = [dataset.reader.identity(dataset.reader.entry(c)["identity"]) for c in dataset.clip_ids]
    assert all(i.glasses and not i.beard for i in identities)  # the fixture's training identity
    assert dataset.oversampled({"glasses": 3}) == [w for w in range(len(dataset)) for _ in range(3)]
    assert dataset.oversampled({"beard": 3, "glasses": 2}) == [w for w in range(len(dataset)) for _ in range(2)]
    assert dataset.oversampled({"beard": 3}) == list(range(len(dataset)))
    limited = open_dataset(corpus, 2, 0, seed=0, limit_windows=2, oversample={"glasses": 3})
    assert [limited.indices.count(w) for w in (0, 1)] == [3, 3] and len(limited) == 6
    # a third of the windows, each thrice, is as many items as the whole split, but not the same ones
    third = len(ClipWindowDataset(corpus, "train", num_frames=1)) // 3
    same_size = open_dataset(corpus, 1, 0, seed=0, limit_windows=third, oversample={"glasses": 3})
    assert same_size.indices == [w for w in range(third) for _ in range(3)]
    # the data order depends on it, so a resume must keep it
    run = ["train", "--stage", "1", "--preset", "tiny", "--data", str(corpus), "--out", str(tmp_path / "o"),
           "--batch-size", "1", "--limit-windows", "2", "--quiet"]
    assert emote([*run, "--steps", "1", "--oversample", "glasses=3"]) == 0
    capsys.readouterr()
    assert emote([*run, "--steps", "2", "--resume"]) == 2
    assert "oversample {'glasses': 3} now None" in capsys.readouterr().err
    assert emote([*run, "--steps", "2", "--resume", "--oversample", "glasses=3"]) == 0


def test_warm_stage_refuses_what_it_cannot_train_and_a_resume_in_another_mode(corpus, tmp_path, capsys):
    teacher = AvatarPipeline.from_config("tiny", seed=0)
    as_teacher(teacher)
    teacher.save_pretrained(tmp_path / "ddim")
    AvatarPipeline.from_config("tiny", seed=0).save_pretrained(tmp_path / "two")  # the preset: LCM, 2 steps
    tiny_student().save_pretrained(tmp_path / "one")
    common = ["train", "--stage", "warm", "--data", str(corpus), "--batch-size", "1", "--limit-windows", "2", "--quiet"]
    for init, message in (("ddim", "sampler lcm"), ("two", "1-step student")):
        assert emote([*common, "--init", str(tmp_path / init), "--out", str(tmp_path / f"o-{init}")]) == 2
        assert message in capsys.readouterr().err
    run = [*common, "--init", str(tmp_path / "one"), "--out", str(tmp_path / "warm")]
    assert emote([*run, "--steps", "1", "--warm-start", "portrait"]) == 0
    capsys.readouterr()
    assert emote([*run, "--steps", "2", "--resume"]) == 2  # the --init model starts from the previous frame
    assert "warm_start portrait now previous" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--stage", "1", "--data", "/nonexistent/corpus", "--out", "{tmp}/o"],
        ["train", "--stage", "2", "--data", "{corpus}", "--out", "{tmp}/o"],
        ["train", "--stage", "decoder", "--data", "{corpus}", "--out", "{tmp}/o"],
        ["train", "--stage", "refiner", "--data", "{corpus}", "--out", "{tmp}/o"],
        ["train", "--stage", "refiner", "--data", "{corpus}", "--out", "{tmp}/o", "--init", "{teacher}",
         "--refiner-channels", "8,x,8"],
        ["train", "--stage", "refiner", "--data", "{corpus}", "--out", "{tmp}/o", "--init", "{teacher}",
         "--refiner-channels", "8,8"],
        ["train", "--stage", "decoder", "--data", "{corpus}", "--out", "{tmp}/o", "--init", "{teacher}",
         "--refiner-channels", "8,8,8"],
        ["train", "--stage", "refiner", "--data", "{corpus}", "--out", "{tmp}/o", "--init", "{teacher}",
         "--refiner-audio-channels", "8"],
        ["train", "--stage", "warm-refiner", "--data", "{corpus}", "--out", "{tmp}/o", "--init", "{teacher}",
         "--refiner-audio-channels", "8"],
        ["train", "--stage", "1", "--data", "{corpus}", "--out", "{tmp}/o", "--steps", "0"],
        ["train", "--stage", "1", "--data", "{corpus}", "--out", "{tmp}/o", "--lr", "-1"],
        ["train", "--stage", "1", "--data", "{corpus}", "--out", "{tmp}/o", "--preset", "nope"],
        ["train", "--stage", "3", "--data", "{corpus}", "--out", "{tmp}/o", "--init", "/nonexistent/model"],
        ["train", "--stage", "1", "--data", "{corpus}", "--out", "{tmp}/o", "--resume", "--preset", "tiny"],
        ["train", "--stage", "4", "--data", "{corpus}", "--out", "{tmp}/o"],
        ["train", "--stage", "warm", "--data", "{corpus}", "--out", "{tmp}/o"],
        ["train", "--stage", "1", "--data", "{corpus}", "--out", "{tmp}/o", "--preset", "tiny", "--expert-warmup", "1",
         "--steps", "2"],
        ["train", "--stage", "warm", "--data", "{corpus}", "--out", "{tmp}/o", "--init", "{teacher}",
         "--expert-warmup", "5", "--steps", "5"],
        ["train", "--stage", "1", "--data", "{corpus}", "--out", "{tmp}/o", "--preset", "tiny", "--lr-schedule", "step"],
        ["train", "--stage", "1", "--data", "{corpus}", "--out", "{tmp}/o", "--preset", "tiny",
         "--lip-reading-weight", "0.1"],
        ["train", "--stage", "vae", "--data", "{corpus}", "--out", "{tmp}/o", "--preset", "tiny",
         "--lip-reading-weight", "-1"],
        ["train", "--stage", "vae", "--data", "{corpus}", "--out", "{tmp}/o", "--preset", "tiny",
         "--lip-reading-weight", "nan"],
        ["train", "--stage", "decoder", "--data", "{corpus}", "--out", "{tmp}/o", "--init", "{teacher}",
         "--expert-warmup", "1", "--steps", "2"],
        ["train", "--stage", "vae", "--data", "{corpus}", "--out", "{tmp}/o", "--preset", "tiny",
         "--lip-reading-weight", "0.1", "--freeze", "vae"],
        ["train", "--stage", "1", "--data", "{corpus}", "--out", "{tmp}/o", "--preset", "tiny", "--warm-start",
         "portrait"],
        ["train", "--stage", "warm-guidance", "--data", "{corpus}", "--out", "{tmp}/o", "--init", "{teacher}"],
        ["train", "--stage", "warm", "--data", "{corpus}", "--out", "{tmp}/o", "--init", "{teacher}",
         "--audio-guidance", "2"],
        ["train", "--stage", "warm-guidance", "--data", "{corpus}", "--out", "{tmp}/o", "--init", "{teacher}",
         "--audio-guidance", "1"],
        ["train", "--stage", "warm-guidance", "--data", "{corpus}", "--out", "{tmp}/o", "--init", "{teacher}",
         "--audio-guidance", "0.5", "--lip-reading-weight", "0.1"],
        ["train", "--stage", "warm-guidance", "--data", "{corpus}", "--out", "{tmp}/o", "--init", "{teacher}",
         "--audio-guidance", "nan"],
        ["train", "--stage", "1", "--data", "{corpus}", "--out", "{tmp}/o", "--preset", "tiny", "--grow-attention", "0"],
        ["train", "--stage", "1", "--data", "{corpus}", "--out", "{tmp}/o", "--init", "{teacher}", "--grow-attention", "1"],
        ["train", "--stage", "1", "--data", "{corpus}", "--out", "{tmp}/o", "--init", "{teacher}", "--grow-attention", "5"],
        ["train", "--stage", "1", "--data", "{corpus}", "--out", "{tmp}/o", "--preset", "tiny", "--grow-audio-locator",
         "8"],
        ["train", "--stage", "2", "--data", "{corpus}", "--out", "{tmp}/o", "--init", "{teacher}",
         "--grow-audio-locator", "-1"],
        ["train", "--stage", "2", "--data", "{corpus}", "--out", "{tmp}/o", "--init", "{located}",
         "--grow-audio-locator", "8"],
        ["train", "--stage", "1", "--data", "{corpus}", "--out", "{tmp}/o", "--preset", "tiny", "--freeze", "ears"],
        ["train", "--stage", "1", "--data", "{corpus}", "--out", "{tmp}/o", "--preset", "tiny", "--oversample", "hat=2"],
        ["train", "--stage", "1", "--data", "{corpus}", "--out", "{tmp}/o", "--preset", "tiny", "--oversample",
         "beard=0"],
        ["train", "--stage", "1", "--data", "{corpus}", "--out", "{tmp}/o", "--preset", "tiny", "--oversample", "beard"],
        ["train", "--stage", "1", "--data", "{corpus}", "--out", "{tmp}/o", "--preset", "tiny", "--freeze", "backbone",
         "--freeze", "reference_net"],
        ["distill", "--teacher", "/nonexistent/model", "--data", "{corpus}", "--out", "{tmp}/o"],
        ["distill", "--teacher", "{tmp}", "--data", "{corpus}", "--out", "{tmp}/o", "--num-inference-steps", "0"],
        ["distill", "--teacher", "{tmp}", "--data", "{corpus}", "--out", "{tmp}/o", "--guidance", "0.5"],
        ["distill", "--teacher", "{teacher}", "--data", "{corpus}", "--out", "{tmp}/o", "--skip", "30"],
        ["distill", "--teacher", "{teacher}", "--data", "{corpus}", "--out", "{tmp}/o", "--skip", "500",
         "--num-inference-steps", "3"],
        ["distill", "--teacher", "{teacher}", "--data", "{corpus}", "--out", "{tmp}/o", "--strength", "0"],
        ["distill", "--teacher", "{teacher}", "--data", "{corpus}", "--out", "{tmp}/o", "--skip", "100",
         "--strength", "0.05"],
        ["distill", "--teacher", "{teacher}", "--data", "{corpus}", "--out", "{tmp}/o", "--skip", "100",
         "--strength", "0.2", "--num-inference-steps", "3"],
        ["distill", "--teacher", "{teacher}", "--data", "{corpus}", "--out", "{tmp}/o", "--student", "/nonexistent"],
        ["distill", "--teacher", "{teacher}", "--data", "{corpus}", "--out", "{tmp}/o", "--student", "{grown}"],
    ],
)
def test_cli_bad_input_exits_2(argv, corpus, tmp_path, capsys):
    if "{teacher}" in argv:  # a loadable teacher, so that the error is the option's
        AvatarPipeline.from_config("tiny", seed=0).save_pretrained(tmp_path / "teacher")
    if "{grown}" in argv:  # a student of another architecture than the teacher's
        grow_attention(AvatarPipeline.from_config("tiny", seed=0), [0]).save_pretrained(tmp_path / "grown")
    if "{located}" in argv:  # a model that has an audio locator already
        grow_audio_locator(AvatarPipeline.from_config("tiny", seed=0), 8).save_pretrained(tmp_path / "located")
    argv = [a.format(tmp=tmp_path, corpus=corpus, teacher=tmp_path / "teacher", grown=tmp_path / "grown",
                     located=tmp_path / "located") for a in argv]
    try:
        code = emote(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err


def test_refiner_stage_adds_and_trains_the_portrait_refiner_only(corpus, tmp_path):
    """From a student: the stage adds a PortraitRefiner, trains nothing else, its loss falls, and the exported model
    keeps the student's sampler and has the refiner; a second run continues it."""
    from avatar.grow import add_portrait_refiner

    student = tiny_student()
    pipe = add_portrait_refiner(student, seed=0)
    objective = build_objective("refiner", pipe)
    before, after, changed = overfit(objective, corpus, tmp_path / "fit", steps=30, lr=3e-3)
    assert after < 0.5 * before, (before, after)
    assert changed and all(n.startswith("portrait_refiner.") for n in changed)

    student.save_pretrained(tmp_path / "student")
    settings = LoopSettings(out=tmp_path / "run", steps=2, batch_size=2, lr=1e-3, save_every=10**6, progress=False)
    first = train_stage("refiner", corpus, settings, init=tmp_path / "student", limit_windows=2,
                        portrait_refiner_channels=(8, 12, 16)).model_dir
    exported = AvatarPipeline.from_pretrained(first)
    assert exported.config == student.config.replace(portrait_refiner_channels=(8, 12, 16))
    image = torch.zeros(1, 3, 32, 32)
    assert [f.shape[1] for f in exported.portrait_refiner.portrait_features(image, image)] == [8, 12, 16]
    for name in ("vae", "reference_net", "backbone", "audio_encoder"):
        a, b = getattr(student, name).state_dict(), getattr(exported, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    settings = LoopSettings(out=tmp_path / "again", steps=1, batch_size=2, lr=0.0, save_every=10**6, progress=False)
    again = AvatarPipeline.from_pretrained(train_stage("refiner", corpus, settings, init=first,
                                                       limit_windows=2).model_dir)
    a, b = exported.portrait_refiner.state_dict(), again.portrait_refiner.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # continued (at LR 0), not replaced by a new one


def test_warm_refiner_stage_fits_the_refiner_to_what_the_student_draws(corpus, tmp_path):
    from avatar.grow import add_portrait_refiner

    with pytest.raises(EmoteError, match="portrait refiner"):
        build_objective("warm-refiner", tiny_student())
    pipe = add_portrait_refiner(tiny_student(), seed=0)
    before, after, changed = overfit(build_objective("warm-refiner", pipe), corpus, tmp_path, steps=30, lr=3e-3)
    assert after < 0.7 * before, (before, after)
    assert changed and all(n.startswith("portrait_refiner.") for n in changed)


def test_warm_guidance_stage_teaches_one_pass_what_audio_guidance_gives_in_two(corpus, tmp_path):
    student = make_audible(tiny_student())
    objective = build_objective("warm-guidance", student, audio_guidance=3.0)
    guide = {n: p.detach().clone() for n, p in objective.guided.named_parameters()}
    before, after, changed = overfit(objective, corpus, tmp_path / "fit", steps=30, lr=1e-4)
    assert before > 0.01 and after < 0.8 * before, (before, after)  # the copy hears the audio 3x as strongly
    assert changed and all(n.startswith("backbone.") for n in changed)  # never the guided copy it learns from
    assert all(torch.equal(p, guide[n]) for n, p in objective.guided.named_parameters())

    student.save_pretrained(tmp_path / "student")
    run = ["train", "--stage", "warm-guidance", "--data", str(corpus), "--init", str(tmp_path / "student"),
           "--out", str(tmp_path / "run"), "--batch-size", "1", "--limit-windows", "2", "--quiet"]
    assert emote([*run, "--steps", "1", "--audio-guidance", "2"]) == 0
    folded = AvatarPipeline.from_pretrained(tmp_path / "run" / "model")
    assert (folded.config.sampler, folded.config.default_steps, folded.config.strength) == ("lcm", 1, 0.5)
    assert emote([*run, "--steps", "2", "--resume", "--audio-guidance", "3"]) == 2


def test_warm_guidance_lip_reading_term_reaches_the_backbone_and_its_expert_reads_true_frames_only(corpus, tmp_path):
    """With --lip-reading-weight, the backbone gets a gradient from the lip reader's reading of the frames it outputs
    (decoded, then refined if the model has a refiner), the lip reader learns from the true frames alone (what the
    backbone draws changes nothing it learns), and the run exports it, and refuses a resume without the term."""
    from avatar.checkpoint import load_training_module
    from avatar.train.lipsync import LIP_READER_MODULE, MouthExpert

    probe = build_objective("warm-guidance", tiny_student(), audio_guidance=2.0)
    dataset = open_dataset(corpus, probe.window_frames, probe.audio_context, seed=0, limit_windows=2)
    batch = default_collate([dataset[0], dataset[1]])

    def gradients(weight: float, backbone_scale: float = 1.0) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the same new expert every time
        objective = build_objective("warm-guidance", make_audible(tiny_student()), audio_guidance=2.0,
                                    lip_reading_weight=weight)
        # the student draws otherwise; its guided copy, taken before, does not
        scale_weights(objective.backbone.conv_out, backbone_scale)
        return loss_gradients(objective, batch)

    plain, term, other_drawing = gradients(0.0), gradients(1.0), gradients(1.0, backbone_scale=0.5)
    assert plain and all(n.startswith("backbone.") for n in plain)  # weight 0: no expert at all
    assert any(not torch.allclose(term[n], plain[n]) for n in plain)
    expert = [n for n in term if n.startswith("expert.")]
    assert expert and all(torch.equal(term[n], other_drawing[n]) for n in expert)
    assert set(term) == set(plain) | set(expert)

    # with a portrait refiner the term reads the frames the model outputs: refined, by a refiner that stays fixed
    from avatar.grow import add_portrait_refiner

    refined = {}
    for scale in (1.0, 0.5):
        pipe = add_portrait_refiner(make_audible(tiny_student()), seed=0)
        with torch.no_grad():  # a refiner that is not the identity it starts as
            for p in pipe.portrait_refiner.parameters():
                p.add_(0.05 * scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        torch.manual_seed(0)
        objective = build_objective("warm-guidance", pipe, audio_guidance=2.0, lip_reading_weight=1.0)
        refined[scale] = loss_gradients(objective, batch)
    assert set(refined[1.0]) == set(term)  # nothing of the refiner trains
    assert any(not torch.allclose(refined[1.0][n], refined[0.5][n]) for n in plain)

    passes = []  # the guided copy's passes per step: at guidance 1 it is the anchor alone, with no silent pass
    for guidance in (1.0, 2.0):
        objective = build_objective("warm-guidance", tiny_student(), audio_guidance=guidance, lip_reading_weight=0.1)
        objective.guided.register_forward_hook(lambda *_: passes.append(guidance))
        objective(batch, torch.Generator().manual_seed(0))
    assert passes == [1.0, 2.0, 2.0]
    with pytest.raises(EmoteError, match="holds the student to itself"):
        build_objective("warm-guidance", tiny_student(), audio_guidance=1.0)

    make_audible(tiny_student()).save_pretrained(tmp_path / "student")
    settings = LoopSettings(out=tmp_path / "run", steps=1, batch_size=2, lr=1e-4, save_every=10**6, progress=False)
    run = partial(train_stage, "warm-guidance", corpus, init=tmp_path / "student", limit_windows=2,
                  audio_guidance=2.0)
    run(settings, lip_reading_weight=0.1)
    assert load_training_module(settings.out / "model", LIP_READER_MODULE, MouthExpert) is not None
    with pytest.raises(EmoteError, match="lip_reading_weight 0.1 now None"):
        run(replace(settings, steps=2, resume=True))


def test_warm_refiner_stage_grows_an_audio_path_and_trains_it_with_the_lip_reading_term(corpus, tmp_path):
    """The audio path and the lip reader train with the refiner; the exported model hears audio, keeps everything else
    and carries the lip reader; a refiner that hears audio cannot go back to the single-frame `refiner` stage."""
    from avatar.checkpoint import load_training_module
    from avatar.grow import add_portrait_refiner, add_refiner_audio
    from avatar.train.lipsync import LIP_READER_MODULE, MouthExpert

    pipe = add_refiner_audio(add_portrait_refiner(tiny_student(), seed=0), 4, seed=0)
    objective = build_objective("warm-refiner", pipe, lip_reading_weight=0.5)
    before, after, changed = overfit(objective, corpus, tmp_path / "fit", steps=30, lr=3e-3)
    assert after < 0.8 * before, (before, after)
    assert any(n.startswith("portrait_refiner.audio_inputs.") for n in changed)
    assert any(n.startswith("expert.") for n in changed)
    assert all(n.startswith(("portrait_refiner.", "expert.")) for n in changed)
    with pytest.raises(EmoteError, match="warm-refiner"):
        build_objective("refiner", pipe)

    student = add_portrait_refiner(tiny_student(), seed=0)
    student.save_pretrained(tmp_path / "student")
    settings = LoopSettings(out=tmp_path / "run", steps=2, batch_size=2, lr=1e-3, save_every=10**6, progress=False)
    exported = AvatarPipeline.from_pretrained(train_stage(
        "warm-refiner", corpus, settings, init=tmp_path / "student", limit_windows=2, lip_reading_weight=0.1,
        refiner_audio_channels=4).model_dir)
    assert exported.config == student.config.replace(portrait_refiner_audio_channels=4)
    assert exported.portrait_refiner.hears_audio
    assert load_training_module(settings.out / "model", LIP_READER_MODULE, MouthExpert) is not None
    for name in ("vae", "reference_net", "backbone", "audio_encoder"):
        a, b = getattr(student, name).state_dict(), getattr(exported, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(EmoteError, match="refiner_audio_channels 4 now None"):  # a resume that would not grow it
        train_stage("warm-refiner", corpus, replace(settings, steps=3, resume=True), init=tmp_path / "student",
                    limit_windows=2, lip_reading_weight=0.1)


def test_cli_train_writes_a_loadable_model(corpus, tmp_path, capsys):
    out = tmp_path / "s1"
    code = emote(["train", "--stage", "1", "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--steps", "2",
                  "--batch-size", "1", "--limit-windows", "2", "--quiet"])
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    pipe = AvatarPipeline.from_pretrained(out / "model")
    assert pipe.config.sampler == "ddim"


def test_grown_attention_starts_as_the_trained_model_then_trains(corpus, tmp_path, portrait):
    """Attention added at the tiny preset's full-resolution level (it has none there): same outputs as before,
    and stage 1 trains the new blocks."""
    from avatar.pipeline import WindowInput, window_seed
    from conftest import speech_like

    pipe = AvatarPipeline.from_config("tiny", seed=3)
    for module in pipe.backbone.modules():  # a trained model's zero-initialised outputs are not zero any more
        if isinstance(module, torch.nn.Linear) and module.weight.abs().sum() == 0:
            torch.nn.init.normal_(module.weight, std=0.05)
    grown = grow_attention(pipe, [0])
    assert pipe.config.attention_levels == (False, True) and grown.config.attention_levels == (True, True)
    new = {n for n, _ in grown.backbone.named_parameters()} - {n for n, _ in pipe.backbone.named_parameters()}
    assert new and all(n.startswith("body.down.0.") or n.startswith("body.up.1.") for n in new), sorted(new)[:4]

    def window(p):
        cache = p.prepare_reference(portrait)
        audio = p.audio_windows(p.encode_audio(speech_like(0.16)))
        motion = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        return p.denoise_windows([WindowInput(cache, audio, torch.zeros(4), motion, window_seed(0, 1))], steps=2)

    assert torch.allclose(window(grown), window(pipe), atol=1e-5)
    _, _, changed = overfit(build_objective("1", grown), corpus, tmp_path, steps=3, lr=2e-3)
    assert {f"backbone.{n}" for n in new} & changed


def test_grown_audio_locator_starts_as_the_trained_model_then_trains_on_the_audio(corpus, tmp_path, portrait):
    """An audio locator added to a trained model changes nothing until trained; stage 2 trains it, and then the
    window depends on the audio through it."""
    from avatar.pipeline import WindowInput, window_seed
    from conftest import speech_like

    pipe = AvatarPipeline.from_config("tiny", seed=3)
    grown = grow_audio_locator(pipe, 8)
    assert grown.config.audio_locator_channels == 8 and pipe.config.audio_locator_channels == 0
    new = {n for n, _ in grown.backbone.named_parameters()} - {n for n, _ in pipe.backbone.named_parameters()}
    assert new and all(n.startswith("audio_locator.") for n in new), sorted(new)[:4]

    def window(p, audio=None, locator=True):
        cache = p.prepare_reference(portrait)
        if audio is None:
            audio = p.audio_windows(p.encode_audio(speech_like(0.16)))
        motion = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        saved = p.backbone.audio_locator
        p.backbone.audio_locator = saved if locator else None
        try:
            return p.denoise_windows([WindowInput(cache, audio, torch.zeros(4), motion, window_seed(0, 1))], steps=2)
        finally:
            p.backbone.audio_locator = saved

    assert torch.allclose(window(grown), window(pipe), atol=1e-6)
    objective = build_objective("2", grown)
    groups = objective.optimizer_groups(objective.set_trainable(), 1e-3)
    locator = {id(p) for p in grown.backbone.audio_locator.parameters()}
    assert [{id(p) for p in g["params"]} == locator for g in groups] == [False, True]  # it trains faster
    assert groups[1]["lr"] == pytest.approx(1e-3 * FAST_LR_SCALE) and groups[0]["lr"] == 1e-3
    _, _, changed = overfit(objective, corpus, tmp_path, steps=3, lr=2e-3)
    assert {f"backbone.{n}" for n in new} <= changed
    silence = grown.audio_windows(grown.encode_audio(torch.zeros(int(0.16 * 16000))))
    assert not torch.allclose(window(grown), window(grown, locator=False), atol=1e-4)  # it is used, and
    assert not torch.allclose(window(grown) - window(grown, audio=silence),  # its effect follows the audio
                              window(grown, locator=False) - window(grown, audio=silence, locator=False), atol=1e-4)

    grown.save_pretrained(tmp_path / "grown")
    reloaded = AvatarPipeline.from_pretrained(tmp_path / "grown")
    assert reloaded.config.audio_locator_channels == 8
    assert all(torch.equal(v, grown.backbone.state_dict()[k]) for k, v in reloaded.backbone.state_dict().items())
    with pytest.raises(EmoteError, match="already has an audio locator"):
        grow_audio_locator(grown, 8)


def test_resume_with_another_architecture_is_a_clear_error(corpus, tmp_path, capsys):
    AvatarPipeline.from_config("tiny", seed=0).save_pretrained(tmp_path / "init")
    common = ["train", "--stage", "1", "--init", str(tmp_path / "init"), "--data", str(corpus), "--out",
              str(tmp_path / "grown"), "--batch-size", "1", "--limit-windows", "2", "--quiet"]
    assert emote([*common, "--steps", "2", "--grow-attention", "0"]) == 0
    capsys.readouterr()
    assert emote([*common, "--steps", "3", "--resume"]) == 2  # the first run grew attention, this one does not
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--grow-attention" in err and "Traceback" not in err, err


@pytest.mark.parametrize("avx2, avx512_bf16, amx_tile, emulated", [
    (True, False, False, True),  # e.g. an AMD EPYC with AVX2 only
    (True, True, False, False), (True, False, True, False),
    (False, False, False, False),  # not x86: torch's x86 probes say nothing
])
def test_cpu_without_native_bf16_is_recognised(monkeypatch, avx2, avx512_bf16, amx_tile, emulated):
    for feature, present in (("avx2", avx2), ("avx512_bf16", avx512_bf16), ("amx_tile", amx_tile)):
        monkeypatch.setattr(torch.cpu, f"_is_{feature}_supported", lambda present=present: present)
    assert cpu_emulates_bf16() is emulated


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator: another precision needs it reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("emulated", [True, False])
def test_bf16_training_warns_where_the_cpu_emulates_it(corpus, tmp_path, capsys, monkeypatch, emulated,
                                                       fresh_accelerate_state):
    monkeypatch.setattr("avatar.train.loop.cpu_emulates_bf16", lambda: emulated)
    init = tmp_path / "init"
    AvatarPipeline.from_config("tiny", seed=0).save_pretrained(init)
    settings = LoopSettings(out=tmp_path / "run", steps=1, batch_size=1, save_every=10**6, progress=False,
                            mixed_precision="bf16")
    assert train_stage("2", corpus, settings, init=init, limit_windows=1).step == 1
    assert ("bf16 is emulated" in capsys.readouterr().err) is emulated
