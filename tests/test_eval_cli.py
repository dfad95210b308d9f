"""`emote corpus` and `emote eval` from the command line: bad arguments, scoring a video, scoring a model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def emote(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


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
    (["eval", "--strength", "1.5"], "--strength"),
    (["eval", "--video", "{tmp}/v.mp4", "--clip", "c0000001", "--strength", "0.5"], "cannot be combined"),
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


def test_eval_table_compares_rows_and_writes_table_strip_and_json(eval_corpus, tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "model")
    model = tmp_path / "model"
    result = emote("eval-table", "--data", str(eval_corpus), "--clips", "1", "--drift-seconds", "0",
                   "--row", f"teacher={model}:3:2", "--row", f"student={model}:1:1:0.5",
                   "--markdown", str(tmp_path / "table.md"), "--strip", str(tmp_path / "strip.png"),
                   "--json", str(tmp_path / "rows.json"), "--vae-ceiling", timeout=300)
    assert result.returncode == 0, result.stderr
    ceiling, *rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["label"], r["steps"], r["guidance"], r["strength"]) for r in rows] == [
        ("teacher", 3, 2.0, 1.0), ("student", 1, 1.0, 0.5)]
    assert all(r["cpu_fps"] > 0 and r["drift"] is None for r in rows)
    assert ceiling["label"].startswith("VAE only") and ceiling["frames"] == rows[0]["frames"] > 0
    table = (tmp_path / "table.md").read_text()
    assert table == result.stdout and table.count("\n") == 5 and "| teacher |" in table
    from PIL import Image

    from avatar.eval.compare import label_column_width

    strip = np.asarray(Image.open(tmp_path / "strip.png"))
    size = tiny_pipe.resolution
    assert strip.shape[0] == 3 * size  # oracle, teacher, student
    frames_width = strip.shape[1] - label_column_width(["oracle", "teacher (3)", "student (1)"])
    assert frames_width % size == 0 and frames_width // size >= 4  # a label column, then whole frames
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("args, message", [
    (["--row", "nolabel"], "label=DIR:STEPS"),
    (["--row", "a={tmp}:x"], "STEPS must be an integer"),
    (["--row", "a={tmp}:0"], "at least 1"),
    (["--row", "a={tmp}:2:nan"], "finite"),
    (["--row", "a={tmp}:2:1:0"], "STRENGTH must be in (0, 1]"),
    (["--row", "a=:2"], "DIR is empty"),
    (["--row", "a={tmp}/missing:2"], "no such model directory"),
    (["--row", "a={tmp}:2", "--row", "a={tmp}:4"], "distinct"),
    (["--row", "a={tmp}:2", "--drift-for", "b"], "names no row"),
    (["--row", "a={tmp}:2", "--markdown", "{tmp}"], "is a directory"),
    (["--row", "a={tmp}:2", "--data", "{tmp}"], "not a corpus"),
])
def test_eval_table_bad_arguments_exit_2(tmp_path, args, message):
    result = emote("eval-table", *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


@pytest.mark.parametrize("text, expected", [
    ("s=models/student:2", ("models/student", 2, 1.0, None)),
    ("t=models/teacher:25:2", ("models/teacher", 25, 2.0, None)),
    ("s=models/student:1:1:0.4", ("models/student", 1, 1.0, 0.4)),
    ("s=C:/models/student:1:1:0.4", ("C:/models/student", 1, 1.0, 0.4)),  # DIR keeps its colons
    ("s=run:3/model:2", ("run:3/model", 2, 1.0, None)),
])
def test_eval_table_row_fields(text, expected):
    from avatar.eval.compare import Row

    row = Row.parse(text)
    assert (row.model_dir, row.steps, row.guidance, row.strength) == expected


def test_eval_table_checks_every_rows_sampler_before_evaluating(tiny_model_dir, tmp_path):
    result = emote("eval-table", "--row", f"a={tiny_model_dir}:2", "--row", f"b={tiny_model_dir}:20:1:0.3",
                   env={"EMOTE_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--row b:" in lines[0] and "at most 15 steps" in lines[0], lines
    assert not any(tmp_path.iterdir()), "nothing was evaluated (the held-out set was not even built)"
