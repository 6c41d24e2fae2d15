"""Lossless coders by name: ``none``, ``zstd-L`` (levels 1-22), ``lz4`` and ``lz4hc-L``
(LZ4 blocks, levels 1-12 for the high-compression mode), and, for comparison only,
the standard library's ``zlib-L`` and ``lzma-L``.

Each codec compresses one chunk at a time; the raw size of a chunk is stored beside it
(the container does), so decompression is told how many bytes to expect: every decoder
stops after that many bytes plus one (a zstd frame's own content size is checked before
anything is allocated), so a damaged or hostile chunk fails instead of producing the
wrong length or filling memory. Containers accept only ``is_container_codec`` names.
"""

import lzma
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass


class CorruptData(Exception):
    """A chunk that its codec cannot decode, or decodes to the wrong size."""


@dataclass(frozen=True)
class Codec:
    name: str
    compress: Callable[[bytes], bytes]
    _decompress: Callable[[bytes, int], bytes]

    def decompress(self, data: bytes, raw_size: int) -> bytes:
        try:
            raw = self._decompress(data, raw_size)
        except CorruptData:
            raise
        except Exception as e:  # each library raises its own kinds on damaged input
            raise CorruptData(f"{self.name} cannot decode a chunk: {e}") from None
        if len(raw) != raw_size:
            raise CorruptData(f"{self.name} decoded {len(raw)} bytes, the index says {raw_size}")
        return raw


_local = threading.local()  # zstd contexts are not thread-safe: one per thread and level


def _zstd_compressor(level: int):
    import zstandard

    key = f"zc{level}"
    if not hasattr(_local, key):
        setattr(_local, key, zstandard.ZstdCompressor(level=level))
    return getattr(_local, key)


def _zstd_decompressor():
    import zstandard

    if not hasattr(_local, "zd"):
        _local.zd = zstandard.ZstdDecompressor()
    return _local.zd


def _zstd_decode(data: bytes, size: int) -> bytes:
    import zstandard

    declared = zstandard.frame_content_size(data)
    if declared >= 0 and declared != size:  # decompress() would allocate what the frame declares
        raise CorruptData(f"the zstd frame declares {declared} bytes, the index says {size}")
    with _zstd_decompressor().stream_reader(data) as reader:
        return reader.read(size + 1)


def _bounded(decompressor, data: bytes, size: int) -> bytes:
    """At most ``size + 1`` bytes of a zlib/lzma stream (enough to tell it is too long)."""
    return decompressor.decompress(data, size + 1)


def is_container_codec(name: str) -> bool:
    """The codecs a container may name: ``none``, ``zstd-L``, ``lz4``, ``lz4hc-L``."""
    kind = name.partition("-")[0]
    if name != "none" and kind not in ("zstd", "lz4", "lz4hc"):
        return False
    try:
        codec(name)
    except ValueError:
        return False
    return True


def codec(name: str) -> Codec:
    kind, _, arg = name.partition("-")
    if name == "none":
        return Codec(name, bytes, lambda data, size: bytes(data))
    if kind == "lz4" and not arg:
        import lz4.block

        return Codec(name, lambda d: lz4.block.compress(d, store_size=False),
                     lambda d, size: lz4.block.decompress(d, uncompressed_size=size))
    level = _level(name, arg)
    if kind == "zstd" and 1 <= level <= 22:
        return Codec(name, lambda d: _zstd_compressor(level).compress(d),
                     _zstd_decode)
    if kind == "lz4hc" and 1 <= level <= 12:
        import lz4.block

        return Codec(name, lambda d: lz4.block.compress(d, mode="high_compression", compression=level, store_size=False),
                     lambda d, size: lz4.block.decompress(d, uncompressed_size=size))
    if kind == "zlib" and 1 <= level <= 9:
        return Codec(name, lambda d: zlib.compress(d, level), lambda d, size: _bounded(zlib.decompressobj(), d, size))
    if kind == "lzma" and 0 <= level <= 9:
        return Codec(name, lambda d: lzma.compress(d, preset=level),
                     lambda d, size: _bounded(lzma.LZMADecompressor(), d, size))
    raise ValueError(f"unknown codec '{name}'")


def _level(name: str, arg: str) -> int:
    if not arg.isdigit():
        raise ValueError(f"unknown codec '{name}'")
    return int(arg)
