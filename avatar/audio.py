"""Audio encoders behind one interface: 16 kHz mono waveform -> one feature vector per 25 fps video frame.

Frame n covers samples [640 n, 640 (n + 1)). `lookahead_samples` says how much audio past the end of frame n its
feature depends on: that is the encoder's contribution to audio-to-lip latency, and what a streaming encoder must
wait for. `encode` is the offline path; the streaming engine builds its incremental encoder on the same modules.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers.audio_utils import mel_filter_bank

from .config import AUDIO_SAMPLE_RATE, SAMPLES_PER_FRAME, ModelConfig
from .errors import CheckpointError


class CausalLogMel(nn.Module):
    """Log-mel spectrogram with causal framing: mel frame k ends at sample (k + 1) * hop."""

    def __init__(self, n_mels: int, n_fft: int = 400, hop: int = 160, sample_rate: int = AUDIO_SAMPLE_RATE):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        bank = mel_filter_bank(n_fft // 2 + 1, n_mels, 40.0, sample_rate / 2, sample_rate, norm="slaney", mel_scale="slaney")
        self.register_buffer("filters", torch.from_numpy(bank.astype(np.float32)), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """wave (B, T) with T a multiple of hop, already preceded by n_fft - hop samples of history -> (B, mels, K)."""
        spec = torch.stft(wave, self.n_fft, self.hop, window=self.window, center=False, return_complex=True)
        power = spec.real.square() + spec.imag.square()
        mel = torch.einsum("bfk,fm->bmk", power, self.filters)
        return torch.log(mel + 1e-6)


class CausalConvStack(nn.Module):
    """Dilated causal 1-D convolutions with residual connections over mel frames."""

    def __init__(self, in_channels: int, hidden: int, layers: int):
        super().__init__()
        self.conv_in = nn.Conv1d(in_channels, hidden, 3)
        self.convs = nn.ModuleList(nn.Conv1d(hidden, hidden, 3, dilation=2**i) for i in range(layers))

    @property
    def receptive_field(self) -> int:
        return 3 + sum(2 * 2**i for i in range(len(self.convs)))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv_in(F.pad(mel, (2, 0))))
        for conv in self.convs:
            x = x + F.gelu(conv(F.pad(x, (2 * conv.dilation[0], 0))))
        return x


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run tiny per-block ops on one intra-op thread: waking a thread team costs more than the op (~10x on a busy
    machine). For offline use only: switching the thread count while another thread runs the model stalls it."""
    previous = torch.get_num_threads()
    if previous != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if previous != 1:
            torch.set_num_threads(previous)


@dataclass(frozen=True)
class MelStreamState:
    """What `MelAudioEncoder.encode_block` carries between blocks; replaced, never mutated, so it can be snapshotted.

    samples: (B, n_fft - hop) raw audio preceding the next block (zeros at the start, like the offline left pad).
    conv:    per convolution (conv_in first), its last (kernel - 1) * dilation inputs.
    hops:    mel frames computed so far.
    """

    samples: torch.Tensor
    conv: tuple[torch.Tensor, ...]
    hops: int


class MelAudioEncoder(ModelMixin, ConfigMixin):
    """Log-mel plus a small causal convolutional net with a fixed lookahead, trained from scratch."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, n_mels: int = 40, hidden: int = 64, layers: int = 3, feature_dim: int = 64, lookahead: int = 2):
        super().__init__()
        self.mel = CausalLogMel(n_mels)
        self.mel_norm = nn.BatchNorm1d(n_mels, affine=False)  # learned running stats of log-mel, frozen at eval
        self.net = CausalConvStack(n_mels, hidden, layers)
        self.out = nn.Sequential(nn.Linear(hidden, feature_dim), nn.LayerNorm(feature_dim))

    @property
    def hops_per_frame(self) -> int:
        return SAMPLES_PER_FRAME // self.mel.hop

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def lookahead_samples(self) -> int:
        return self.config.lookahead * self.mel.hop

    def frame_features(self, mel: torch.Tensor, frames: int) -> torch.Tensor:
        """mel (B, mels, K) starting at mel frame 0 -> features of the first `frames` video frames."""
        hidden = self.net(self.mel_norm(mel))  # (B, hidden, K)
        # Video frame n reads the causal net at the last mel frame it may see: its own 4 hops plus the lookahead.
        index = torch.arange(frames, device=mel.device) * self.hops_per_frame + self.hops_per_frame - 1 + self.config.lookahead
        return self.out(hidden[:, :, index].transpose(1, 2))

    # ---- block-wise encoding, shared by `encode` and the streaming encoder so both give identical features --------

    def initial_state(self, batch: int = 1, device: torch.device | str | None = None) -> MelStreamState:
        hidden = self.config.hidden
        zeros = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        conv = [zeros(batch, self.config.n_mels, 2)] + [zeros(batch, hidden, 2 * c.dilation[0]) for c in self.net.convs]
        return MelStreamState(samples=zeros(batch, self.mel.n_fft - self.mel.hop), conv=tuple(conv), hops=0)

    def block_hops(self, hops_done: int) -> int:
        """Size in mel hops of the block that starts after `hops_done` hops. Blocks end exactly where a video frame's
        feature (at mel frame 4n + 3 + lookahead) becomes computable, so each block yields at most one feature."""
        first = self.config.lookahead % self.hops_per_frame
        return first if hops_done == 0 and first else self.hops_per_frame

    def encode_block(self, state: MelStreamState, wave: torch.Tensor) -> tuple[torch.Tensor, MelStreamState]:
        """One block of `block_hops(state.hops) * hop` new samples (B, S) -> (features (B, 0 or 1, D), next state)."""
        x = torch.cat([state.samples, wave], dim=-1)
        norm = self.mel_norm(self.mel(x))  # (B, mels, k)
        k = norm.shape[-1]
        inp = torch.cat([state.conv[0], norm], dim=-1)
        history = [inp[..., inp.shape[-1] - state.conv[0].shape[-1] :]]
        h = F.gelu(self.net.conv_in(inp))
        for conv, past in zip(self.net.convs, state.conv[1:]):
            inp = torch.cat([past, h], dim=-1)
            history.append(inp[..., inp.shape[-1] - past.shape[-1] :])
            h = h + F.gelu(conv(inp))
        last = state.hops + k - 1  # frame n's feature sits at mel frame 4n + 3 + lookahead: is `last` one of those?
        offset = last - (self.hops_per_frame - 1) - self.config.lookahead
        hits = [k - 1] if offset >= 0 and offset % self.hops_per_frame == 0 else []
        features = self.out(h[:, :, hits].transpose(1, 2))
        samples = x[..., x.shape[-1] - state.samples.shape[-1] :]
        return features, MelStreamState(samples=samples, conv=tuple(history), hops=state.hops + k)

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """wave (B, T) -> (B, T // 640, feature_dim). The lookahead past the end reads zeros (silence).

        Runs block by block (one video frame per block) through `encode_block`, so the streaming encoder, which
        calls the same function on the same spans, reproduces these features bit for bit."""
        frames = wave.shape[-1] // SAMPLES_PER_FRAME
        wave = F.pad(wave[:, : frames * SAMPLES_PER_FRAME], (0, self.lookahead_samples))
        state = self.initial_state(wave.shape[0], wave.device)
        pieces = [torch.zeros(wave.shape[0], 0, self.feature_dim, device=wave.device)]
        start = 0
        with single_threaded():
            while start < wave.shape[-1]:
                size = self.block_hops(state.hops) * self.mel.hop
                features, state = self.encode_block(state, wave[:, start : start + size])
                pieces.append(features)
                start += size
        return torch.cat(pieces, dim=1)[:, :frames]


class Wav2Vec2AudioEncoder(nn.Module):
    """transformers Wav2Vec2Model from a local directory; several hidden layers concatenated per video frame.

    wav2vec2 runs at 50 Hz; two of its frames are averaged per 25 fps video frame. Long audio is encoded in chunks
    with context on both sides, so memory stays bounded.
    """

    config_file = "emote_audio_encoder.json"

    def __init__(self, model, layers: tuple[int, ...], chunk_seconds: float = 10.0, context_seconds: float = 1.0):
        super().__init__()
        self.model = model
        self.layers = tuple(layers) or (model.config.num_hidden_layers,)
        self.chunk = int(chunk_seconds * AUDIO_SAMPLE_RATE) // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME
        self.context = int(context_seconds * AUDIO_SAMPLE_RATE) // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME

    @classmethod
    def from_pretrained(cls, path: str | Path, layers: tuple[int, ...] | None = None) -> "Wav2Vec2AudioEncoder":
        from transformers import Wav2Vec2Model

        path = Path(path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"wav2vec2 directory {path} has no config.json")
        if layers is None and (path / cls.config_file).is_file():
            layers = tuple(json.loads((path / cls.config_file).read_text())["layers"])
        try:
            model = Wav2Vec2Model.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot load wav2vec2 from {path}: {exc}") from exc
        return cls(model.eval(), layers or ())

    @classmethod
    def randomly_initialised(cls, cfg: ModelConfig) -> "Wav2Vec2AudioEncoder":
        """wav2vec2 of the size `cfg` expects, with random weights: for benchmarks only."""
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        layers = cfg.wav2vec2_layers or (12,)
        hidden, remainder = divmod(cfg.audio_feature_dim, len(layers))
        if remainder:
            raise CheckpointError(f"audio_feature_dim {cfg.audio_feature_dim} is not {len(layers)} wav2vec2 layers "
                                  "of one width")
        config = Wav2Vec2Config(hidden_size=hidden, num_hidden_layers=max(layers), intermediate_size=4 * hidden,
                                num_attention_heads=max(1, hidden // 64),
                                num_conv_pos_embedding_groups=math.gcd(16, hidden))
        return cls(Wav2Vec2Model(config).eval(), layers)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.model.save_pretrained(path)
        (path / self.config_file).write_text(json.dumps({"layers": list(self.layers)}) + "\n")

    @property
    def feature_dim(self) -> int:
        return self.model.config.hidden_size * len(self.layers)

    @property
    def lookahead_samples(self) -> int:
        return self.context

    def _encode_span(self, wave: torch.Tensor) -> torch.Tensor:
        wave = (wave - wave.mean(-1, keepdim=True)) / (wave.std(-1, keepdim=True) + 1e-7)
        out = self.model(wave, output_hidden_states=True)
        features = torch.cat([out.hidden_states[i] for i in self.layers], dim=-1)  # (B, ~T/320, D)
        frames = wave.shape[-1] // SAMPLES_PER_FRAME
        return F.interpolate(features.transpose(1, 2), size=frames, mode="linear", align_corners=False).transpose(1, 2)

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        frames = wave.shape[-1] // SAMPLES_PER_FRAME
        wave = wave[:, : frames * SAMPLES_PER_FRAME]
        pieces = []
        for start in range(0, wave.shape[-1], self.chunk):
            lo, hi = max(0, start - self.context), min(wave.shape[-1], start + self.chunk + self.context)
            features = self._encode_span(wave[:, lo:hi])
            skip = (start - lo) // SAMPLES_PER_FRAME
            keep = (min(start + self.chunk, wave.shape[-1]) - start) // SAMPLES_PER_FRAME
            pieces.append(features[:, skip : skip + keep])
        return torch.cat(pieces, dim=1)


AudioEncoder = MelAudioEncoder | Wav2Vec2AudioEncoder


def mel_encoder_kwargs(cfg: ModelConfig) -> dict:
    return dict(
        n_mels=cfg.mel_bins,
        hidden=cfg.mel_hidden_channels,
        layers=cfg.mel_layers,
        feature_dim=cfg.audio_feature_dim,
        lookahead=cfg.mel_lookahead,
    )


def window_features(features: torch.Tensor, context: int) -> torch.Tensor:
    """(B, N, D) per-frame features -> (B, N, 2 context + 1, D): frames t-context..t+context, edges repeated."""
    n = features.shape[1]
    padded = torch.cat(
        [features[:, :1].expand(-1, context, -1), features, features[:, -1:].expand(-1, context, -1)], dim=1
    )
    return torch.stack([padded[:, k : k + n] for k in range(2 * context + 1)], dim=2)
