"""The lsaq-mlx container: a file of named byte records, each cut into chunks, each
chunk reordered by a transform and compressed by a codec, with the SHA-256 of every
record's raw bytes. Model packs and the layer store are containers.

Layout (integers little-endian)::

    0          magic b"LSAQPACK" (8 bytes), format version (uint32)
    12         the chunks' compressed payloads, back to back
    I          the index: UTF-8 JSON, L bytes
    end - 56   trailer: I (uint64), L (uint64), SHA-256 of the index (32 bytes), b"LSAQEND!"

The index::

    {"format": "lsaq-mlx container", "version": 1, "meta": {...},
     "records": [{"name": str, "size": raw bytes, "sha256": of the raw bytes,
                  "transform": "shuffle:2" | ..., "codec": "zstd-3" | ...,
                  "chunks": [[offset, stored bytes, transformed bytes], ...], "meta": {...}}]}

Writing is streaming (one chunk in memory at a time) and the index goes last, so a
truncated file has no trailer. Reading checks the trailer, the index's hash and the
whole index before anything is decoded: every field's type, names unique and bounded,
codecs from the allow-list, each chunk inside the payload and no larger than
``MAX_CHUNK_BYTES`` decoded, and the chunks' decoded sizes adding up to the record's.
So decoding never holds more than one declared chunk and each record's declared size;
each record's hash is checked after. A damaged or hostile file raises a one-line
``UserError``, never returns wrong bytes.
"""

import hashlib
import json
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from lsaq_mlx.errors import UserError
from lsaq_mlx.storage import transforms
from lsaq_mlx.storage.ahead import computed_ahead
from lsaq_mlx.storage.codecs import CorruptData, codec, is_container_codec
from lsaq_mlx.documents import parse_json

MAGIC = b"LSAQPACK"
END = b"LSAQEND!"
VERSION = 1
HEADER = struct.Struct("<8sI")
TRAILER = struct.Struct("<QQ32s8s")
CHUNK_BYTES = 1 << 22  # raw bytes per chunk: bounds memory, lets chunks decode in parallel
MAX_INDEX_BYTES = 1 << 30
MAX_CHUNK_BYTES = 4 * CHUNK_BYTES  # a transformed chunk (``codes`` spreads codes up to 8/5x)
MAX_RECORD_NAME = 2048


def chunks_of(data: bytes, unit: int = 1, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """``data`` in pieces of about ``size`` bytes, each a multiple of ``unit``."""
    step = max(unit, size // unit * unit)
    view = memoryview(data)
    for start in range(0, len(data), step):
        yield bytes(view[start : start + step])


def file_chunks(f, offset: int, length: int, unit: int = 1, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """``length`` bytes of the open file ``f`` from ``offset``, in pieces as ``chunks_of``."""
    step = max(unit, size // unit * unit)
    f.seek(offset)
    left = length
    while left > 0:
        piece = f.read(min(step, left))
        if not piece:
            raise UserError(f"{f.name} ended early while being read")
        left -= len(piece)
        yield piece


class ContainerWriter:
    """Write records to an open binary file; ``finish`` writes the index and trailer."""

    def __init__(self, f):
        self.f = f
        self.records: list[dict] = []
        self.names: set[str] = set()
        f.write(HEADER.pack(MAGIC, VERSION))

    def add(self, name: str, pieces: Iterable[bytes], transform: str = "none", codec_name: str = "zstd-3",
            meta: dict | None = None) -> dict:
        """Append a record whose raw bytes are ``pieces`` joined; every piece but the last
        must be a multiple of the transform's unit (``chunks_of`` cuts them so)."""
        if name in self.names:
            raise ValueError(f"duplicate record name {name!r}")
        if not is_container_codec(codec_name):
            raise ValueError(f"codec {codec_name!r} is not one a container may use")
        coder, sha, size, chunks = codec(codec_name), hashlib.sha256(), 0, []
        unit = transforms.unit_bytes(transform)
        for piece in pieces:
            if not piece:
                continue
            sha.update(piece)
            size += len(piece)
            if len(piece) % unit:
                raise ValueError(f"record {name!r}: {len(piece)} bytes do not fit transform {transform}")
            moved = transforms.forward(transform, piece)
            if len(moved) > MAX_CHUNK_BYTES:
                raise ValueError(f"record {name!r}: a piece of {len(piece)} bytes is larger than a chunk")
            stored = coder.compress(moved)
            chunks.append([self.f.tell(), len(stored), len(moved)])
            self.f.write(stored)
        record = {"name": name, "size": size, "sha256": sha.hexdigest(), "transform": transform,
                  "codec": codec_name, "chunks": chunks, "meta": meta or {}}
        self.records.append(record)
        self.names.add(name)
        return record

    def finish(self, meta: dict | None = None) -> int:
        """Write the index and the trailer; return the file's size."""
        index = json.dumps({"format": "lsaq-mlx container", "version": VERSION, "meta": meta or {},
                            "records": self.records}, separators=(",", ":")).encode()
        offset = self.f.tell()
        self.f.write(index)
        self.f.write(TRAILER.pack(offset, len(index), hashlib.sha256(index).digest(), END))
        self.f.flush()
        return self.f.tell()


class ContainerReader:
    """Random access to the records of a container; every read is checked."""

    def __init__(self, path: Path, what: str = "container"):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{what} not found: {self.path}")
        self.bytes_read = 0  # stored (compressed) bytes read from the file
        self._count = threading.Lock()
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.meta, self.records = self._read_index(what)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            self.close()

    def _fail(self, problem: str):
        return UserError(f"{self.path} is {problem}")

    def _read_index(self, what: str) -> tuple[dict, dict]:
        size = os.fstat(self._fd).st_size
        if size < HEADER.size:
            raise self._fail(f"not an lsaq-mlx {what}: too short ({size} bytes)")
        magic, version = HEADER.unpack(os.pread(self._fd, HEADER.size, 0))
        if magic != MAGIC:
            raise self._fail(f"not an lsaq-mlx {what} (no LSAQPACK header)")
        if version > VERSION:
            raise self._fail(f"a format version {version} {what}; this lsaq-mlx reads version {VERSION}: upgrade it")
        if size < HEADER.size + TRAILER.size:
            raise self._fail(f"truncated: {size} bytes, shorter than a header and trailer")
        offset, length, digest, end = TRAILER.unpack(os.pread(self._fd, TRAILER.size, size - TRAILER.size))
        if end != END:
            raise self._fail("truncated or corrupt: its end marker is missing")
        if offset < HEADER.size or length > MAX_INDEX_BYTES or offset + length != size - TRAILER.size:
            raise self._fail("corrupt: its trailer points outside the file")
        index = os.pread(self._fd, length, offset)
        if hashlib.sha256(index).digest() != digest:
            raise self._fail("corrupt: its index fails its SHA-256 check")
        try:
            data = parse_json(index, "its index")
            if not isinstance(data, dict) or not isinstance(data.get("records"), list):
                raise ValueError("no record list")
            meta = data.get("meta", {})
            if not isinstance(meta, dict):
                raise ValueError("its meta is not an object")
            records = {}
            for r in data["records"]:
                _check_record(r, offset)
                if r["name"] in records:
                    raise ValueError(f"two records named {r['name']!r}")
                records[r["name"]] = r
        except (ValueError, KeyError, TypeError, UserError) as e:
            raise self._fail(f"corrupt: its index is unreadable ({e})") from None
        return meta, records

    def record(self, name: str) -> dict:
        if name not in self.records:
            raise self._fail(f"missing record {name!r}")
        return self.records[name]

    def stored_bytes(self, name: str) -> int:
        return sum(stored for _, stored, _ in self.record(name)["chunks"])

    def iter_raw(self, name: str) -> Iterator[bytes]:
        """The record's raw bytes chunk by chunk; raises at the end when the hash fails,
        so a caller that writes chunks must discard what it wrote on error."""
        record = self.record(name)
        sha, size = hashlib.sha256(), 0
        for chunk in record["chunks"]:
            raw = self._decode_chunk(record, chunk)
            sha.update(raw)
            size += len(raw)
            yield raw
        self._check(record, sha, size)

    def read(self, name: str) -> bytes:
        return b"".join(self.iter_raw(name))

    def read_many(self, names: list[str], workers: int | None = None) -> Iterator[tuple[str, bytes]]:
        """``(name, raw bytes)`` for ``names`` in order, decoded by a pool of threads
        (zstd, hashing and numpy release the GIL)."""
        yield from zip(names, computed_ahead(self.read, names, workers))

    def _decode_chunk(self, record: dict, chunk: list) -> bytes:
        offset, stored, moved = chunk
        data = os.pread(self._fd, stored, offset)
        with self._count:
            self.bytes_read += len(data)
        if len(data) != stored:
            raise self._fail(f"truncated: record {record['name']!r} runs past the end")
        try:
            raw = codec(record["codec"]).decompress(data, moved)
            return transforms.inverse(record["transform"], raw)
        except (CorruptData, ValueError) as e:
            raise self._fail(f"corrupt: record {record['name']!r} cannot be decoded ({e})") from None

    def _check(self, record: dict, sha, size: int) -> None:
        if size != record["size"] or sha.hexdigest() != record["sha256"]:
            raise self._fail(f"corrupt: record {record['name']!r} fails its SHA-256 check")


def _check_record(r, payload_end: int) -> None:
    """Raise ValueError unless index entry ``r`` is well formed, its codec allowed, its
    chunks inside the payload and bounded, and their decoded sizes add up to its size
    (the index hash guards against damage, this against hostile writers)."""
    if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not 0 < len(r["name"]) <= MAX_RECORD_NAME:
        raise ValueError("a record without a usable name")
    name = r["name"]
    if not _is_int(r.get("size")) or not isinstance(r.get("sha256"), str) or len(r["sha256"]) != 64:
        raise ValueError(f"record {name!r} is malformed")
    if not isinstance(r.get("meta"), dict) or not isinstance(r.get("chunks"), list):
        raise ValueError(f"record {name!r} is malformed")
    if not isinstance(r.get("transform"), str) or not isinstance(r.get("codec"), str):
        raise ValueError(f"record {name!r} is malformed")
    transforms.parse(r["transform"])
    if not is_container_codec(r["codec"]):
        raise ValueError(f"record {name!r} names codec {r['codec'][:40]!r}, which containers do not use")
    total = 0
    for chunk in r["chunks"]:
        if not isinstance(chunk, list) or len(chunk) != 3 or not all(_is_int(v) for v in chunk):
            raise ValueError(f"a chunk of {name!r} is malformed")
        chunk_offset, stored, moved = chunk
        if chunk_offset < HEADER.size or chunk_offset + stored > payload_end:
            raise ValueError(f"a chunk of {name!r} lies outside the payload")
        if moved > MAX_CHUNK_BYTES:
            raise ValueError(f"a chunk of {name!r} declares {moved} bytes, more than a chunk holds")
        total += transforms.raw_size(r["transform"], moved)
    if total != r["size"]:
        raise ValueError(f"the chunks of {name!r} decode to {total} bytes, the record says {r['size']}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
