"""Integer codes to the uint32 words ``mx.quantize`` writes and ``mx.dequantize`` reads."""

import numpy as np

ROW_BLOCK = 1024  # rows packed at a time: the bit array takes rows x cols x bits bytes


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``codes`` (rows, cols; each in 0 .. 2**bits - 1) packed as MLX packs them: each
    row a little-endian bit stream, code ``i`` in bits ``i*bits .. (i+1)*bits - 1``
    (for 2, 4 and 8 bits that is whole codes per word; 3, 5 and 6 span words)."""
    rows, cols = codes.shape
    if (cols * bits) % 32:
        raise ValueError(f"{cols} columns of {bits}-bit codes do not fill whole 32-bit words")
    out = np.empty((rows, cols * bits // 32), dtype=np.uint32)
    shifts = np.arange(bits, dtype=np.uint8)
    for r in range(0, rows, ROW_BLOCK):
        block = codes[r : r + ROW_BLOCK].astype(np.uint8)
        stream = ((block[..., None] >> shifts) & 1).reshape(block.shape[0], -1)
        out[r : r + ROW_BLOCK] = np.packbits(stream, axis=1, bitorder="little").view("<u4")
    return out


def unpack_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of ``pack_codes``: ``words`` (rows, cols * bits / 32; uint32) as
    ``codes`` (rows, cols; uint8)."""
    rows, count = words.shape
    cols = count * 32 // bits
    out = np.empty((rows, cols), dtype=np.uint8)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    for r in range(0, rows, ROW_BLOCK):
        block = np.ascontiguousarray(words[r : r + ROW_BLOCK], dtype="<u4").view(np.uint8)
        stream = np.unpackbits(block, axis=1, bitorder="little").reshape(block.shape[0], cols, bits)
        out[r : r + ROW_BLOCK] = stream.astype(np.uint16) @ weights
    return out
