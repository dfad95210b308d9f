"""Task-vector arithmetic on model directories: `base + Σ scale · (to − from)` on chosen components' weights.

Two fine-tunes of one model each move its weights along a direction of their own (a "task vector", Ilharco et al.
2022, arXiv 2212.04089). Adding them, or extrapolating one, is how the sixteenth shipped run was made from the
lip-reading and guidance-fold runs; `emote merge` makes that step reproducible. Every other file of the base
directory is copied unchanged.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from avatar.checkpoint import INDEX_FILE, WEIGHTS_FILE, publish_directory, read_index
from avatar.errors import CheckpointError, EmoteError


def _config(model: Path, component: str) -> dict:
    config_file = model / component / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_file} is unreadable: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a component config")
    return {k: v for k, v in config.items() if k != "_diffusers_version"}


def _weights(model: Path, component: str) -> dict[str, torch.Tensor]:
    weights_file = model / component / WEIGHTS_FILE
    if not weights_file.is_file():
        raise CheckpointError(f"{weights_file} is missing")
    try:
        return load_file(str(weights_file))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{weights_file} is unreadable: {exc}") from exc


def merge_task_vectors(base: str | Path, terms: Sequence[tuple[float, str | Path, str | Path]],
                       out: str | Path, components: Sequence[str] = ("backbone",)) -> Path:
    """Write `out`: a copy of the model directory `base` whose `components` hold base + Σ scale · (to − from) over
    `terms` (scale, from, to), summed in float32 in the order given. Every model must have the same config for those
    components. `out` is written beside itself and renamed into place; it may not be, hold or lie inside an input.
    `model_index.json` gains the merge's terms under "merged", after any earlier merges of `base`."""
    base, out = Path(base), Path(out)
    terms = [(float(scale), Path(src), Path(dst)) for scale, src, dst in terms]
    if not terms:
        raise EmoteError("nothing to merge: give at least one term")
    if not components:
        raise EmoteError("nothing to merge: give at least one component")
    inputs = [base] + [p for _, src, dst in terms for p in (src, dst)]
    indexes = [read_index(model) for model in inputs]
    target = out.resolve()
    for model in inputs:
        model = model.resolve()
        if target == model or target.is_relative_to(model) or model.is_relative_to(target):
            raise EmoteError(f"the output {out} is, holds or lies inside the input {model}; write to a new directory")
    if not target.name:
        raise EmoteError(f"the output {out} is not a directory name")
    known = set(indexes[0].get("components", {})) | set(indexes[0].get("training_modules", {}))
    for component in components:
        if component not in known:
            raise EmoteError(f"{base} has no component {component!r} (it has: {', '.join(sorted(known))})")
    for scale, _, _ in terms:
        if not -100 <= scale <= 100:  # also refuses nan
            raise EmoteError(f"a scale must be between -100 and 100, got {scale}")

    merged: dict[str, dict[str, torch.Tensor]] = {}
    for component in components:
        config = _config(base, component)
        for model in inputs[1:]:
            if _config(model, component) != config:
                raise EmoteError(f"{model / component / 'config.json'} differs from {base / component}: "
                                 "only models of one architecture can be merged")
        state = _weights(base, component)
        total = {key: tensor.float() for key, tensor in state.items()}
        for scale, src, dst in terms:
            src_state, dst_state = _weights(src, component), _weights(dst, component)
            for model, other in ((src, src_state), (dst, dst_state)):
                if other.keys() != state.keys() or any(other[k].shape != state[k].shape for k in state):
                    raise EmoteError(f"{model / component / WEIGHTS_FILE} does not match {base / component}'s tensors")
            for key in total:
                total[key] += scale * (dst_state[key].float() - src_state[key].float())
        merged[component] = {key: total[key].to(state[key].dtype).contiguous() for key in state}
        if not all(torch.isfinite(t).all() for t in merged[component].values() if t.is_floating_point()):
            raise EmoteError(f"the merged {component} has non-finite weights")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    except OSError as exc:
        raise EmoteError(f"cannot write beside {out}: {exc}") from exc
    try:
        shutil.copytree(base, tmp, dirs_exist_ok=True)
        for component, state in merged.items():
            with safe_open(str(base / component / WEIGHTS_FILE), framework="pt") as f:
                metadata = f.metadata()
            save_file(state, str(tmp / component / WEIGHTS_FILE), metadata=metadata)
        index = dict(indexes[0])
        earlier = index.get("merged", [])
        index["merged"] = (earlier if isinstance(earlier, list) else [earlier]) + [{
            "components": list(components),
            "terms": [{"scale": scale, "from": str(src), "to": str(dst)} for scale, src, dst in terms]}]
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        publish_directory(tmp, out)
    except (OSError, shutil.Error) as exc:
        raise EmoteError(f"could not write {out}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
