"""Integer codes to the uint32 words ``mx.quantize`` writes and ``mx.dequantize`` reads."""

import numpy as np

BLOCK_CODES = 1 << 20  # codes packed at a time (8 bytes each while they are packed)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``codes`` (rows, cols; each in 0 .. 2**bits - 1) packed as MLX packs them: each
    row a little-endian bit stream, code ``i`` in bits ``i*bits .. (i+1)*bits - 1``
    (for 2, 4 and 8 bits that is whole codes per word; 3, 5 and 6 span words)."""
    rows, cols = codes.shape
    if (cols * bits) % 32:
        raise ValueError(f"{cols} columns of {bits}-bit codes do not fill whole 32-bit words")
    out, step = np.empty((rows, cols * bits // 32), dtype=np.uint32), max(1, BLOCK_CODES // cols)
    for r in range(0, rows, step):  # 32 codes fill ``bits`` words
        groups = codes[r : r + step].reshape(-1, cols // 32, 32).astype(np.uint64)
        words = np.zeros((*groups.shape[:2], bits), np.uint64)
        for i, (word, shift) in enumerate(_places(bits)):
            value = groups[..., i] << np.uint64(shift)
            words[..., word] |= value & np.uint64(0xFFFFFFFF)
            if shift + bits > 32:
                words[..., word + 1] |= value >> np.uint64(32)
        out[r : r + step] = words.reshape(groups.shape[0], -1)
    return out


def unpack_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of ``pack_codes``: ``words`` (rows, cols * bits / 32; uint32) as
    ``codes`` (rows, cols; uint8)."""
    rows, count = words.shape
    cols = count * 32 // bits
    out, step = np.empty((rows, cols // 32, 32), dtype=np.uint8), max(1, BLOCK_CODES // cols)
    mask = np.uint64((1 << bits) - 1)
    for r in range(0, rows, step):
        block = words[r : r + step].reshape(-1, cols // 32, bits).astype(np.uint64)
        for i, (word, shift) in enumerate(_places(bits)):
            value = block[..., word] >> np.uint64(shift)
            if shift + bits > 32:
                value |= block[..., word + 1] << np.uint64(32 - shift)
            out[r : r + step, :, i] = value & mask
    return out.reshape(rows, cols)


def _places(bits: int) -> list[tuple[int, int]]:
    """``(word, shift)`` of each of 32 consecutive codes in their ``bits`` words."""
    return [divmod(i * bits, 32) for i in range(32)]
