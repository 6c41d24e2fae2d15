"""An adaptive folder's store of smaller settings (``lsaq_adaptive/``): a layer store
(``storage.layer_store``) whose settings are whole modules, or steps from the folder's
stored module (``adaptive.steps``), rebuilt into codes, scales and biases when a swap
reads them."""

import logging
from pathlib import Path

import mlx.core as mx
import numpy as np

from lsaq_mlx.adaptive.steps import STEP_PARAMS, setting_from_steps, setting_steps
from lsaq_mlx.errors import UserError
from lsaq_mlx.planning.choices import Affine
from lsaq_mlx.sources.tensors import SourceTensors
from lsaq_mlx.storage.layer_store import LayerStore, stored_module

log = logging.getLogger(__name__)

TOP_PARAMS = ("weight", "scales", "biases")


class SideStore:
    """``folder``'s store at ``folder/side`` (``top``: the plan the folder stores)."""

    def __init__(self, folder: Path, side: str, top):
        self.store, self.tensors, self.top = LayerStore(Path(folder) / side), SourceTensors(folder), top

    @property
    def bytes_read(self) -> int:
        """Bytes read by swaps: the store's (compressed) and the stored modules' the steps start from."""
        return self.store.bytes_read + self.tensors.bytes_read

    def settings(self) -> list[tuple[str, str]]:
        return self.store.settings()

    def bytes(self) -> int:
        return self.store.bytes()

    def close(self) -> None:
        self.store.close()

    def add(self, modules: dict, advance=None) -> None:
        """``LayerStore.add``, each setting whose stored module is affine stored as steps;
        ``modules`` is emptied as they are written (read, a setting's arrays stay in
        memory while anything holds them: at 1.1B, 0.6 GB by the last)."""
        self.store.add({key: lambda key=key: self._steps_of(key, modules.pop(key)) for key in list(modules)}, advance)

    def module(self, path: str, choice):
        """The module at ``path`` with ``choice``, or None when the store does not hold
        it or what it holds does not add up (a warning)."""
        found = self.store.arrays(path, choice)
        if found is None:
            return None
        info, arrays = found
        try:
            if arrays.keys() & set(STEP_PARAMS):
                arrays = self._setting_of(path, choice, arrays)
            return stored_module(info, arrays, choice)
        except (UserError, ValueError, TypeError) as e:  # TypeError: a dtype numpy cannot hold
            log.warning("warning: the stored %s of %s does not fit it (%s); rounding it from the weights instead",
                        choice.label, path, e)
            return None

    def _stored(self, path: str) -> tuple[dict, Affine]:
        top_choice = self.top.modules.get(path)
        if not isinstance(top_choice, Affine):
            raise ValueError(f"the folder stores {path} unquantized: there are no codes to step from")
        names = [f"{path}.{p}" for p in TOP_PARAMS]
        if all(n in self.tensors.files and len(self.tensors.shape_of(n)[0]) == 2 for n in names):
            return {p: StoredRows(self.tensors, n) for p, n in zip(TOP_PARAMS, names)}, top_choice
        arrays = {p: self.tensors.get(n) for p, n in zip(TOP_PARAMS, names)}  # stacked experts: whole
        return {p: np.array(a) for p, a in arrays.items() if a is not None}, top_choice

    def _steps_of(self, key: tuple, value: tuple) -> tuple[str, dict]:
        (path, choice), (kind, arrays) = key, value
        if not isinstance(self.top.modules.get(path), Affine):
            return kind, arrays
        top, top_choice = self._stored(path)
        steps = setting_steps(*(np.array(arrays[p]) for p in TOP_PARAMS), choice, top, top_choice)
        return kind, {p: a for p, a in arrays.items() if p not in TOP_PARAMS} | {p: mx.array(a) for p, a in steps.items()}

    def _setting_of(self, path: str, choice, arrays: dict) -> dict:
        if set(arrays) - {"bias"} != set(STEP_PARAMS):
            raise ValueError(f"steps need {', '.join(STEP_PARAMS)}, not {', '.join(sorted(arrays))}")
        top, top_choice = self._stored(path)
        made = MLXArrays()
        setting_from_steps({p: np.asarray(arrays.pop(p)) for p in STEP_PARAMS}, choice, top, top_choice, made.empty)
        return arrays | dict(zip(TOP_PARAMS, made.arrays))


class StoredRows:
    """A stored matrix read a row block at a time from its file (``SourceTensors.rows``):
    what a setting's steps start from, without the whole module in memory (an 8B
    model's LM head at 6 bits is 427 MB)."""

    def __init__(self, tensors: SourceTensors, name: str):
        self.tensors, self.name = tensors, name
        self.shape = tuple(tensors.shape_of(name)[0])
        self.ndim = len(self.shape)

    def reshape(self, *shape):
        if shape != (-1, self.shape[-1]):
            raise ValueError(f"{self.name} is read by rows, not reshaped to {shape}")
        return self

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError(f"{self.name} is read by blocks of whole rows")
        return np.asarray(self.tensors.rows(self.name, start, stop))  # a view: only read


class MLXArrays:
    """Arrays made in MLX's memory and filled through numpy views of it: a rebuilt
    setting is not held twice (numpy, then MLX's copy) beside the module it replaces."""

    DTYPES = {np.dtype(np.uint32): mx.uint32, np.dtype(np.float16): mx.float16}

    def __init__(self):
        self.arrays = []

    def empty(self, shape: tuple, dtype) -> np.ndarray:
        array = mx.zeros(shape, self.DTYPES[np.dtype(dtype)])
        mx.eval(array)
        self.arrays.append(array)
        view = np.array(array, copy=False)  # numpy 1.x copies where it cannot view: then it owns its data
        if view.flags.owndata or not view.flags.writeable:
            raise RuntimeError("this numpy cannot write into MLX's memory")
        return view
