"""`emote merge`: task-vector arithmetic is exact, touches only the named components, and bad input loses nothing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from avatar.checkpoint import WEIGHTS_FILE
from avatar.pipeline import AvatarPipeline
from conftest import run_cli


@pytest.fixture(scope="module")
def three_models(tmp_path_factory) -> list[Path]:
    """The tiny preset with three weight seeds: one architecture, different weights everywhere."""
    root = tmp_path_factory.mktemp("merge")
    paths = []
    for seed in range(3):
        path = root / f"m{seed}"
        AvatarPipeline.from_config("tiny", seed=seed).save_pretrained(path)
        paths.append(path)
    return paths


def weights(model: Path, component: str) -> dict[str, torch.Tensor]:
    return load_file(str(model / component / WEIGHTS_FILE))


def test_merge_adds_scaled_task_vectors_to_the_backbone_only(three_models, tmp_path, capsys):
    m0, m1, m2 = three_models
    out = tmp_path / "merged"
    code, stdout, err = run_cli(["merge", "--base", m0, "--add", "2", m1, m2, "--add", "-0.5", m0, m1,
                                 "--out", out], capsys)
    assert code == 0, err
    assert json.loads(stdout)["terms"] == 2

    base, a, b, merged = (weights(m, "backbone") for m in (m0, m1, m2, out))
    assert merged.keys() == base.keys()
    for key in base:
        expected = base[key] + 2 * (b[key] - a[key]) - 0.5 * (a[key] - base[key])
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    for component in ("vae", "reference_net", "audio_encoder"):
        assert (out / component / WEIGHTS_FILE).read_bytes() == (m0 / component / WEIGHTS_FILE).read_bytes()
    assert json.loads((out / "model_index.json").read_text())["merged"][0]["components"] == ["backbone"]

    pipe = AvatarPipeline.from_pretrained(out)
    assert torch.equal(pipe.backbone.state_dict()[next(iter(base))], merged[next(iter(base))])


def test_merge_every_named_component_and_keep_earlier_merges(three_models, tmp_path, capsys):
    m0, m1, m2 = three_models
    first, second = tmp_path / "first", tmp_path / "second"
    code, _, err = run_cli(["merge", "--base", m0, "--add", "1", m0, m1,
                            "--component", "backbone", "--component", "vae", "--out", first], capsys)
    assert code == 0, err
    for component in ("backbone", "vae"):  # m0 + (m1 - m0) is m1
        target, merged = weights(m1, component), weights(first, component)
        for key in target:
            torch.testing.assert_close(merged[key], target[key], rtol=0, atol=1e-5)
    assert (first / "reference_net" / WEIGHTS_FILE).read_bytes() == (m0 / "reference_net" / WEIGHTS_FILE).read_bytes()

    code, _, err = run_cli(["merge", "--base", first, "--add", "0.5", m1, m2, "--out", second], capsys)
    assert code == 0, err
    history = json.loads((second / "model_index.json").read_text())["merged"]
    assert [h["components"] for h in history] == [["backbone", "vae"], ["backbone"]]


def test_merge_bad_input_exits_2_and_keeps_the_old_output(three_models, tmp_path, capsys):
    m0, m1, m2 = three_models
    other = tmp_path / "other-architecture"
    shutil.copytree(m2, other)
    config_file = other / "backbone" / "config.json"
    config = json.loads(config_file.read_text())
    config["attention_heads"] = config["attention_heads"] * 2
    config_file.write_text(json.dumps(config))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    cases = [
        (["--add", "x", m1, m2], "SCALE must be a number"),
        (["--add", "nan", m1, m2], "between -100 and 100"),
        (["--add", "1", m1, tmp_path / "missing"], "does not exist"),
        (["--add", "1", m1, other], "differs from"),
        (["--add", "1", m1, m2, "--component", "no_such_part"], "has no component"),
        (["--add", "1", m1, m2, "--component", "../m1/backbone"], "has no component"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(["merge", "--base", m0, *extra, "--out", out], capsys)
        assert code == 2, (extra, err)
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert (out / "keep.txt").read_text() == "old" and not (out / "model_index.json").exists()

    for bad_out in (m0, m1 / "inside", m0.parent):
        code, _, err = run_cli(["merge", "--base", m0, "--add", "1", m1, m2, "--out", bad_out], capsys)
        assert code == 2 and "lies inside the input" in err and len(err.strip().splitlines()) == 1, err
    assert all((m / "model_index.json").is_file() for m in three_models) and not (m1 / "inside").exists()
    assert not list(tmp_path.glob(".out.tmp*"))
