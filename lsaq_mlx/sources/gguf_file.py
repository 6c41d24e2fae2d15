"""Opening a GGUF file: metadata as plain Python values, tensors dequantized to numpy."""

from pathlib import Path

import numpy as np

from lsaq_mlx.errors import UserError


def open_gguf(path: Path):
    """A ``gguf.GGUFReader`` on ``path``; a damaged file is a one-line ``UserError``."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    try:
        reader = GGUFReader(path)
        _check_tensor_extents(reader, path)
    except UserError:
        raise
    except Exception as e:  # the reader raises many kinds on damaged input
        raise UserError(f"{path} is not a readable GGUF file (truncated or corrupt): {e}") from None
    return reader


def _check_tensor_extents(reader, path: Path) -> None:
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise UserError(f"{path} is truncated: tensor {t.name} runs past the end of the file")


def gguf_metadata(reader) -> dict:
    """All key/value fields: strings, numbers, bools, and lists of them."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as e:  # a field whose declared type does not fit its bytes
            raise UserError(f"the GGUF field {key[:80]} is unreadable ({type(e).__name__})") from None
    return meta


def dequantized_tensor(tensor) -> np.ndarray:
    """A GGUF tensor as float32 (float types keep their values exactly), in
    row-major order with numpy's shape (GGUF lists dimensions innermost first)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = np.asarray(tensor.data)
        else:
            data = dequantize(np.asarray(tensor.data), tensor.tensor_type)
        return data.astype(np.float32, copy=False).reshape(shape)
    except (NotImplementedError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"GGUF tensor {tensor.name} cannot be read ({type(e).__name__}: {str(e)[:120]})") from None
