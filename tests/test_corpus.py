"""Corpus writer and reader: determinism, splits, atomic shards, and a round trip through the training loader."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from avatar.data.corpus import PARAM_COLUMNS, CorpusReader, make_clip, write_corpus
from avatar.data.face import FaceRenderer, identity_for
from avatar.data.speech import is_heldout_sentence

HOURS = 20.0 / 3600  # about 20 seconds: a few clips


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root, identities=2, hours=HOURS, seed=5, size=32, log=lambda line: None)
    return root


def test_same_seed_gives_identical_bytes(corpus, tmp_path):
    write_corpus(tmp_path, identities=2, hours=HOURS, seed=5, size=32, log=lambda line: None)
    assert _files(tmp_path) == _files(corpus)
    assert not [p for p in corpus.rglob("*.tmp")]  # atomic writes leave no temporaries


def test_different_seeds_give_different_data():
    a, _ = make_clip(1, 0, 3)
    b, _ = make_clip(2, 0, 3)
    assert a.audio.shape != b.audio.shape or not np.array_equal(a.audio, b.audio)
    assert identity_for(1, 0) != identity_for(2, 0)


def test_splits_hold_out_identities_and_sentences(corpus):
    reader = CorpusReader(corpus)
    index = reader.index
    assert index["heldout_identities"] == [1]
    assert set(reader.clip_ids("train")) | set(reader.clip_ids("test")) == set(reader.clip_ids())
    assert reader.clip_ids("test"), "the corpus must contain held-out clips"
    for clip_id in reader.clip_ids():
        entry, meta = reader.entry(clip_id), reader.meta(clip_id)
        heldout = entry["split"] == "test"
        assert (entry["identity"] in index["heldout_identities"]) == heldout
        for text in meta.get("texts", []):
            assert is_heldout_sentence(text) == heldout


def test_progress_is_reported(tmp_path):
    lines: list[str] = []
    write_corpus(tmp_path, identities=2, hours=3.0 / 3600, seed=0, size=16, log=lines.append)
    assert lines and "100%" in lines[-1]


def test_round_trip_through_reader(corpus):
    reader = CorpusReader(corpus)
    clip_id = reader.clip_ids("train")[0]
    clip = reader.load(clip_id)
    spec, frames = make_clip(5, int(clip_id[1:]), 2, size=32)
    assert clip.frames.shape == frames.shape == (spec.num_frames, 32, 32, 3)
    assert np.abs(clip.frames.astype(int) - frames.astype(int)).mean() < 4.0  # H.264 at CRF 18, tiny frames
    assert np.array_equal(clip.params, spec.params)
    assert clip.params.shape[1] == len(PARAM_COLUMNS)
    assert len(clip.audio) == clip.frames.shape[0] * 640
    assert np.abs(clip.audio - spec.audio).max() < 1e-3  # 16-bit FLAC
    assert reader.identity(clip.identity_index) == identity_for(5, clip.identity_index)
    rendered = FaceRenderer(reader.identity(clip.identity_index), 32).render(spec.states()[0])
    assert np.array_equal(rendered, frames[0])
    with pytest.raises(KeyError):
        reader.entry("nope")


def test_round_trip_through_training_dataset(corpus):
    import torch

    from avatar.data.corpus import ClipWindowDataset

    reader = CorpusReader(corpus)
    dataset = ClipWindowDataset(corpus, "train", num_frames=8, audio_context=2)
    assert len(dataset) > 0
    item = dataset[1]
    assert item["frames"].shape == (8, 32, 32, 3) and item["frames"].dtype == torch.uint8
    assert item["audio"].shape == ((8 + 4) * 640,) and item["audio"].dtype == torch.float32
    assert item["reference"].shape == (32, 32, 3)
    assert item["face_box"].shape == (8, 4) and item["speed"].shape == (8,) and item["mouth_open"].shape == (8,)
    clip_index, start = dataset.windows[1]
    clip = reader.load(dataset.clip_ids[clip_index])
    assert np.array_equal(item["frames"].numpy(), clip.frames[start:start + 8])
    lo = (start - 2) * 640
    expected = clip.audio[max(lo, 0):(start + 10) * 640]
    assert np.array_equal(item["audio"].numpy()[-len(expected):], expected)
    assert np.allclose(item["mouth_open"].numpy(), clip.column("mouth_open")[start:start + 8])
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch["frames"].shape == (2, 8, 32, 32, 3)


def test_clip_metadata_describes_the_audio(corpus):
    reader = CorpusReader(corpus)
    kinds = {reader.meta(c)["kind"] for c in reader.clip_ids()}
    assert kinds <= {"speech", "singing", "silence"}
    meta = reader.meta(reader.clip_ids()[0])
    assert json.loads(json.dumps(meta)) == meta and "phonemes" in meta
