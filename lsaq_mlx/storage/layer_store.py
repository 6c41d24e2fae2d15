"""The layer store: every module of a model at every setting a PlanSet uses, quantized
once and kept compressed on disk, so a hot swap reads the ready module instead of
re-quantizing it from the float source.

Under ``<cache>/layers/<source fingerprint>-mlx<MLX version>-v<store version>/``: one
container per decoder layer (``layer-0007.lsaqstore``) and one for the modules outside
the layers (``other.lsaqstore``). A record holds one parameter of one module at one
setting, ``<module path>@<setting>/<parameter>`` (the setting is the plan choice's key:
``4/64`` for 4 bits in groups of 64, ``keep`` for float16); the container's meta names
each module's class and parameters. The tensors are what ``runtime.swap.quantized_module``
computes (whoever builds the store passes it in: the store imports nothing of the
runtime), so a module read from the store equals a re-quantized one bit for bit; MLX's
version is in the key because its quantizer may change. A damaged file is
reported and the swap falls back to re-quantizing.
"""

import io
import json
import logging
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from lsaq_mlx.cache import atomic_file, cache_dir
from lsaq_mlx.errors import UserError
from lsaq_mlx.modules import layer_index
from lsaq_mlx.progress import progress_bar
from lsaq_mlx.storage import transforms
from lsaq_mlx.storage.container import ContainerReader, ContainerWriter, chunks_of
from lsaq_mlx.storage.model_pack import DTYPES, encoding_for, to_array

log = logging.getLogger(__name__)

STORE_VERSION = 2  # 2: settings named by the plan choice's key
SUFFIX = ".lsaqstore"
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def setting_key(choice) -> str:
    """A plan choice's key (``4/64``, ``keep``): any object with ``key`` will do."""
    return choice.key


def file_name(path: str) -> str:
    index = layer_index(path)
    return f"other{SUFFIX}" if index is None else f"layer-{index:04d}{SUFFIX}"


class LayerStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.bytes_read = 0  # stored (compressed) bytes read by swaps
        self._readers: dict[str, ContainerReader | None] = {}

    @classmethod
    def for_model(cls, fingerprint: str) -> "LayerStore":
        return cls(cache_dir() / "layers" / f"{fingerprint}-mlx{mx.__version__}-v{STORE_VERSION}")

    def close(self) -> None:
        for reader in self._readers.values():
            if reader is not None:
                reader.close()
        self._readers.clear()

    def _reader(self, name: str) -> ContainerReader | None:
        if name not in self._readers:
            path = self.root / name
            try:
                self._readers[name] = ContainerReader(path, "layer store file") if path.is_file() else None
            except UserError as e:
                log.warning("layer store: %s; rebuilding or re-quantizing instead", e)
                self._readers[name] = None
        return self._readers[name]

    def _modules_in(self, name: str) -> dict:
        reader = self._reader(name)
        return reader.meta.get("modules", {}) if reader else {}

    def build(self, plans, make_module) -> dict:
        """Store every (module, setting) of ``plans`` that is not stored yet, made by
        ``make_module(path, choice)`` (what a swap would make: ``runtime.swap.module_maker``).
        Returns what was done."""
        start = time.perf_counter()
        wanted: dict[str, dict] = {}
        for plan in plans:
            for path, choice in plan.modules.items():
                wanted.setdefault(file_name(path), {})[f"{path}@{setting_key(choice)}"] = (path, choice)
        missing = {name: {k: v for k, v in entries.items() if k not in self._modules_in(name)}
                   for name, entries in wanted.items()}
        missing = {name: entries for name, entries in missing.items() if entries}

        def make(path, choice):
            module = make_module(path, choice)
            mx.eval(module.parameters())
            return type(module).__name__, dict(tree_flatten(module.parameters()))

        self.root.mkdir(parents=True, exist_ok=True)
        with progress_bar("building the layer store", sum(map(len, missing.values()))) as advance:
            for name, entries in missing.items():
                self._rewrite(name, entries, make, advance)
        return {"root": str(self.root), "modules": sum(map(len, wanted.values())),
                "written": sum(map(len, missing.values())), "files": len(wanted),
                "bytes": self.bytes(),
                "seconds": time.perf_counter() - start}

    def add(self, modules: dict, advance=None) -> None:
        """Store ``modules``: ``{(path, choice): (class name, {param: array})}`` (or a
        function making that, called when it is written), emptied as it is written, so
        that each module's arrays can be freed once stored."""
        files: dict[str, dict] = {}
        for (path, choice), value in modules.items():
            files.setdefault(file_name(path), {})[f"{path}@{setting_key(choice)}"] = (path, choice)
        self.root.mkdir(parents=True, exist_ok=True)
        for name, entries in files.items():
            self._rewrite(name, entries, lambda path, choice: _made(modules.pop((path, choice))), advance or (lambda: None))

    def _rewrite(self, name: str, entries: dict, make, advance) -> None:
        """Write file ``name`` again with what it held plus (or instead of) ``entries`` (key -> (path,
        choice)), each made by ``make(path, choice) -> (class name, {param: array})``."""
        old, modules = self._reader(name), dict(self._modules_in(name))
        with atomic_file(self.root / name) as tmp, open(tmp, "wb") as f:
            writer = ContainerWriter(f)
            for key, info in modules.items():
                if key in entries:  # replaced
                    continue
                for record in info["records"]:
                    r = old.record(record)
                    writer.add(record, chunks_of(old.read(record), transforms.unit_bytes(r["transform"])),
                               r["transform"], r["codec"], r["meta"])
            for key, (path, choice) in entries.items():
                kind, arrays = make(path, choice)
                modules[key] = _add_module(writer, key, kind, arrays, choice)
                del arrays
                advance()
            writer.finish({"kind": "lsaq-mlx layer store", "version": STORE_VERSION, "modules": modules})
        if old is not None:
            old.close()
        self._readers.pop(name, None)

    def bytes(self) -> int:
        """The store's size on disk."""
        return sum(f.stat().st_size for f in self.root.glob(f"*{SUFFIX}"))

    def settings(self) -> list[tuple[str, str]]:
        """``(module path, setting key)`` of every module the store holds."""
        found = []
        for f in sorted(self.root.glob(f"*{SUFFIX}")):
            found += [tuple(key.rsplit("@", 1)) for key in self._modules_in(f.name)]
        return found

    def module(self, path: str, choice) -> nn.Module | None:
        """The module at ``path`` with ``choice`` as stored (float16), or None when the
        store does not hold it or its file is damaged."""
        found = self.arrays(path, choice)
        if found is None:
            return None
        try:
            return stored_module(*found, choice)
        except UserError as e:
            log.warning("layer store: %s; re-quantizing %s instead", e, path)
            return None

    def arrays(self, path: str, choice) -> tuple[dict, dict] | None:
        """``(info, {param: array})`` of the module at ``path`` with ``choice`` as stored
        (``info``: its class and setting, for ``stored_module``), or None when the store
        does not hold it or its file is damaged."""
        name = file_name(path)
        info = self._modules_in(name).get(f"{path}@{setting_key(choice)}")
        if info is None:
            return None
        reader = self._reader(name)
        before = reader.bytes_read
        try:
            arrays = {}
            for record in info["records"]:
                meta = reader.record(record)["meta"]
                arrays[meta["tensor"]] = to_array(reader.read(record), meta)
            return info, arrays
        except UserError as e:
            log.warning("layer store: %s; re-quantizing %s instead", e, path)
            return None
        finally:
            self.bytes_read += reader.bytes_read - before


def _made(value):
    return value() if callable(value) else value


def encoded_bytes(arrays: dict, choice, path: str = "") -> int:
    """The bytes the store takes for the module at ``path`` holding ``arrays`` at
    ``choice``: its records and their entries in the file's index."""
    buffer = io.BytesIO()
    writer = ContainerWriter(buffer)
    start = buffer.tell()
    key = f"{path}@{setting_key(choice)}"
    info = _add_module(writer, key, "QuantizedLinear", arrays, choice)
    return buffer.tell() - start + len(json.dumps([{key: info}, writer.records], separators=(",", ":")))


def _add_module(writer: ContainerWriter, key: str, kind: str, arrays: dict, choice) -> dict:
    records = []
    bits = getattr(choice, "bits", None)
    for param, array in arrays.items():
        dtype = _DTYPE_NAMES[array.dtype]
        transform, codec_name = encoding_for(dtype, bits if param == "weight" else None)
        raw = np.array(array).tobytes()
        record = f"{key}/{param}"
        writer.add(record, chunks_of(raw, transforms.unit_bytes(transform)), transform, codec_name,
                   {"tensor": param, "dtype": dtype, "shape": list(array.shape)})
        records.append(record)
    info = {"class": kind, "records": records}
    if bits is not None:
        info |= {"bits": bits, "group_size": choice.group_size, "mode": "affine"}
    return info


def stored_module(info: dict, arrays: dict, choice) -> nn.Module:
    """A module of the stored class holding ``arrays``, quantized as ``choice`` (what it
    was stored under: never a size read from the file)."""
    kind, bias = info.get("class"), "bias" in arrays
    if str(kind).startswith("Quantized"):
        if not hasattr(choice, "bits") or (info.get("bits"), info.get("group_size")) != (choice.bits, choice.group_size):
            raise UserError(f"the layer store's {kind} is not stored as {getattr(choice, 'label', choice)}")
        info = {"group_size": choice.group_size, "bits": choice.bits, "mode": "affine"}
    if kind == "Linear":
        module = nn.Linear(1, 1, bias=bias)
    elif kind == "Embedding":
        module = nn.Embedding(1, 1)
    elif kind == "QuantizedLinear":
        module = nn.QuantizedLinear.from_linear(nn.Linear(info["group_size"], 1, bias=bias), info["group_size"],
                                                info["bits"], info["mode"])
    elif kind == "QuantizedEmbedding":
        module = nn.QuantizedEmbedding.from_embedding(nn.Embedding(1, info["group_size"]), info["group_size"],
                                                      info["bits"], info["mode"])
    elif kind in ("SwitchLinear", "BlockedSwitchLinear"):
        module = SwitchLinear(1, 1, 1, bias=bias)
    elif kind == "QuantizedSwitchLinear":
        module = QuantizedSwitchLinear(info["group_size"], 1, 1, bias, info["group_size"], info["bits"], info["mode"])
    else:
        raise UserError(f"the layer store holds a module of unknown class {kind}")
    for param, array in arrays.items():
        setattr(module, param, array)
    return module
