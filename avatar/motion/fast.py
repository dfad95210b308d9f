"""The backbone's forward pass in NumPy, for live inference on one CPU thread.

A window is ~10 tokens of width 128: PyTorch spends ~20x longer dispatching its ~80 small ops than computing them,
while NumPy's per-op overhead is a few microseconds. Same weights, same maths (exact GELU, float32), equal to the
PyTorch forward to float rounding (tested). Built from a snapshot of the weights: rebuild after changing them.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from avatar.motion.backbone import MotionBackbone


def _blas_thread_setter():
    """NumPy's bundled OpenBLAS `openblas_set_num_threads_local` (None if absent): these matrices are far too small
    for a thread team, which costs ~4x on a busy machine, and the setting is per calling thread only."""
    import ctypes
    import glob
    import os

    libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs, "*openblas*.so*"))):
        try:
            setter = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
        return setter
    return None


_SET_BLAS_THREADS = _blas_thread_setter()


def _gelu(x: np.ndarray) -> np.ndarray:
    return (0.5 * x * (1.0 + erf(x * np.float32(1 / math.sqrt(2))))).astype(np.float32)


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    inv = np.float32(1.0 / x.shape[-1])
    centred = x - np.add.reduce(x, axis=-1, keepdims=True) * inv  # np.add.reduce: np.mean's wrapper costs more
    var = np.add.reduce(centred * centred, axis=-1, keepdims=True) * inv
    return centred / np.sqrt(var + np.float32(eps)) * weight + bias


class FastBackbone:
    def __init__(self, model: MotionBackbone):
        self.config = model.config
        w = {name: value.detach().cpu().numpy().astype(np.float32) for name, value in model.state_dict().items()}
        self.w = w
        self.width, self.heads = int(model.config.width), int(model.config.heads)
        self.layers = int(model.config.layers)
        self.eps = [(layer.norm1.eps, layer.norm2.eps) for layer in model.blocks.layers]
        self.out_eps = model.norm_out.eps
        half = self.width // 2
        self.freqs = np.exp(-math.log(1000.0) * np.arange(half, dtype=np.float32) / half).astype(np.float32)
        self.t_cache: dict[float, np.ndarray] = {}
        # Transposed weights once, so each matmul is x @ W.
        self.T = {name: value.T.copy() for name, value in w.items() if name.endswith("weight") and value.ndim == 2}
        for i in range(self.layers):  # the attention's packed projection, under the names `_lin` looks up
            p = f"blocks.layers.{i}.self_attn"
            self.T[f"{p}.in_proj.weight"] = self.T[f"{p}.in_proj_weight"]
            w[f"{p}.in_proj.bias"] = w[f"{p}.in_proj_bias"]

    def _lin(self, x: np.ndarray, name: str) -> np.ndarray:
        # 2-D matmuls: NumPy sends stacked (3-D @ 2-D) products through a slow generic loop
        flat = x.reshape(-1, x.shape[-1]) @ self.T[f"{name}.weight"]
        flat += self.w[f"{name}.bias"]
        return flat.reshape(*x.shape[:-1], flat.shape[-1])

    def _time(self, t: float) -> np.ndarray:
        if t not in self.t_cache:
            angles = np.float32(t) * np.float32(1000.0) * self.freqs
            emb = np.concatenate([np.cos(angles), np.sin(angles)])[None].astype(np.float32)
            self.t_cache[t] = self._lin(_gelu(self._lin(emb, "time_in.0")), "time_in.2")[0]
        return self.t_cache[t]

    def __call__(self, noisy: np.ndarray, t: np.ndarray, audio: np.ndarray, reference: np.ndarray,
                 previous: np.ndarray | None, speaking: np.ndarray, previous_keep: np.ndarray | None = None,
                 sound: np.ndarray | None = None) -> np.ndarray:
        """The same arguments as `MotionBackbone.forward` (NumPy, audio kept); `sound`: a precomputed audio MLP
        output for these frames (it does not change between sampler steps)."""
        if _SET_BLAS_THREADS is not None:
            _SET_BLAS_THREADS(1)
        w, width, m = self.w, self.width, int(self.config.motion_frames)
        batch, frames, _ = noisy.shape
        cond = np.stack([self._time(float(v)) for v in t]) + self._lin(reference, "reference_in")
        if sound is None:
            sound = self.audio_features(audio)
        x = self._lin(noisy, "motion_in") + sound + w["speaking.weight"][speaking.astype(np.int64)]
        if previous is None:
            prev = np.broadcast_to(w["previous_missing"], (batch, m, width))
        else:
            prev = self._lin(previous, "previous_in")
            if previous_keep is not None:
                prev = np.where(previous_keep[:, None, None], prev, w["previous_missing"])
        h = np.concatenate([prev, x], axis=1)
        h = h + w["position"][: h.shape[1]] + cond[:, None]
        length, heads = h.shape[1], self.heads
        dim = width // heads
        scale = np.float32(1 / math.sqrt(dim))
        for i in range(self.layers):
            p = f"blocks.layers.{i}"
            eps1, eps2 = self.eps[i]
            y = _layer_norm(h, w[f"{p}.norm1.weight"], w[f"{p}.norm1.bias"], eps1)
            qkv = self._lin(y, f"{p}.self_attn.in_proj")
            qkv = qkv.reshape(batch, length, 3, heads, dim).transpose(2, 0, 3, 1, 4)
            scores = (qkv[0] * scale) @ qkv[1].transpose(0, 1, 3, 2)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            attn = (scores / scores.sum(axis=-1, keepdims=True)) @ qkv[2]
            attn = attn.transpose(0, 2, 1, 3).reshape(batch, length, width)
            h = h + self._lin(attn, f"{p}.self_attn.out_proj")
            y = _layer_norm(h, w[f"{p}.norm2.weight"], w[f"{p}.norm2.bias"], eps2)
            h = h + self._lin(_gelu(self._lin(y, f"{p}.linear1")), f"{p}.linear2")
        h = _layer_norm(h[:, m:], w["norm_out.weight"], w["norm_out.bias"], self.out_eps)
        return self._lin(h, "out").astype(np.float32)

    def audio_features(self, audio: np.ndarray) -> np.ndarray:
        if _SET_BLAS_THREADS is not None:
            _SET_BLAS_THREADS(1)
        batch, frames = audio.shape[:2]
        x = audio.reshape(batch, frames, -1)
        depth = int(getattr(self.config, "audio_depth", 1))
        for i in range(depth):
            x = _gelu(self._lin(x, f"audio_in.{2 * i}"))
        return self._lin(x, f"audio_in.{2 * depth}")
