"""A torch Dataset of fixed-length frame windows with aligned audio, for training."""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

from avatar.data.corpus import PARAM_COLUMNS, ClipData, CorpusReader
from avatar.data.face import IDENTITY_TRAITS
from avatar.data.motion import HOP


class ClipWindowDataset(Dataset):
    """Windows of `num_frames` consecutive frames from the clips of one split.

    Each item is a dict of tensors:
        frames      uint8 [F, H, W, 3]
        audio       float32 [(F + 2 * audio_context) * 640]: the window's 16 kHz audio plus `audio_context`
                    frames (40 ms each) on either side, zero-padded at clip edges; sample 0 is at the start of
                    frame (first - audio_context)
        reference   uint8 [H, W, 3], a frame of the same clip outside the window when possible
        face_box    float32 [F, 4] (x0, y0, x1, y1) normalised to [0, 1]
        speed       float32 [F] head-rotation speed, degrees per frame
        mouth_open  float32 [F] oracle mouth opening in [0, 1]
        params      float32 [F, len(PARAM_COLUMNS)] every oracle column
        identity    int64 identity index;  clip_index  int64 position of the clip in the split
    Windows start every `stride` frames (default: num_frames). The reference frame is chosen by `seed`.
    Decoded clips are kept in an LRU cache of `cache_clips` clips; `keep_all_decoded()` keeps every clip of the
    split, which training uses when the decoded split fits in memory (shuffled windows would otherwise decode a clip
    per item).
    """

    def __init__(self, root: str | os.PathLike, split: str, num_frames: int = 12, audio_context: int = 2,
                 stride: int | None = None, seed: int = 0, cache_clips: int = 4):
        if num_frames < 1:
            raise ValueError("num_frames must be at least 1")
        self.reader = CorpusReader(root)
        self.split = split
        self.num_frames = num_frames
        self.audio_context = audio_context
        self.seed = seed
        self.clip_ids = self.reader.clip_ids(split)
        stride = stride or num_frames
        self.windows: list[tuple[int, int]] = []
        for clip_index, clip_id in enumerate(self.clip_ids):
            length = self.reader.entry(clip_id)["num_frames"]
            for start in range(0, length - num_frames + 1, stride):
                self.windows.append((clip_index, start))
        self._load = lru_cache(maxsize=cache_clips)(self._load_clip)

    def keep_all_decoded(self) -> None:
        self._load = lru_cache(maxsize=None)(self._load_clip)

    def decoded_bytes(self) -> int:
        """Memory the split's frames take once decoded (uint8 RGB at the corpus size)."""
        size = self.reader.size
        return sum(self.reader.entry(c)["num_frames"] for c in self.clip_ids) * size * size * 3

    def oversampled(self, factors: dict[str, int]) -> list[int]:
        """Window indices in which each window of an identity with trait t (`face.IDENTITY_TRAITS`) appears
        factors[t] times (the largest factor among its traits), the others once."""
        unknown = sorted(set(factors) - set(IDENTITY_TRAITS))
        if unknown:
            raise ValueError(f"cannot oversample {', '.join(unknown)}: the traits are {', '.join(IDENTITY_TRAITS)}")
        repeats = []
        for clip_id in self.clip_ids:
            identity = self.reader.identity(self.reader.entry(clip_id)["identity"])
            repeats.append(max([f for t, f in factors.items() if t in identity.traits()], default=1))
        return [item for item, (clip_index, _) in enumerate(self.windows) for _ in range(repeats[clip_index])]

    def _load_clip(self, clip_index: int) -> ClipData:
        return self.reader.load(self.clip_ids[clip_index])

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, item: int) -> dict:
        clip_index, start = self.windows[item]
        clip = self._load(clip_index)
        stop = start + self.num_frames
        ctx = self.audio_context
        lo, hi = (start - ctx) * HOP, (stop + ctx) * HOP
        audio = np.zeros(hi - lo, np.float32)
        src_lo, src_hi = max(lo, 0), min(hi, len(clip.audio))
        audio[src_lo - lo: src_hi - lo] = clip.audio[src_lo:src_hi]
        rng = np.random.default_rng([self.seed, item])
        outside = np.concatenate([np.arange(0, start), np.arange(stop, len(clip.frames))])
        ref_index = int(rng.choice(outside)) if len(outside) else int(rng.integers(start, stop))
        params = clip.params[start:stop]
        box = [PARAM_COLUMNS.index(c) for c in ("box_x0", "box_y0", "box_x1", "box_y1")]
        return {
            "frames": torch.from_numpy(np.ascontiguousarray(clip.frames[start:stop])),
            "audio": torch.from_numpy(audio),
            "reference": torch.from_numpy(np.ascontiguousarray(clip.frames[ref_index])),
            "face_box": torch.from_numpy(np.ascontiguousarray(params[:, box])),
            "speed": torch.from_numpy(np.ascontiguousarray(params[:, PARAM_COLUMNS.index("speed")])),
            "mouth_open": torch.from_numpy(np.ascontiguousarray(params[:, PARAM_COLUMNS.index("mouth_open")])),
            "params": torch.from_numpy(np.ascontiguousarray(params)),
            "identity": torch.tensor(clip.identity_index, dtype=torch.int64),
            "clip_index": torch.tensor(clip_index, dtype=torch.int64),
        }
