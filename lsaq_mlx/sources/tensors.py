"""A source's tensors by name, each read from disk only when asked for: the way every
stage reads weights one layer (or one module) at a time instead of the whole model."""

from pathlib import Path

import mlx.core as mx

from lsaq_mlx.formats import safetensors_header


class SourceTensors:
    """The tensors of a model folder's ``model*.safetensors`` files (as mlx-lm loads them)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.bytes_read = 0  # bytes of the tensors handed out (safetensors stores them as they are)
        self.files: dict[str, str] = {}
        self._shapes: dict[str, tuple[list[int], str]] = {}
        for file in sorted(self.folder.glob("model*.safetensors")):
            for name, info in safetensors_header(file).items():
                if name != "__metadata__":
                    self.files[name] = file.name
                    self._shapes[name] = (info["shape"], info["dtype"])

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


def source_tensors(source):
    """The lazily read tensors of a resolved model: its folder's, or its pack's."""
    if source.kind == "pack":
        from lsaq_mlx.storage.model_pack import PackedWeights

        return PackedWeights(source.origin)
    return SourceTensors(source.path)
