"""Reversible reorderings of a tensor's bytes that make them easier to compress.

A transform is named by a string, ``"<kind>"`` or ``"<kind>:<n>"``, and maps bytes to
bytes, exactly invertibly (all keep the length but ``codes``, which spreads b bits to 8):

- ``none``: the bytes as they are;
- ``shuffle:n``: byte transposition of n-byte elements (all first bytes, then all second
  bytes, ...): the exponent bytes of float16 scales gather in one run;
- ``delta:2``: differences of consecutive 16-bit words (modulo 2^16), then ``shuffle:2``:
  for smooth float16 tensors;
- ``codes:b``: MLX packs b-bit codes as a little-endian bit stream (b bytes hold 8 codes),
  so for 3, 5, 6 and 7 bits codes straddle bytes and a byte-wise entropy coder sees
  noise. This regroups them so none straddles: two 3-bit codes per byte, one 5- to 7-bit
  code per byte (longer output; the coder removes the slack). 1, 2, 4 and 8 bits are
  already aligned and stay as they are;
- ``bitplanes:b``: the b-bit codes as b bit planes, least significant first.

A transform works on whole units (``unit_bytes``): a buffer is cut into chunks at
multiples of it.
"""

import math

import numpy as np


def parse(name: str) -> tuple[str, int]:
    kind, _, arg = name.partition(":")
    if kind not in _FORWARD or (kind != "none") != bool(arg) or (arg and not arg.isdigit()):
        raise ValueError(f"unknown transform '{name}'")
    n = int(arg) if arg else 1
    if kind in ("codes", "bitplanes") and not 1 <= n <= 8:
        raise ValueError(f"transform '{name}': codes have 1 to 8 bits")
    if kind == "delta" and n != 2:
        raise ValueError(f"transform '{name}': only 16-bit deltas are defined")
    if n < 1:
        raise ValueError(f"transform '{name}': the element size must be positive")
    return kind, n


def unit_bytes(name: str) -> int:
    """Buffers given to ``forward`` must be a multiple of this many bytes."""
    _, n = parse(name)
    return n  # shuffle/delta: one element; codes/bitplanes: b bytes hold 8 codes


def raw_size(name: str, transformed: int) -> int:
    """Bytes that ``inverse`` makes of ``transformed`` bytes (only ``codes`` changes it)."""
    kind, n = parse(name)
    if kind == "codes" and transformed % _inverse_unit(kind, n):
        raise ValueError(f"transform '{name}' cannot have produced {transformed} bytes")
    return transformed * n * (8 // n) // 8 if kind == "codes" else transformed


def _inverse_unit(kind: str, n: int) -> int:
    if kind == "codes" and 8 % n:
        return 8 // (8 // n)  # 8 codes in 8 // codes-per-byte bytes
    return n


def forward(name: str, data: bytes) -> bytes:
    kind, n = parse(name)
    if len(data) % n:
        raise ValueError(f"transform '{name}' needs a multiple of {n} bytes, got {len(data)}")
    return _FORWARD[kind](np.frombuffer(data, np.uint8), n).tobytes()


def inverse(name: str, data: bytes) -> bytes:
    kind, n = parse(name)
    if len(data) % _inverse_unit(kind, n):
        raise ValueError(f"transform '{name}' cannot have produced {len(data)} bytes")
    return _INVERSE[kind](np.frombuffer(data, np.uint8), n).tobytes()


def _shuffle(x: np.ndarray, n: int) -> np.ndarray:
    return x.reshape(-1, n).T


def _unshuffle(x: np.ndarray, n: int) -> np.ndarray:
    return x.reshape(n, -1).T


def _delta(x: np.ndarray, n: int) -> np.ndarray:
    words = x.view(np.uint16)
    return _shuffle(np.diff(words, prepend=np.uint16(0)).view(np.uint8), 2)


def _undelta(x: np.ndarray, n: int) -> np.ndarray:
    words = np.ascontiguousarray(_unshuffle(x, 2)).view(np.uint16)
    return np.cumsum(words, dtype=np.uint16).view(np.uint8)


def code_values(data: bytes, bits: int) -> np.ndarray:
    """The b-bit codes MLX packed in ``data``, one per byte."""
    return _split(np.frombuffer(data, np.uint8), bits)


def _split(x: np.ndarray, width: int) -> np.ndarray:
    """One byte per ``width``-bit field of the little-endian bit stream ``x``: runs of
    whole bytes are read as one machine word and cut with shifts."""
    if width == 8:
        return x
    fields = 8 // math.gcd(width, 8)
    run = fields * width // 8
    word = np.uint32 if run <= 4 else np.uint64
    words = np.zeros((x.size // run, np.dtype(word).itemsize), np.uint8)
    words[:, :run] = x.reshape(-1, run)
    words = words.view(word).ravel()
    out = np.empty((words.size, fields), np.uint8)
    mask = word((1 << width) - 1)
    for k in range(fields):
        out[:, k] = (words >> word(width * k)) & mask
    return out.ravel()


def _join(x: np.ndarray, width: int) -> np.ndarray:
    if width == 8:
        return x
    fields = 8 // math.gcd(width, 8)
    run = fields * width // 8
    word = np.uint32 if run <= 4 else np.uint64
    columns = x.reshape(-1, fields)
    words = columns[:, 0].astype(word)
    for k in range(1, fields):
        words |= columns[:, k].astype(word) << word(width * k)
    return words.view(np.uint8).reshape(words.size, -1)[:, :run]


def _codes(x: np.ndarray, bits: int) -> np.ndarray:
    # a field of 8 // bits whole codes, first code lowest: for 3 bits a pair in 6 bits
    return _split(x, bits * (8 // bits))


def _uncodes(x: np.ndarray, bits: int) -> np.ndarray:
    return _join(x, bits * (8 // bits))


def _bitplanes(x: np.ndarray, bits: int) -> np.ndarray:
    codes = _split(x, bits)
    return np.concatenate([np.packbits((codes >> j) & 1) for j in range(bits)])


def _unbitplanes(x: np.ndarray, bits: int) -> np.ndarray:
    planes = np.unpackbits(x).reshape(bits, -1)
    codes = np.zeros(planes.shape[1], np.uint8)
    for j in range(bits):
        codes |= planes[j] << j
    return _join(codes, bits)


_FORWARD = {"none": lambda x, n: x, "shuffle": _shuffle, "delta": _delta, "codes": _codes, "bitplanes": _bitplanes}
_INVERSE = {"none": lambda x, n: x, "shuffle": _unshuffle, "delta": _undelta, "codes": _uncodes, "bitplanes": _unbitplanes}
