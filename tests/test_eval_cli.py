"""`emote corpus` and `emote eval` from the command line: bad arguments, scoring a video, scoring a model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def emote(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["corpus", "--out", "{tmp}/c", "--identities", "0"], "--identities"),
    (["corpus", "--out", "{tmp}/c", "--hours", "-1"], "--hours"),
    (["corpus", "--out", "{tmp}/c", "--size", "8"], "--size"),
    (["corpus", "--out", "{tmp}/c", "--hours", "lots"], "--hours"),
    (["corpus"], "--out"),
    (["eval", "--video", "{tmp}/missing.mp4", "--clip", "c0000001"], "no such file"),
    (["eval", "--video", "{tmp}/missing.mp4"], "--clip"),
    (["eval", "--clip", "c0000001"], "--video"),
    (["eval", "--steps", "0"], "--steps"),
    (["eval", "--data", "{tmp}"], "not a corpus"),
    (["eval", "--model", "{tmp}/no-model"], "--model"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, message):
    result = emote(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_corpus_refuses_a_non_corpus_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = emote("corpus", "--out", str(tmp_path), "--hours", "0.001")
    assert result.returncode == 2 and "not empty" in result.stderr


@pytest.fixture(scope="module")
def eval_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalcorpus")
    result = emote("corpus", "--out", str(root), "--identities", "2", "--hours", str(12 / 3600), "--seed", "3",
                   "--size", "32", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "corpus:" in result.stderr and "wrote" in result.stdout  # progress, then a summary
    return root


def test_eval_scores_a_delayed_video(eval_corpus, tmp_path):
    from avatar.data.corpus import CorpusReader, encode_video
    from avatar.eval.evaluate import EvalClip, OracleView

    reader = CorpusReader(eval_corpus)
    clip_id = reader.clip_ids("test")[0]
    spec = reader.spec(clip_id)
    oracle = OracleView.of(EvalClip(spec, reader.identity(spec.identity_index)), 64)
    late = np.concatenate([np.repeat(oracle.frames[:1], 3, axis=0), oracle.frames[:-3]])
    video = tmp_path / "late.mp4"
    video.write_bytes(encode_video(late))
    result = emote("eval", "--video", str(video), "--clip", clip_id, "--data", str(eval_corpus), "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert {"lip_sync", "psnr", "ssim", "drift", "flicker"} <= set(scores)
    assert set(scores["lip_sync"]) >= {"r", "offset_frames"}
    assert scores["lip_sync"]["offset_frames"] == 3
    assert 20 < scores["psnr"] < 100 and 0 < scores["ssim"] < 1

    unknown = emote("eval", "--video", str(video), "--clip", "c9999999", "--data", str(eval_corpus))
    assert unknown.returncode == 2 and "c9999999" in unknown.stderr


def test_eval_scores_a_model(eval_corpus, tmp_path, tiny_pipe):
    from avatar.eval.evaluate import evaluate_model, load_eval_clips

    tiny_pipe.save_pretrained(tmp_path / "model")
    clips = load_eval_clips(eval_corpus, max_clips=1)
    clips[0].spec.audio = clips[0].spec.audio[:16000]  # one second keeps the test fast
    clips[0].spec.params = clips[0].spec.params[:25]
    result = evaluate_model(str(tmp_path / "model"), 1, clips, drift_seconds=0)
    assert result["resolution"] == tiny_pipe.resolution and result["frames"] == 25
    assert {"lip_sync", "psnr", "ssim", "drift", "flicker"} <= set(result)
    json.dumps(result)
