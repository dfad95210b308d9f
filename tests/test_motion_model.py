"""The motion backbone on small configs: audio features, shapes, save/load, seeding, streaming, training, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar.errors import EmoteError
from avatar.motion import spec
from avatar.motion.audio import FEATURE_DIM, StreamingMotionAudioEncoder, encode_audio
from avatar.motion.backbone import MotionBackbone
from avatar.motion.generate import CONTEXT_FRAMES, MotionGenerator, MotionStream, motion_for_audio, window_generator

torch.set_num_threads(1)


def tiny_backbone(seed: int = 0) -> MotionBackbone:
    torch.manual_seed(seed)
    model = MotionBackbone(width=32, layers=2, heads=2, audio_hidden=32)
    with torch.no_grad():  # random, non-trivial weights (zero-initialised parameters would hide bugs)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    envelope = (np.sin(2 * np.pi * 3 * t) > 0).astype(np.float32)
    return (0.2 * envelope * np.sign(np.sin(2 * np.pi * 140 * t)) + rng.normal(0, 0.01, len(t))).astype(np.float32)


def test_features_have_one_row_per_frame():
    for samples in (1, 639, 640, 641, 16000):
        features = encode_audio(np.zeros(samples, np.float32))
        assert features.shape == (-(-samples // 640), FEATURE_DIM)
        assert features.dtype == np.float32 and np.isfinite(features).all()


def test_streaming_encoder_equals_offline_in_any_chunking():
    audio = speechlike(3.0)
    offline = encode_audio(audio)
    rng = np.random.default_rng(1)
    encoder = StreamingMotionAudioEncoder()
    pieces, i = [], 0
    while i < len(audio):
        n = int(rng.integers(1, 3000))
        pieces.append(encoder.push(audio[i:i + n]))
        if i > 16000 and not hasattr(encoder, "_checked"):  # snapshot/restore mid-stream changes nothing
            saved = encoder.snapshot()
            encoder.push(rng.normal(0, 1, 5000).astype(np.float32))
            encoder.restore(saved)
            encoder._checked = True
        i += n
    pieces.append(encoder.flush())
    streamed = np.concatenate(pieces)
    assert streamed.shape == offline.shape
    assert np.abs(streamed - offline).max() < 1e-5
    assert encoder.lookahead_samples == 0 and encoder.feature_dim == FEATURE_DIM


def test_relative_features_ignore_gain():
    audio = speechlike(2.0)
    base = encode_audio(audio)
    for db in (-12, 12):
        other = encode_audio(audio * 10 ** (db / 20))
        relative = np.ones(FEATURE_DIM, bool)
        relative[40::41] = False  # every 41st value is the absolute level
        assert np.abs(other[:, relative] - base[:, relative]).max() < 1e-3
        assert np.abs(other[:, ~relative] - base[:, ~relative]).mean() > 0.1


@pytest.mark.parametrize("bad", [np.zeros((2, 640)), np.array([0.0, np.nan] * 400), np.array(["a", "b"])])
def test_bad_audio_raises_emote_error(bad):
    with pytest.raises(EmoteError):
        encode_audio(bad)


def window(batch: int, frames: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"audio": torch.randn(batch, frames, 2 * CONTEXT_FRAMES + 1, FEATURE_DIM, generator=g),
            "reference": torch.randn(batch, spec.REFERENCE_DIM, generator=g),
            "previous": torch.rand(batch, 4, spec.MOTION_DIM, generator=g) * 0.5,
            "speaking": torch.ones(batch, frames, dtype=torch.bool)}


def test_generate_shapes_ranges_and_mixed_previous():
    gen = MotionGenerator(tiny_backbone())
    w = window(3, 5)
    w["previous"][1] = float("nan")  # the second session has no previous window yet
    for steps in (1, 2):
        out = gen.generate(w["audio"], w["reference"], w["previous"], w["speaking"],
                           [window_generator(s, 0) for s in range(3)], steps=steps)
        assert out.shape == (3, 5, spec.MOTION_DIM) and torch.isfinite(out).all()
        assert np.array_equal(out.numpy(), spec.clip(out.numpy()))
    first = gen.generate(w["audio"], w["reference"], None, w["speaking"], [window_generator(0, 0)] * 3)
    assert first.shape == (3, 5, spec.MOTION_DIM)


def test_numpy_forward_equals_torch_forward():
    from avatar.motion.fast import FastBackbone

    model = tiny_backbone()
    w = window(2, 6)
    x = torch.randn(2, 6, spec.MOTION_DIM)
    t = torch.tensor([1.0, 0.3])
    keep = torch.tensor([True, False])
    with torch.no_grad():
        expected = model(x, t, w["audio"], w["reference"], w["previous"], w["speaking"], previous_keep=keep)
    got = FastBackbone(model)(x.numpy(), t.numpy(), w["audio"].numpy(), w["reference"].numpy(),
                              w["previous"].numpy(), w["speaking"].numpy(), keep.numpy())
    assert np.abs(got - expected.numpy()).max() < 1e-5


def test_guided_torch_path_runs():
    gen = MotionGenerator(tiny_backbone(), guidance=2.0)
    w = window(1, 4)
    out = gen.generate(w["audio"], w["reference"], w["previous"], w["speaking"], [window_generator(0, 0)], steps=3)
    assert out.shape == (1, 4, spec.MOTION_DIM)


def test_save_load_is_bit_exact(tmp_path):
    from avatar.motion.checkpoint import load_backbone, save_backbone

    model = tiny_backbone()
    save_backbone(model, tmp_path / "m")
    loaded = load_backbone(tmp_path / "m")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    public = lambda config: {k: v for k, v in dict(config).items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    w = window(1, 4)
    outs = [MotionGenerator(m).generate(w["audio"], w["reference"], w["previous"], w["speaking"],
                                        [window_generator(5, 2)]) for m in (model, loaded)]
    assert torch.equal(outs[0], outs[1])


def test_load_errors_are_emote_errors(tmp_path):
    from avatar.motion.checkpoint import load_backbone

    with pytest.raises(EmoteError, match="config.json"):
        load_backbone(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EmoteError):
        load_backbone(tmp_path)


def test_seeding_is_deterministic_and_seed_dependent():
    gen = MotionGenerator(tiny_backbone())
    audio = speechlike(1.2)
    ref = np.zeros(spec.REFERENCE_DIM, np.float32)
    a = motion_for_audio(gen, audio, ref, seed=3)
    b = motion_for_audio(gen, audio, ref, seed=3)
    c = motion_for_audio(gen, audio, ref, seed=4)
    assert a.shape == (30, spec.MOTION_DIM)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    g1, g2 = window_generator(1, 7), window_generator(1, 7)
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))
    assert not torch.equal(torch.randn(4, generator=window_generator(1, 8)), torch.randn(4, generator=g1))


@pytest.mark.parametrize("options", [{}, {"pose_cutoff_hz": 0.05, "mouth_noise": 0.6}])
def test_live_windows_equal_offline(options):
    """The engine's loop: audio arrives in odd-sized chunks, a window is generated whenever 4 frames are ready."""
    gen = MotionGenerator(tiny_backbone(), **options)
    audio = speechlike(2.0)
    ref = np.full(spec.REFERENCE_DIM, 0.5, np.float32)
    offline = motion_for_audio(gen, audio, ref, seed=9, steps=2)
    stream = MotionStream(gen, ref, seed=9, steps=2, frames_per_window=4)
    ready, out, i = np.zeros((0, FEATURE_DIM), np.float32), [], 0
    rng = np.random.default_rng(0)
    while i < len(audio):
        n = int(rng.integers(100, 4000))
        ready = np.concatenate([ready, stream.encoder.push(audio[i:i + n])])
        i += n
        while len(ready) >= 4:
            out.append(stream.window_motion(ready[:4]))
            ready = ready[4:]
    ready = np.concatenate([ready, stream.encoder.flush()])
    if len(ready):
        out.append(stream.window_motion(ready))
    assert np.abs(np.concatenate(out) - offline).max() < 1e-5


def test_generate_rejects_bad_input():
    gen = MotionGenerator(tiny_backbone())
    w = window(1, 4)
    gens = [window_generator(0, 0)]
    with pytest.raises(EmoteError, match="audio"):
        gen.generate(w["audio"][..., :10], w["reference"], None, w["speaking"], gens)
    with pytest.raises(EmoteError, match="previous"):
        gen.generate(w["audio"], w["reference"], torch.zeros(1, 2, spec.MOTION_DIM), w["speaking"], gens)
    with pytest.raises(EmoteError, match="generator"):
        gen.generate(w["audio"], w["reference"], None, w["speaking"], gens * 2)
    with pytest.raises(EmoteError, match="steps"):
        gen.generate(w["audio"], w["reference"], None, w["speaking"], gens, steps=0)
    with pytest.raises(EmoteError, match="reference"):
        motion_for_audio(gen, speechlike(0.5), np.zeros(3, np.float32))
    with pytest.raises(EmoteError):
        motion_for_audio(gen, np.zeros(0, np.float32), np.zeros(spec.REFERENCE_DIM, np.float32))


def test_training_and_distillation_lower_the_loss():
    from avatar.motion.data import corpus_clip, nonspeech_clip
    from avatar.motion.train import TrainConfig, WindowSampler, distill, train_teacher

    clips = [corpus_clip(2402, i)[0] for i in range(3)] + [nonspeech_clip(0, 0)]
    sampler = WindowSampler(clips, motion_frames=4, references=np.random.default_rng(0).normal(1, 0.1, (4, 8)))
    torch.manual_seed(0)
    model = MotionBackbone(width=32, layers=1, heads=2, audio_hidden=32)
    losses = train_teacher(model, sampler, TrainConfig(steps=80, batch=16, lr=3e-3, log_every=1000),
                           log=lambda line: None)
    assert np.mean(losses[-15:]) < 0.8 * np.mean(losses[:15])
    _, student_losses = distill(model, sampler, TrainConfig(steps=40, batch=16, lr=3e-3, log_every=1000),
                                teacher_steps=2, log=lambda line: None)
    assert np.mean(student_losses[-10:]) < np.mean(student_losses[:10])


def test_pose_leak_pulls_the_carried_head_pose_toward_rest():
    model = tiny_backbone()
    w = window(1, 4)
    previous = torch.zeros(1, 4, spec.MOTION_DIM)
    previous[..., spec.INDEX["yaw"]] = 10.0
    outs = {}
    for leak in (0.0, 0.5):
        gen = MotionGenerator(model, pose_leak=leak)
        outs[leak] = gen.generate(w["audio"], w["reference"], previous, w["speaking"], [window_generator(0, 0)])
    plain = MotionGenerator(model).generate(w["audio"], w["reference"], previous.clone(), w["speaking"],
                                            [window_generator(0, 0)])
    assert torch.equal(plain, outs[0.0])  # the default reads the (absent) config value: no leak
    assert not torch.equal(outs[0.0], outs[0.5])
    assert previous[0, 0, spec.INDEX["yaw"]] == 10.0  # the caller's carry is not modified


def test_training_resumes_from_its_saved_state(tmp_path):
    """A rerun with the same state file continues the teacher where it stopped (state every 500 steps)."""
    from avatar.motion.data import corpus_clip
    from avatar.motion.train import TrainConfig, WindowSampler, train_teacher

    sampler = WindowSampler([corpus_clip(2402, 0)[0]], motion_frames=4)
    state = tmp_path / "state.pt"
    model = MotionBackbone(width=16, layers=1, heads=2, audio_hidden=16)
    first = train_teacher(model, sampler, TrainConfig(steps=500, batch=2, log_every=1000), state, log=lambda l: None)
    lines: list[str] = []
    again = train_teacher(MotionBackbone(width=16, layers=1, heads=2, audio_hidden=16), sampler,
                          TrainConfig(steps=510, batch=2, log_every=1000), state, log=lines.append)
    assert lines[0] == "teacher: resumed at step 500"
    assert again[:500] == first and len(again) == 510


def test_pose_controller_holds_the_mean_pose_at_rest():
    """The controller on the plant it is built for: a model that continues its carried head pose and adds a bias and
    noise each frame (the trained model's drift; a random tiny backbone ignores its carry, so it is simulated here).
    Without the controller the pose runs away; with it the mean returns to rest and the fast motion stays."""
    rng = np.random.default_rng(0)
    yaw, tx = spec.INDEX["yaw"], spec.INDEX["tx"]
    bias = np.zeros(spec.MOTION_DIM, np.float32)
    bias[yaw], bias[tx] = 0.05, -0.0002  # per frame: 0.05 degrees (75 degrees in 1500 frames unchecked)
    pose_scale = np.array([f.scale if f.relative else 0.0 for f in spec.MOTION_FIELDS], np.float32)  # yaw: 0.3 deg
    for window in (1, 4, 7):
        gen = MotionGenerator(tiny_backbone(), pose_cutoff_hz=0.05)
        carry, out, free = None, [], [np.zeros(spec.MOTION_DIM, np.float32)]
        for _ in range(1500 // window):
            start = np.zeros(spec.MOTION_DIM, np.float32) if carry is None else carry[gen.motion_frames - 1]
            steps = bias + rng.normal(0, 0.05, (window, spec.MOTION_DIM)).astype(np.float32) * pose_scale
            raw = spec.clip(start + np.cumsum(steps, axis=0))  # the plant: continues its carry
            motion = gen._correct_pose(raw[None], None if carry is None else carry[None, :gen.motion_frames],
                                       None if carry is None else carry[None, gen.motion_frames])[0]
            carry = gen.next_carry(carry, motion)
            out.append(motion)
            free.append(free[-1][-1] + np.cumsum(steps, axis=0))
        motion = np.concatenate(out)
        late = motion[750:]  # the last 30 s
        assert abs(np.concatenate(free[1:])[750:, yaw].mean()) > 20  # unchecked, it runs away
        assert abs(late[:, yaw].mean()) < 1.0 and abs(late[:, tx].mean()) < 0.005
        # motion at speech rhythms stays: the frame-to-frame changes keep their size
        assert 0.9 < np.diff(late[:, yaw]).std() / 0.3 < 1.1


def test_engine_batches_with_carries_equal_offline():
    """What the engine does (`avatar.photo_model`): two sessions in one batch, each window's carry from
    `next_carry`, equal to each session rendered alone; the carry holds the controller's state row."""
    gen = MotionGenerator(tiny_backbone(), pose_cutoff_hz=0.05, mouth_noise=0.6)
    refs = [np.zeros(spec.REFERENCE_DIM, np.float32), np.full(spec.REFERENCE_DIM, 0.5, np.float32)]
    audios = [speechlike(1.6, seed=1), speechlike(1.6, seed=2)]
    offline = [motion_for_audio(gen, a, r, seed=s, frames_per_window=1) for s, (a, r) in enumerate(zip(audios, refs))]
    features = [encode_audio(a) for a in audios]
    carries: list = [None, None]
    out: list[list[np.ndarray]] = [[], []]
    offsets = np.arange(-CONTEXT_FRAMES, CONTEXT_FRAMES + 1)
    for k in range(len(features[0])):
        audio = np.stack([f[np.clip(k + offsets, 0, k)] for f in features])[:, None]  # no future audio: repeat k
        previous = None if carries[0] is None else np.stack(carries)
        motion = gen.generate(audio, np.stack(refs), previous, np.ones((2, 1), bool),
                              [window_generator(s, k) for s in range(2)]).numpy()
        for i in range(2):
            out[i].append(motion[i])
            carries[i] = gen.next_carry(carries[i], motion[i])
    assert carries[0].shape == (gen.carry_rows, spec.MOTION_DIM) == (5, spec.MOTION_DIM)
    for i in range(2):
        assert np.abs(np.concatenate(out[i]) - offline[i]).max() < 1e-5


def test_sampler_defaults_reproduce_the_trained_behaviour():
    """Without the new config values (an older model's config), sampling is exactly as before the knobs existed."""
    model = tiny_backbone()
    assert model.config.pose_cutoff_hz == 0.0 and model.config.mouth_noise == 1.0
    gen = MotionGenerator(model)
    assert gen.carry_rows == gen.motion_frames
    w = window(1, 4)
    noise = torch.randn(4, spec.MOTION_DIM, generator=window_generator(2, 3)).numpy()
    with torch.no_grad():
        expected = model(torch.from_numpy(noise)[None], torch.ones(1), w["audio"], w["reference"],
                         torch.from_numpy(spec.normalize(w["previous"].numpy())), w["speaking"])
    got = gen.generate(w["audio"], w["reference"], w["previous"], w["speaking"], [window_generator(2, 3)])
    assert np.abs(got.numpy() - spec.clip(spec.denormalize(expected.numpy()))).max() < 1e-5
    with pytest.raises(EmoteError, match="mouth_noise"):
        MotionGenerator(model, mouth_noise=1.5)
    with pytest.raises(EmoteError, match="previous"):  # with the controller on, a carry has its state row
        MotionGenerator(model, pose_cutoff_hz=0.05).generate(w["audio"], w["reference"], w["previous"],
                                                             w["speaking"], [window_generator(0, 0)])
