"""The synthetic corpus: clip generation, the sharded on-disk format, the writer and the reader.

Layout of a corpus directory (see docs/corpus.md):
    index.json              corpus metadata, splits and one entry per clip (shard + byte ranges of its members)
    identities.json         the identity parameters, one per identity index
    shards/shard-00000.tar  plain tar files; per clip: <id>.mp4 (H.264 4:4:4, 25 fps), <id>.flac (16 kHz mono),
                            <id>.params.npy (float32 [F, len(PARAM_COLUMNS)]), <id>.json (text, voice, phonemes)
Every clip is a pure function of (seed, clip index), so the corpus is byte-for-byte reproducible.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from avatar.data.face import STATE_FIELDS, FaceRenderer, FaceState, Identity, identity_for, states_from_array
from avatar.data.motion import FPS, HOP, MOTION_FIELDS, SAMPLE_RATE, motion_track, rotation_speed
from avatar.data.visemes import MOUTH_FIELDS, PhonemeSpan, mouth_track

FORMAT_VERSION = 1
PARAM_COLUMNS: tuple[str, ...] = STATE_FIELDS + ("box_x0", "box_y0", "box_x1", "box_y1", "speed")
MOUTH_COLUMNS: tuple[int, ...] = tuple(PARAM_COLUMNS.index(name) for name in MOUTH_FIELDS)  # in MOUTH_FIELDS order
CLIPS_PER_SHARD = 64
HELDOUT_EVERY = 10  # identity i is held out when i % 10 == 9 (the last identity when there are fewer than 10)
SPLITS = ("train", "test")


def is_heldout_identity(index: int, num_identities: int) -> bool:
    if num_identities < HELDOUT_EVERY:
        return index == num_identities - 1 and num_identities > 1
    return index % HELDOUT_EVERY == HELDOUT_EVERY - 1


def heldout_identities(num_identities: int) -> list[int]:
    return [i for i in range(num_identities) if is_heldout_identity(i, num_identities)]


# ---- one clip ---------------------------------------------------------------------------------------------------

@dataclass
class ClipSpec:
    """What is needed to render a clip at any resolution: audio, per-frame oracle parameters, identity."""

    clip_id: str
    identity_index: int
    split: str
    audio: np.ndarray  # float32, exactly num_frames * HOP samples
    params: np.ndarray  # float32 [F, len(PARAM_COLUMNS)]
    meta: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.params.shape[0])

    def states(self) -> list[FaceState]:
        return states_from_array(self.params[:, : len(STATE_FIELDS)])

    def column(self, name: str) -> np.ndarray:
        return self.params[:, PARAM_COLUMNS.index(name)]


def _mix_background(rng: np.random.Generator, audio: np.ndarray) -> tuple[np.ndarray, dict]:
    """Noise or music under the voice at a random SNR (dB, measured over the voiced part)."""
    n = len(audio)
    kind = ["white", "pink", "hum", "music", "babble"][int(rng.integers(5))]
    t = np.arange(n) / SAMPLE_RATE
    if kind == "white":
        noise = rng.normal(0, 1, n)
    elif kind == "pink":
        spectrum = np.fft.rfft(rng.normal(0, 1, n))
        spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
        noise = np.fft.irfft(spectrum, n)
    elif kind == "hum":
        base = float(rng.choice([50.0, 60.0]))
        noise = sum(np.sin(2 * np.pi * base * k * t) / k for k in range(1, 8)) + rng.normal(0, 0.05, n)
    elif kind == "music":
        noise = np.zeros(n)
        beat = float(rng.uniform(0.35, 0.7))
        root = float(rng.uniform(110, 220))
        for start in np.arange(0, n / SAMPLE_RATE, beat):
            chord = root * 2 ** (np.array([0, 4, 7]) / 12 + int(rng.integers(-3, 4)) / 12)
            seg = (t >= start) & (t < start + beat)
            local = t[seg] - start
            envelope = np.exp(-local * 4)
            noise[seg] += sum(np.sign(np.sin(2 * np.pi * f * local)) * 0.3 + np.sin(2 * np.pi * f * local)
                              for f in chord) * envelope
    else:  # babble: many detuned voiced buzzes with syllable-rate amplitude modulation
        noise = np.zeros(n)
        for _ in range(6):
            f0 = float(rng.uniform(90, 260))
            mod = 0.5 + 0.5 * np.sin(2 * np.pi * float(rng.uniform(3, 6)) * t + float(rng.uniform(0, 6)))
            noise += np.sign(np.sin(2 * np.pi * f0 * t)) * mod * 0.2
    snr_db = float(rng.uniform(0.0, 20.0))
    voiced = np.abs(audio) > 0.01
    speech_power = float((audio[voiced] ** 2).mean()) if voiced.any() else 1e-4
    noise_power = float((noise ** 2).mean()) + 1e-12
    noise *= np.sqrt(speech_power / noise_power / 10 ** (snr_db / 10))
    return (audio + noise).astype(np.float32), {"kind": kind, "snr_db": round(snr_db, 2)}


def _compose_speech(rng: np.random.Generator, language: str, heldout: bool) -> tuple[np.ndarray, list, dict]:
    from avatar.data.speech import EspeakEngine, sample_voice, sentence_for_split

    engine = EspeakEngine.get()
    voice = sample_voice(rng, language)
    pieces: list[np.ndarray] = []
    spans: list[PhonemeSpan] = []
    texts: list[str] = []
    cursor = 0
    lead = int(rng.uniform(0.1, 0.8) * SAMPLE_RATE)
    pieces.append(np.zeros(lead, np.float32))
    cursor += lead
    for k in range(int(rng.integers(1, 4))):
        if k:
            pause = int(rng.uniform(0.15, 1.5) * SAMPLE_RATE)
            pieces.append(np.zeros(pause, np.float32))
            cursor += pause
        text = sentence_for_split(rng, language, heldout)
        utterance = engine.synthesize(text, voice)
        offset = cursor / SAMPLE_RATE
        spans += [PhonemeSpan(p.name, p.start + offset, p.end + offset) for p in utterance.phonemes]
        pieces.append(utterance.audio)
        cursor += len(utterance.audio)
        texts.append(text)
    pieces.append(np.zeros(int(rng.uniform(0.2, 1.0) * SAMPLE_RATE), np.float32))
    meta = {"kind": "speech", "language": language, "texts": texts,
            "voice": {"name": voice.name, "rate": voice.rate, "pitch": voice.pitch, "range": voice.range}}
    return np.concatenate(pieces), spans, meta


def make_clip(seed: int, clip_index: int, num_identities: int, size: int | None = None,
              force_split: str | None = None) -> tuple[ClipSpec, np.ndarray | None]:
    """Generate clip number `clip_index` of the corpus with this seed; also render frames if `size` is given."""
    from avatar.data.singing import synthesize_song
    from avatar.data.speech import LANGUAGES

    rng = np.random.default_rng([seed, 0xC11, clip_index])
    identity_index = clip_index % num_identities
    heldout = is_heldout_identity(identity_index, num_identities) if force_split is None else force_split == "test"
    split = "test" if heldout else "train"
    roll = rng.random()
    if roll < 0.15 and not heldout:
        audio, spans = synthesize_song(rng, float(rng.uniform(3.0, 9.0)))
        lead = np.zeros(int(rng.uniform(0.1, 0.5) * SAMPLE_RATE), np.float32)
        offset = len(lead) / SAMPLE_RATE
        spans = [PhonemeSpan(p.name, p.start + offset, p.end + offset) for p in spans]
        audio = np.concatenate([lead, audio, lead])
        meta: dict = {"kind": "singing"}
    elif roll < 0.19 and not heldout:
        audio = np.zeros(int(rng.uniform(2.0, 5.0) * SAMPLE_RATE), np.float32)
        spans = []
        meta = {"kind": "silence"}
    else:
        # English is the majority language; held-out clips are English so held-out sentences are comparable.
        language = "en" if heldout else str(LANGUAGES[int(rng.integers(len(LANGUAGES)))])
        if not heldout and rng.random() < 0.45:
            language = ("en", "en-us")[int(rng.integers(2))]
        audio, spans, meta = _compose_speech(rng, language, heldout)
    if rng.random() < 0.3 and not heldout:
        audio, meta["mix"] = _mix_background(rng, audio)
    peak = float(np.abs(audio).max())
    if peak > 0.95:
        audio = audio * (0.95 / peak)
    num_frames = max(int(round(len(audio) * FPS / SAMPLE_RATE)), 1)
    audio = np.pad(audio, (0, max(num_frames * HOP - len(audio), 0)))[: num_frames * HOP].astype(np.float32)

    mouth = mouth_track(spans, num_frames)
    motion = motion_track(audio, num_frames, rng, liveliness=float(rng.uniform(0.5, 1.3)))
    columns = dict(zip(MOUTH_FIELDS, mouth.T))
    columns.update(zip(MOTION_FIELDS, motion.T))
    states = np.stack([columns[name] for name in STATE_FIELDS], axis=1).astype(np.float32)
    identity = identity_for(seed, identity_index)
    renderer = FaceRenderer(identity, size or 64)
    boxes = np.array([renderer.face_box(s) for s in states_from_array(states)], dtype=np.float32)
    speed = rotation_speed(columns["yaw"], columns["pitch"], columns["roll"])
    params = np.concatenate([states, boxes, speed[:, None]], axis=1).astype(np.float32)
    meta["phonemes"] = [[p.name, round(p.start, 4), round(p.end, 4)] for p in spans]
    clip = ClipSpec(f"c{clip_index:07d}", identity_index, split, audio, params, meta)
    frames = None
    if size:
        frames = np.empty((num_frames, size, size, 3), np.uint8)
        for i, state in enumerate(clip.states()):
            frames[i] = renderer.render(state)
    return clip, frames


# ---- codecs -----------------------------------------------------------------------------------------------------

def encode_video(frames: np.ndarray, crf: int = 18) -> bytes:
    """H.264 (High 4:4:4, single-threaded so the bytes are reproducible) in MP4 at 25 fps."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv444p"
        stream.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
        stream.codec_context.thread_count = 1
        for index, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts = index
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def decode_video(source: bytes | str | os.PathLike) -> np.ndarray:
    """All frames of a video as uint8 [F, H, W, 3]."""
    import av

    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    with av.open(handle) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("the video has no frames")
    return np.stack(frames)


def encode_flac(audio: np.ndarray) -> bytes:
    import av

    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=SAMPLE_RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def decode_flac(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as container:
        chunks = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
    return (np.concatenate(chunks).astype(np.float32) / 32767.0) if chunks else np.zeros(0, np.float32)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


# ---- writer -----------------------------------------------------------------------------------------------------

def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a unique temporary file beside `path`, then rename it over `path`; nothing is left on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _tar_shard(members: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A reproducible tar (fixed mtime/owner) and the (offset, size) of each member's data."""
    buffer = io.BytesIO()
    offsets: dict[str, tuple[int, int]] = {}
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
            offsets[name] = (buffer.tell() - ((len(data) + 511) // 512) * 512, len(data))
    return buffer.getvalue(), offsets


def _clip_job(job: tuple[int, int, int, int]) -> tuple[ClipSpec, list[tuple[str, bytes]]]:
    seed, clip_index, num_identities, size = job
    clip, frames = make_clip(seed, clip_index, num_identities, size)
    assert frames is not None
    meta = dict(clip.meta, id=clip.clip_id, identity=clip.identity_index, split=clip.split,
                num_frames=clip.num_frames)
    members = [
        (f"{clip.clip_id}.mp4", encode_video(frames)),
        (f"{clip.clip_id}.flac", encode_flac(clip.audio)),
        (f"{clip.clip_id}.params.npy", _npy_bytes(clip.params)),
        (f"{clip.clip_id}.json", json.dumps(meta, sort_keys=True).encode()),
    ]
    return clip, members


def write_corpus(out: str | os.PathLike, identities: int, hours: float, seed: int, size: int = 128,
                 workers: int = 1, log: Callable[[str], None] | None = None, only_split: str | None = None) -> dict:
    """Write a corpus of about `hours` of clips; returns the index. Deterministic for a given seed, except that
    libx264 rarely (about one clip in a few hundred) encodes a clip's video a little differently.

    `only_split="test"` skips every training clip (used for the small built-in evaluation set).
    """
    if only_split == "test" and not heldout_identities(identities):
        raise ValueError("a test-only corpus needs at least 2 identities (one is held out)")
    root = Path(out)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    target_frames = int(round(hours * 3600 * FPS))
    entries: list[dict] = []
    shard_members: list[tuple[str, bytes]] = []
    shard_clips: list[dict] = []
    total_frames = 0
    total_bytes = 0
    started = time.perf_counter()
    last_report = started

    def flush_shard() -> None:
        nonlocal total_bytes
        if not shard_clips:
            return
        name = f"shards/shard-{len(entries) // CLIPS_PER_SHARD:05d}.tar"  # every earlier shard is full
        data, offsets = _tar_shard(shard_members)
        atomic_write(root / name, data)
        total_bytes += len(data)
        for clip in shard_clips:
            clip["shard"] = name
            clip["members"] = {kind: list(offsets[f"{clip['id']}{suffix}"]) for kind, suffix in
                               (("video", ".mp4"), ("audio", ".flac"), ("params", ".params.npy"), ("meta", ".json"))}
            entries.append(clip)
        shard_members.clear()
        shard_clips.clear()

    def jobs() -> Iterator[tuple[int, int, int, int]]:
        index = 0
        while True:
            split = "test" if is_heldout_identity(index % identities, identities) else "train"
            if only_split is None or split == only_split:
                yield seed, index, identities, size
            index += 1

    pool = None
    if workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(workers)
        results = pool.imap(_clip_job, jobs(), chunksize=1)
    else:
        results = map(_clip_job, jobs())
    try:
        for clip, members in results:
            if total_frames >= target_frames:
                break
            shard_members.extend(members)
            shard_clips.append({"id": clip.clip_id, "identity": clip.identity_index, "split": clip.split,
                                "num_frames": clip.num_frames, "kind": clip.meta["kind"]})
            total_frames += clip.num_frames
            if len(shard_clips) == CLIPS_PER_SHARD:
                flush_shard()
            now = time.perf_counter()
            if now - last_report > 5.0 or total_frames >= target_frames:
                last_report = now
                done = min(total_frames / max(target_frames, 1), 1.0)
                elapsed = now - started
                eta = elapsed / max(done, 1e-9) - elapsed
                log(f"corpus: {total_frames / FPS / 60:.1f}/{target_frames / FPS / 60:.1f} min "
                    f"({done:.0%}), {len(entries) + len(shard_clips)} clips, {elapsed:.0f}s elapsed, "
                    f"~{eta:.0f}s left")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    flush_shard()

    identity_params = [identity_for(seed, i).to_dict() for i in range(identities)]
    atomic_write(root / "identities.json", json.dumps(identity_params, sort_keys=True, indent=1).encode())
    splits = {name: [e["id"] for e in entries if e["split"] == name] for name in SPLITS}
    index = {
        "format": "emote-corpus", "version": FORMAT_VERSION, "seed": seed, "size": size, "fps": FPS,
        "sample_rate": SAMPLE_RATE, "num_identities": identities, "heldout_identities": heldout_identities(identities),
        "heldout_sentence_rule": "sha256(lower(text))[0] % 8 == 0", "param_columns": list(PARAM_COLUMNS),
        "total_frames": total_frames, "total_bytes": total_bytes, "splits": splits, "clips": entries,
    }
    atomic_write(root / "index.json", json.dumps(index, sort_keys=True, indent=1).encode())
    return index


# ---- reader -----------------------------------------------------------------------------------------------------

@dataclass
class ClipData:
    clip_id: str
    identity_index: int
    split: str
    frames: np.ndarray  # uint8 [F, H, W, 3]
    audio: np.ndarray  # float32 [F * 640]
    params: np.ndarray  # float32 [F, len(PARAM_COLUMNS)]
    meta: dict

    def column(self, name: str) -> np.ndarray:
        return self.params[:, PARAM_COLUMNS.index(name)]


class CorpusReader:
    """Random access to a corpus directory written by `write_corpus`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        index_path = self.root / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.root} is not an emote corpus (no index.json)")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != "emote-corpus" or self.index.get("version") != FORMAT_VERSION:
            raise ValueError(f"{self.root}: unsupported corpus format")
        self._clips = {entry["id"]: entry for entry in self.index["clips"]}
        self._identities: list[dict] | None = None

    @property
    def splits(self) -> dict[str, list[str]]:
        return self.index["splits"]

    @property
    def size(self) -> int:
        return int(self.index["size"])

    def clip_ids(self, split: str | None = None) -> list[str]:
        if split is None:
            return list(self._clips)
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; the corpus has {sorted(self.splits)}")
        return list(self.splits[split])

    def entry(self, clip_id: str) -> dict:
        if clip_id not in self._clips:
            raise KeyError(f"no clip {clip_id!r} in {self.root}")
        return self._clips[clip_id]

    def identity(self, index: int) -> Identity:
        if self._identities is None:
            self._identities = json.loads((self.root / "identities.json").read_text())
        return Identity.from_dict(self._identities[index])

    def _member(self, clip_id: str, kind: str) -> bytes:
        entry = self.entry(clip_id)
        offset, length = entry["members"][kind]
        with open(self.root / entry["shard"], "rb") as handle:
            handle.seek(offset)
            return handle.read(length)

    def params(self, clip_id: str) -> np.ndarray:
        return np.load(io.BytesIO(self._member(clip_id, "params")), allow_pickle=False)

    def audio(self, clip_id: str) -> np.ndarray:
        return decode_flac(self._member(clip_id, "audio"))

    def meta(self, clip_id: str) -> dict:
        return json.loads(self._member(clip_id, "meta"))

    def frames(self, clip_id: str) -> np.ndarray:
        return decode_video(self._member(clip_id, "video"))

    def spec(self, clip_id: str) -> ClipSpec:
        """Everything but the frames: enough to re-render the clip at any resolution."""
        entry = self.entry(clip_id)
        return ClipSpec(clip_id, entry["identity"], entry["split"], self.audio(clip_id), self.params(clip_id),
                        self.meta(clip_id))

    def load(self, clip_id: str) -> ClipData:
        entry = self.entry(clip_id)
        return ClipData(clip_id, entry["identity"], entry["split"], self.frames(clip_id), self.audio(clip_id),
                        self.params(clip_id), self.meta(clip_id))


def __getattr__(name: str):
    # The torch dataset lives in its own module so the writer and the CLI do not import torch.
    if name == "ClipWindowDataset":
        from avatar.data.dataset import ClipWindowDataset

        return ClipWindowDataset
    raise AttributeError(name)
