"""A source's tensors by name, each read from disk only when asked for: the way every
stage reads weights one layer (or one module) at a time instead of the whole model."""

import math
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from lsaq_mlx.backend.hybrid import exact_dequantize
from lsaq_mlx.formats import safetensors_header

# dtypes whose rows ``SourceTensors.rows`` reads straight from the file (float weights,
# quantized codes)
_ROW_DTYPES = {"F16": (np.float16, None), "F32": (np.float32, None), "BF16": (np.uint16, mx.bfloat16),
               "U32": (np.uint32, None), "U8": (np.uint8, None)}


class SourceTensors:
    """The tensors of a model folder's ``model*.safetensors`` files (as mlx-lm loads them)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.bytes_read = 0  # bytes of the tensors handed out (safetensors stores them as they are)
        self.files: dict[str, str] = {}
        self._shapes: dict[str, tuple[list[int], str]] = {}
        self._offsets: dict[str, int] = {}  # where each tensor's bytes begin in its file
        for file in sorted(self.folder.glob("model*.safetensors")):
            with open(file, "rb") as f:
                data_start = 8 + struct.unpack("<Q", f.read(8))[0]
            for name, info in safetensors_header(file).items():  # checked: offsets lie inside the file
                if name != "__metadata__":
                    self.files[name] = file.name
                    self._shapes[name] = (info["shape"], info["dtype"])
                    self._offsets[name] = data_start + info["data_offsets"][0]

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def shape_of(self, name: str) -> tuple[list[int], str]:
        """``(shape, safetensors dtype)`` of a tensor, from its file's header."""
        return self._shapes[name]

    def get(self, name: str) -> mx.array | None:
        """The tensor, unread until evaluated (a fresh array each time, so nothing stays
        in memory once the caller drops it)."""
        if name not in self.files:
            return None
        array = mx.load(str(self.folder / self.files[name]))[name]
        self.bytes_read += array.nbytes
        return array

    def rows(self, name: str, start: int, stop: int) -> mx.array:
        """Rows ``start:stop`` (along the first axis) of a float matrix or a stack of
        matrices (a layer's experts, their codes or scales), read from its file alone: a
        row block of an embedding or LM head, or a block of experts, without the whole
        tensor in memory."""
        shape, dtype = self._shapes[name]
        if len(shape) < 2 or dtype not in _ROW_DTYPES or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"cannot read rows {start}:{stop} of {name} ({dtype} {shape})")
        stored, view = _ROW_DTYPES[dtype]
        row_bytes = math.prod(shape[1:]) * np.dtype(stored).itemsize
        with open(self.folder / self.files[name], "rb") as f:
            f.seek(self._offsets[name] + start * row_bytes)
            data = np.frombuffer(f.read((stop - start) * row_bytes), dtype=stored).reshape(stop - start, *shape[1:])
        self.bytes_read += data.nbytes
        array = mx.array(data)
        return array.view(view) if view is not None else array


class DequantizedTensors:
    """The tensors of a quantized model (mlx-lm's affine layout) with every quantized
    weight handed out dequantized, in float32: what a plan below the stored precision is
    quantized from when there is no float source."""

    def __init__(self, tensors, config: dict):
        self.tensors, self.folder = tensors, getattr(tensors, "folder", None)
        self.quantization = config.get("quantization") or {}
        self._stored: set[str] | None = None  # the stored tensors' names, read once

    @property
    def bytes_read(self) -> int:
        return self.tensors.bytes_read

    @property
    def names(self) -> list[str]:
        return self.tensors.names

    def stored_as(self, path: str, choice) -> dict | None:
        """``{param: array}`` of the module at ``path`` as stored, when it is stored at
        ``choice`` (its codes handed out unchanged), else None."""
        if self._stored is None:
            self._stored = set(self.tensors.names)
        q = stored_quantization(self.quantization, path) if f"{path}.scales" in self._stored else {}
        stored = {"bits": q.get("bits"), "group_size": q.get("group_size"), "mode": q.get("mode", "affine")}
        if stored != choice.config():
            return None
        arrays = {p: self.tensors.get(f"{path}.{p}") for p in ("weight", "scales", "biases", "bias")}
        return {p: a for p, a in arrays.items() if a is not None}

    def stored_rows(self, name: str):
        """``rows(block)``: rows ``block`` (a slice) of the quantized weight ``name``,
        dequantized from those rows of its codes alone (no float copy of the whole
        matrix); None where ``name`` is not a quantized weight read by rows."""
        path, _, param = name.rpartition(".")
        files = getattr(self.tensors, "files", {})
        if param != "weight" or not hasattr(self.tensors, "rows") or name not in files or f"{path}.scales" not in files:
            return None
        q, count = stored_quantization(self.quantization, path), self.tensors.shape_of(name)[0][0]
        has_biases = f"{path}.biases" in files

        def rows(block: slice) -> mx.array:
            start, stop = block.start or 0, count if block.stop is None else min(count, block.stop)
            read = lambda p: self.tensors.rows(f"{path}.{p}", start, stop)  # noqa: E731
            return exact_dequantize(read("weight"), read("scales"), read("biases") if has_biases else None,
                                    q["group_size"], q["bits"], q.get("mode", "affine"))

        return rows

    def get(self, name: str) -> mx.array | None:
        path, _, param = name.rpartition(".")
        scales = self.tensors.get(f"{path}.scales") if param == "weight" else None
        if scales is None:
            return self.tensors.get(name)
        q = stored_quantization(self.quantization, path)
        biases = self.tensors.get(f"{path}.biases")
        return exact_dequantize(self.tensors.get(name), scales, biases, q["group_size"], q["bits"],
                                q.get("mode", "affine"))


def stored_bits(tensors, config: dict) -> dict[str, int]:
    """``{path: bits}`` of every module a quantized model stores quantized ({} for a float one)."""
    return {p: q["bits"] for p, q in stored_settings(tensors, config).items()}


def stored_settings(tensors, config: dict) -> dict[str, dict]:
    """``{path: {"bits", "group_size", ...}}`` of every module stored quantized."""
    quantization = config.get("quantization") or {}
    if not quantization:
        return {}
    paths = [n.removesuffix(".scales") for n in tensors.names if n.endswith(".scales")]
    return {p: stored_quantization(quantization, p) for p in paths}


def stored_quantization(quantization: dict, path: str) -> dict:
    """The ``{"bits", "group_size", ...}`` config.json gives the module at ``path``."""
    entry = quantization.get(path)
    return entry if isinstance(entry, dict) else quantization


def source_tensors(source):
    """The lazily read tensors of a resolved model: its folder's, or its pack's."""
    if source.kind == "pack":
        from lsaq_mlx.storage.model_pack import PackedWeights

        return PackedWeights(source.origin)
    return SourceTensors(source.path)
