"""Incremental audio encoders: push 16 kHz samples as they come, get each video frame's feature once computable.

- `StreamingMelEncoder` calls `MelAudioEncoder.encode_block` on exactly the spans the offline `encode` uses, so its
  features equal the offline ones bit for bit. A frame's feature is ready 320 samples (2 hops, 20 ms) after the
  frame's end.
- `StreamingWav2Vec2Encoder` re-encodes a span of left context plus lookahead around the new frames; it differs
  from offline encoding by an amount measured in tests/test_streaming_audio.py and documented in docs/streaming.md.

State is replaced, never mutated in place, so `snapshot()`/`restore()` are cheap (used to re-encode after barge-in).
"""
from __future__ import annotations

import torch

from avatar.audio import MelAudioEncoder, Wav2Vec2AudioEncoder
from avatar.config import SAMPLES_PER_FRAME
from avatar.frame_model import StreamingAudioEncoder


class StreamingMelEncoder:
    def __init__(self, encoder: MelAudioEncoder):
        self.encoder = encoder
        self.device = next(encoder.parameters(), torch.zeros(0)).device
        self.feature_dim = encoder.feature_dim
        self.lookahead_samples = encoder.lookahead_samples
        self._state = encoder.initial_state(1, self.device)
        self._pending = torch.zeros(0)
        self.frames_out = 0

    @torch.no_grad()
    def push(self, samples) -> torch.Tensor:
        """1-D float samples -> (n, D) features of the frames that became computable (n may be 0)."""
        pending = torch.cat([self._pending, torch.as_tensor(samples).reshape(-1).float().cpu()])
        out, start = [], 0
        # No single_threaded() here, unlike the offline `encode`: changing the thread count while the model thread
        # runs stalls it for seconds. The features still match offline bit for bit (tested).
        while True:
            size = self.encoder.block_hops(self._state.hops) * self.encoder.mel.hop
            if pending.numel() - start < size:
                break
            block = pending[start : start + size][None].to(self.device)
            features, self._state = self.encoder.encode_block(self._state, block)
            out.append(features[0].cpu())
            start += size
        self._pending = pending[start:]
        result = torch.cat(out) if out else torch.zeros(0, self.feature_dim)
        self.frames_out += result.shape[0]
        return result

    def snapshot(self) -> object:
        return (self._state, self._pending, self.frames_out)

    def restore(self, snapshot: object) -> None:
        self._state, self._pending, self.frames_out = snapshot


class StreamingWav2Vec2Encoder:
    """Frame n is computed from samples [640 n - context, 640 (n + 1) + lookahead), normalised over that span like
    the offline encoder's chunks; new frames are encoded together in one model call."""

    def __init__(self, encoder: Wav2Vec2AudioEncoder, context_seconds: float = 1.0, lookahead_frames: int = 2):
        self.encoder = encoder
        self.device = next(encoder.parameters()).device
        self.feature_dim = encoder.feature_dim
        self.context = int(context_seconds * 25) * SAMPLES_PER_FRAME
        self.lookahead_samples = lookahead_frames * SAMPLES_PER_FRAME
        self._buffer = torch.zeros(0)  # samples from absolute index self._base on
        self._base = 0
        self.frames_out = 0

    @torch.no_grad()
    def push(self, samples) -> torch.Tensor:
        self._buffer = torch.cat([self._buffer, torch.as_tensor(samples).reshape(-1).float().cpu()])
        total = self._base + self._buffer.numel()
        ready = max(0, (total - self.lookahead_samples) // SAMPLES_PER_FRAME - self.frames_out)
        if ready == 0:
            return torch.zeros(0, self.feature_dim)
        first = self.frames_out * SAMPLES_PER_FRAME
        lo = max(0, first - self.context)
        hi = (self.frames_out + ready) * SAMPLES_PER_FRAME + self.lookahead_samples
        span = self._buffer[lo - self._base : hi - self._base][None].to(self.device)
        features = self.encoder._encode_span(span)[0].cpu()
        skip = (first - lo) // SAMPLES_PER_FRAME
        result = features[skip : skip + ready]
        self.frames_out += ready
        keep_from = max(0, self.frames_out * SAMPLES_PER_FRAME - self.context)
        self._buffer = self._buffer[keep_from - self._base :]
        self._base = keep_from
        return result

    def snapshot(self) -> object:
        return (self._buffer, self._base, self.frames_out)

    def restore(self, snapshot: object) -> None:
        self._buffer, self._base, self.frames_out = snapshot


def streaming_encoder_for(encoder: torch.nn.Module, **wav2vec2_options) -> StreamingAudioEncoder:
    if isinstance(encoder, MelAudioEncoder):
        return StreamingMelEncoder(encoder)
    if isinstance(encoder, Wav2Vec2AudioEncoder):
        return StreamingWav2Vec2Encoder(encoder, **wav2vec2_options)
    raise TypeError(f"no streaming encoder for {type(encoder).__name__}")
