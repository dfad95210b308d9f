"""The watermark's fixed patterns and the payload code.

The mark is one TILE x TILE tile repeated over the frame. Its band of rfft bins is dealt into PATTERNS disjoint
groups, each a unit-magnitude, pseudo-random-phase noise pattern (so the patterns are orthogonal). Pattern 0 (the
reference) sits at shift 0; pattern j >= 1 is cyclically shifted by an offset that carries SHIFT_BITS of the coded
payload. The detector finds every pattern's peak by correlation; the offsets between peaks are what a crop cannot
change. All of a pattern's energy goes into one peak, which is what makes the mark survive codecs at 40 dB.

The seed is public by design (anyone can check a file), so the mark can also be studied and stripped: it is a
signal of good faith, not proof (docs/watermark.md).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

TILE = 128  # pixels; a crop of the frame is a cyclic shift of the folded tile
BAND = (4.0, 30.0)  # radial band in cycles per tile: periods of 4.3-32 px, which VP8/H.264 and a 2x resize keep
SHIFT_BITS = 14  # log2(TILE * TILE): one pattern's cyclic offset
DATA_PATTERNS = 3
PATTERNS = 1 + DATA_PATTERNS
PAYLOAD_BITS = 32
CRC_BITS = DATA_PATTERNS * SHIFT_BITS - PAYLOAD_BITS  # 10
CRC_POLY = 0x233  # CRC-10 (ATM)
SEED = 0x454D4F54  # "EMOT"


@lru_cache(maxsize=1)
def layout() -> tuple[np.ndarray, np.ndarray]:
    """(group, phase): int16 (TILE, TILE//2+1) pattern index per rfft bin (-1 outside the band) and complex64 unit
    phasors (zero outside the band)."""
    rng = np.random.default_rng(SEED)
    fy = np.fft.fftfreq(TILE, 1.0 / TILE)[:, None]
    fx = np.fft.rfftfreq(TILE, 1.0 / TILE)[None, :]
    radius = np.hypot(fy, fx)
    # Columns 0 and TILE/2 of an rfft hold their own conjugates; leaving them out keeps every used bin independent.
    in_band = (radius >= BAND[0]) & (radius <= BAND[1]) & (fx > 0) & (fx < TILE // 2)
    index = np.flatnonzero(in_band.ravel())
    group = np.full(in_band.size, -1, np.int16)
    group[index[rng.permutation(len(index))]] = np.arange(len(index)) % PATTERNS
    phase = np.zeros(in_band.size, np.complex64)
    phase[index] = np.exp(2j * np.pi * rng.random(len(index)))
    return group.reshape(in_band.shape), phase.reshape(in_band.shape)


def shift_phasor(dy: int, dx: int) -> np.ndarray:
    """rfft2-domain factor that cyclically shifts a tile by (dy, dx)."""
    fy = np.fft.fftfreq(TILE, 1.0 / TILE)[:, None]
    fx = np.fft.rfftfreq(TILE, 1.0 / TILE)[None, :]
    return np.exp(-2j * np.pi * (fy * dy + fx * dx) / TILE)


def crc(bits: np.ndarray) -> np.ndarray:
    """CRC-10 of a 0/1 bit array, as CRC_BITS bits, most significant first."""
    register, top = 0, 1 << (CRC_BITS - 1)
    for bit in bits.astype(np.uint8):
        feedback = bool(register & top) ^ bool(bit)
        register = ((register << 1) & ((1 << CRC_BITS) - 1)) ^ (CRC_POLY & ((1 << CRC_BITS) - 1) if feedback else 0)
    return np.array([(register >> (CRC_BITS - 1 - i)) & 1 for i in range(CRC_BITS)], np.uint8)


def payload_offsets(payload: bytes) -> list[tuple[int, int]]:
    """4 payload bytes -> the (dy, dx) offset of each data pattern (payload bits then CRC, SHIFT_BITS each)."""
    if len(payload) != PAYLOAD_BITS // 8:
        raise ValueError(f"the payload must be {PAYLOAD_BITS // 8} bytes, got {len(payload)}")
    bits = np.unpackbits(np.frombuffer(payload, np.uint8))
    coded = np.concatenate([bits, crc(bits)])
    offsets = []
    for j in range(DATA_PATTERNS):
        value = int("".join(map(str, coded[j * SHIFT_BITS:(j + 1) * SHIFT_BITS])), 2)
        offsets.append(divmod(value, TILE))
    return offsets


def offsets_payload(offsets: list[tuple[int, int]]) -> bytes | None:
    """The inverse of payload_offsets; None when the CRC does not match."""
    coded = np.concatenate([np.array([int(b) for b in format(dy * TILE + dx, f"0{SHIFT_BITS}b")], np.uint8)
                            for dy, dx in offsets])
    data, check = coded[:PAYLOAD_BITS], coded[PAYLOAD_BITS:]
    if not np.array_equal(crc(data), check):
        return None
    return np.packbits(data).tobytes()


def tile(payload: bytes) -> np.ndarray:
    """The spatial tile for a payload: float32 (TILE, TILE), unit RMS."""
    group, phase = layout()
    spectrum = np.where(group == 0, phase, 0)
    for j, (dy, dx) in enumerate(payload_offsets(payload), start=1):
        spectrum = spectrum + np.where(group == j, phase, 0) * shift_phasor(dy, dx)
    pattern = np.fft.irfft2(spectrum, s=(TILE, TILE))
    return (pattern / pattern.std()).astype(np.float32)
