"""A model folder as one compressed container (``lsaq-mlx pack`` / ``unpack``).

Every file of the folder but hidden ones is kept byte for byte. A ``*.safetensors`` file
becomes its header record (the 8-byte length and the JSON, verbatim) and one record per
tensor in the order of the data (any bytes between tensors become records too), each
encoded by what it holds (``encoding_for``, measured by ``benchmarks/bench_storage.py``):
quantized codes regrouped so no code straddles a byte, float tensors byte-shuffled, all
zstd. Other files (config, tokenizer) are one record each.

The container's meta::

    {"kind": "lsaq-mlx model", "version": 1, "fingerprint": str,
     "files": [{"path": "model.safetensors", "size": int, "sha256": str,
                "records": [record names, in file order]}, ...]}

``fingerprint`` is what the writer computed as the folder's ``folder_fingerprint``; readers
never use it: ``PackedModel.content_fingerprint`` recomputes it from the decoded bytes,
so every cache keyed by the folder serves its pack and no pack can claim another
model's caches. Unpacking writes into a temporary folder beside the target, checks every
file's SHA-256, then renames it into place.
"""

import hashlib
import math
import os
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from lsaq_mlx.cache import atomic_dir, atomic_file, check_replaceable, model_fingerprint, stat_memo
from lsaq_mlx.errors import UserError
from lsaq_mlx.names import unique_member_paths
from lsaq_mlx.progress import progress_bar
from lsaq_mlx.formats import read_config, safetensors_header, weight_files
from lsaq_mlx.storage import transforms
from lsaq_mlx.storage.container import MAGIC, ContainerReader, ContainerWriter, file_chunks

PACK_KIND = "lsaq-mlx model"
PACK_VERSION = 1
# zstd-1 everywhere: on code bytes higher levels find spurious matches and lose ratio; on
# shuffled floats they gain nothing (benchmarks/bench_storage.py)
CODES_CODEC = "zstd-1"
FLOAT_CODEC = "zstd-1"
BLOB_CODEC = "zstd-9"  # headers, JSON and tokenizer files: small, compress well

DTYPES = {
    "F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32, "F64": mx.float64,
    "U8": mx.uint8, "U16": mx.uint16, "U32": mx.uint32, "U64": mx.uint64,
    "I8": mx.int8, "I16": mx.int16, "I32": mx.int32, "I64": mx.int64, "BOOL": mx.bool_,
}


def encoding_for(dtype: str, bits: int | None) -> tuple[str, str]:
    """``(transform, codec)`` for a tensor of safetensors ``dtype``; ``bits`` when it holds
    quantized codes."""
    if bits is not None and dtype == "U32":
        return f"codes:{bits}", CODES_CODEC
    if dtype in ("F16", "BF16"):
        return "shuffle:2", FLOAT_CODEC
    if dtype == "F32":
        return "shuffle:4", FLOAT_CODEC
    return "none", FLOAT_CODEC


def code_bits(config: dict, header: dict) -> dict[str, int]:
    """Tensor name -> bits of its codes, for the quantized weights of a safetensors file."""
    quantization = config.get("quantization") or {}
    bits = {}
    for name in header:
        path, _, param = name.rpartition(".")
        if param != "weight" or f"{path}.scales" not in header:
            continue
        choice = quantization.get(path, quantization)
        if isinstance(choice, dict) and isinstance(choice.get("bits"), int) and 1 <= choice["bits"] <= 8:
            bits[name] = choice["bits"]
    return bits


def folder_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` but hidden ones, in a stable order. A link to a file
    inside the folder is packed as that file's content; any other link is refused, so
    nothing outside the folder is ever read."""
    root, files = Path(folder).resolve(), []
    for here, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in [*dirs, *names]:
            path = Path(here) / name
            if name.startswith(".") or not path.is_symlink():
                continue
            target = path.resolve()
            if not target.is_relative_to(root) or not target.is_file():
                raise UserError(f"{path} is a link to {target}, outside the folder or not a file: pack a copy "
                                "without such links (cp -rL)")
        files += [Path(here) / n for n in names if not n.startswith(".")]
    return sorted(p for p in files if p.is_file())


@dataclass(frozen=True)
class PackReport:
    """What ``pack`` or ``unpack`` did: from where to where, how many files and bytes."""

    source: str  # the folder packed, or the pack unpacked
    out: str
    files: int
    raw_bytes: int  # the folder's
    packed_bytes: int  # the pack's
    seconds: float
    fingerprint: str  # the pack's content fingerprint

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.packed_bytes

    def to_dict(self) -> dict:
        return asdict(self) | {"ratio": self.ratio}


def pack_model(folder: Path, out: Path, force: bool = False) -> PackReport:
    """Write the model folder ``folder`` as a container at ``out``; return a report."""
    folder, out = Path(folder), Path(out)
    if not folder.exists():
        raise UserError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: pack takes a model folder (e.g. one written by convert)")
    config = read_config(folder)
    weight_files(folder)
    if out.exists() and not force:
        raise UserError(f"{out} already exists", setting="force")
    if out.is_dir():
        raise UserError(f"{out} is a folder; pack writes a file")
    if out.exists() and out.stat().st_size and not _is_container(out):
        raise UserError(f"{out} exists and is not a pack lsaq-mlx wrote: not replacing it")
    files = folder_files(folder)
    raw_bytes = sum(f.stat().st_size for f in files)
    start = time.perf_counter()
    entries = []
    with atomic_file(out) as tmp, open(tmp, "wb") as f, progress_bar(f"packing {folder.name} (MB)", raw_bytes / 1e6) as advance:
        writer = ContainerWriter(f)
        for path in files:
            name = path.relative_to(folder.resolve()).as_posix()
            sha = hashlib.sha256()
            if path.suffix == ".safetensors":
                records = _add_safetensors(writer, path, name, config, sha, advance)
            else:
                with open(path, "rb") as src:
                    writer.add(name, _hashed(file_chunks(src, 0, path.stat().st_size), sha, advance), "none", BLOB_CODEC)
                records = [name]
            entries.append({"path": name, "size": path.stat().st_size, "sha256": sha.hexdigest(), "records": records})
        meta = {"kind": PACK_KIND, "version": PACK_VERSION,
                "fingerprint": pack_fingerprint((folder / "config.json").read_bytes(), entries), "files": entries}
        size = writer.finish(meta)
    return PackReport(str(folder), str(out), len(entries), raw_bytes, size, time.perf_counter() - start,
                      meta["fingerprint"])


def default_pack_path(folder: Path) -> Path:
    folder = Path(folder).resolve()
    return folder.with_name(folder.name + ".lsaqpack")


def default_unpack_path(pack: Path) -> Path:
    pack = Path(pack)
    return pack.with_name(pack.stem if pack.suffix == ".lsaqpack" else pack.name + ".unpacked")


def _is_container(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _hashed(pieces, sha, advance):
    for piece in pieces:
        sha.update(piece)
        advance(len(piece) / 1e6)
        yield piece


def _add_safetensors(writer: ContainerWriter, path: Path, name: str, config: dict, sha, advance) -> list[str]:
    header = safetensors_header(path)
    size = path.stat().st_size
    bits = code_bits(config, header)
    spans = sorted((t["data_offsets"][0], t["data_offsets"][1], k, t) for k, t in header.items() if k != "__metadata__")
    records = []
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        base = 8 + n

        def add(record, offset, length, transform="none", codec_name=BLOB_CODEC, meta=None):
            pieces = file_chunks(f, offset, length, transforms.unit_bytes(transform))
            writer.add(record, _hashed(pieces, sha, advance), transform, codec_name, meta)
            records.append(record)

        add(f"{name}#header", 0, base)
        at = 0
        for begin, end, tensor, info in spans:
            if begin < at:
                raise UserError(f"{path} has overlapping tensors ({tensor}): pack cannot keep it exactly")
            if begin > at:
                add(f"{name}#gap@{at}", base + at, begin - at)
            transform, codec_name = encoding_for(info["dtype"], bits.get(tensor))
            if (end - begin) % transforms.unit_bytes(transform):
                transform = "none"
            add(f"{name}#{tensor}", base + begin, end - begin, transform, codec_name,
                {"tensor": tensor, "dtype": info["dtype"], "shape": info["shape"]})
            at = end
        if base + at < size:
            add(f"{name}#tail@{at}", base + at, size - base - at)
    return records


def pack_fingerprint(config: bytes, entries: list[dict]) -> str:
    """The packed folder's ``folder_fingerprint``, from the hashes the writer computed."""
    return model_fingerprint(config, {e["path"]: e["sha256"] for e in entries
                                        if "/" not in e["path"] and e["path"].endswith(".safetensors")})


class PackedModel:
    """A model pack opened for reading: its files, its tensors, and the fingerprint of the
    folder it holds, computed from the decoded bytes (the pack's own claim is not used).

    Opening checks the file list as a whole: names normalised and unique
    (``names.unique_member_paths``), each file's records present and used once, sizes
    adding up, tensor dtypes and shapes matching their records' sizes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.reader = ContainerReader(self.path, "model pack")
        try:
            self._check_meta(self.reader.meta)
        except BaseException:
            self.reader.close()
            raise

    def _check_meta(self, meta: dict) -> None:
        if meta.get("kind") != PACK_KIND:
            raise UserError(f"{self.path} is an lsaq-mlx container but not a model pack")
        version = meta.get("version", 0)
        if not isinstance(version, int) or version > PACK_VERSION:
            raise UserError(f"{self.path} is a version {version} model pack; this lsaq-mlx reads "
                            f"version {PACK_VERSION}: upgrade it")
        entries = meta.get("files")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise UserError(f"{self.path} is corrupt: its file list is unreadable")
        names = unique_member_paths([e.get("path") for e in entries], str(self.path))
        self.files, used = {}, set()
        for name, e in zip(names, entries):
            records = e.get("records")
            if (not isinstance(records, list) or not isinstance(e.get("size"), int) or not isinstance(e.get("sha256"), str)
                    or not all(isinstance(r, str) and r in self.reader.records and r not in used for r in records)
                    or len(set(records)) != len(records)):
                raise UserError(f"{self.path} is corrupt: the entry of {name!r} is unreadable")
            used.update(records)
            if sum(self.reader.records[r]["size"] for r in records) != e["size"]:
                raise UserError(f"{self.path} is corrupt: the records of {name!r} do not add up to its size")
            self.files[name] = {"path": name, "size": e["size"], "sha256": e["sha256"], "records": records}
        if "config.json" not in self.files:
            raise UserError(f"{self.path} holds no config.json: not a model")

    def close(self) -> None:
        self.reader.close()

    def file_sha256(self, name: str) -> str:
        """SHA-256 of file ``name`` as decoded (checked against its entry)."""
        sha = hashlib.sha256()
        for piece in self._file_pieces(name):
            sha.update(piece)
        return sha.hexdigest()

    def _file_pieces(self, name: str):
        """The bytes of file ``name`` piece by piece; raises at the end unless they are
        exactly what its entry records."""
        entry, sha, size = self.files[name], hashlib.sha256(), 0
        for record in entry["records"]:
            for piece in self.reader.iter_raw(record):
                sha.update(piece)
                size += len(piece)
                yield piece
        if sha.hexdigest() != entry["sha256"] or size != entry["size"]:
            raise UserError(f"{self.path} is corrupt: {name} fails its SHA-256 check")

    def content_fingerprint(self) -> str:
        """``folder_fingerprint`` of the packed folder, from its decoded config and weight
        files; remembered by the pack's path, size and modification time."""

        def compute(_path) -> str:
            config = b"".join(self._file_pieces("config.json"))
            weights = {n: self.file_sha256(n) for n in self.files if "/" not in n and n.endswith(".safetensors")}
            return model_fingerprint(config, weights)

        return stat_memo(self.path, f"pack-fingerprint-v{PACK_VERSION}", compute)

    def write_files(self, target: Path, names=None, advance=lambda n: None) -> None:
        """Write the files ``names`` (default: all) under ``target``, each checked."""
        for name in names if names is not None else self.files:
            dest = target / name  # names are checked relative paths (``__init__``)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "xb") as out:
                for piece in self._file_pieces(name):
                    out.write(piece)
                    advance(len(piece) / 1e6)

    def weight_files(self) -> list[str]:
        """The files mlx-lm loads weights from (``model*.safetensors`` at the top)."""
        return sorted(n for n in self.files if "/" not in n and n.startswith("model") and n.endswith(".safetensors"))

    def tensor_records(self) -> dict[str, dict]:
        """Tensor name -> record, over the weight files; each tensor's dtype and shape
        must account for its record's size exactly."""
        records = {}
        for name in self.weight_files():
            for r in self.files[name]["records"]:
                record = self.reader.record(r)
                if "tensor" in record["meta"]:
                    tensor = _check_tensor_meta(record, self.path)
                    if tensor in records:
                        raise UserError(f"{self.path} is corrupt: it holds tensor {tensor!r} twice")
                    records[tensor] = record
        return records

    def weights(self) -> dict[str, mx.array]:
        """Every tensor of the weight files, decoded and checked."""
        records = self.tensor_records()
        by_record = {r["name"]: t for t, r in records.items()}
        out = {}
        for record_name, raw in self.reader.read_many(list(by_record)):
            tensor = by_record[record_name]
            out[tensor] = to_array(raw, records[tensor]["meta"])
        return out


def _check_tensor_meta(record: dict, where: Path) -> str:
    meta = record["meta"]
    tensor, dtype, shape = meta.get("tensor"), meta.get("dtype"), meta.get("shape")
    if (not isinstance(tensor, str) or not isinstance(dtype, str) or dtype not in DTYPES or not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise UserError(f"{where} is corrupt: record {record['name']!r} describes its tensor wrongly")
    if math.prod(shape) * DTYPES[dtype].size != record["size"]:
        raise UserError(f"{where} is corrupt: tensor {tensor!r} of shape {shape} does not fill its {record['size']} bytes")
    return tensor


def to_array(raw: bytes, meta: dict) -> mx.array:
    dtype = DTYPES.get(meta["dtype"])
    if dtype is None:
        raise UserError(f"tensor {meta['tensor']} has dtype {meta['dtype']}, which MLX cannot hold")
    return mx.array(np.frombuffer(raw, np.uint8)).view(dtype).reshape(meta["shape"])


class PackedWeights:
    """Tensors of a pack by name, each decoded only when asked for (the runtime's hot
    swap reads its source this way)."""

    def __init__(self, path: Path):
        self.packed = PackedModel(path)
        self.folder = self.packed.path
        self.records = self.packed.tensor_records()

    @property
    def bytes_read(self) -> int:
        """Stored (compressed) bytes read so far."""
        return self.packed.reader.bytes_read

    @property
    def names(self) -> list[str]:
        return list(self.records)

    def shape_of(self, name: str) -> tuple[list[int], str]:
        """``(shape, safetensors dtype)`` of a tensor, without decoding it."""
        meta = self.records[name]["meta"]
        return meta["shape"], meta["dtype"]

    def get(self, name: str) -> mx.array | None:
        record = self.records.get(name)
        if record is None:
            return None
        return to_array(self.packed.reader.read(record["name"]), record["meta"])


def unpack_model(pack: Path, out: Path, force: bool = False) -> PackReport:
    """Write the folder a pack holds at ``out``, byte for byte; return a report."""
    pack, out = Path(pack), Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    try:
        check_replaceable(out, force)
    except FileExistsError:
        raise UserError(f"{out} already exists", setting="force") from None
    start = time.perf_counter()
    packed = PackedModel(pack)
    total = sum(e["size"] for e in packed.files.values())
    try:
        with atomic_dir(out, force=force) as tmp, progress_bar(f"unpacking {pack.name} (MB)", total / 1e6) as advance:
            packed.write_files(tmp, advance=advance)
    except FileExistsError:
        raise UserError(f"{out} already exists", setting="force") from None
    finally:
        packed.close()
    # every entry's hash was checked as its file was written
    fingerprint = pack_fingerprint((out / "config.json").read_bytes(), list(packed.files.values()))
    return PackReport(str(pack), str(out), len(packed.files), total, pack.stat().st_size, time.perf_counter() - start,
                      fingerprint)
