"""The input Hessian ``H = sum x^T x`` of every planned linear module, in one pass of
calibration text through the source a decoder layer at a time
(``sources.streaming.StreamedModel``).

While a layer is loaded its forward runs again with the wanted modules recording their
inputs; modules that read the same tensor (q, k and v; gate and up) share one ``H``.
A layer's stacked experts (mlx-lm's ``SwitchLinear``) get one ``H`` per expert from the
tokens routed to it (``ExpertHessians``).
The LM head's ``H`` (or, tied, the embedding's) comes from the final normed hidden
states. The activations passed
on are those of the layers as written where ``on_modules`` gives the written
parameters (GPTQ's reference code does this; ``mlx_lm.gptq`` passes on the float
source's): each layer is then calibrated on the inputs the written model gives it.
"""

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lm.models.switch_layers import SwitchLinear

from lsaq_mlx.backend.expert_blocks import experts_held, experts_of
from lsaq_mlx.gptq.solver import ExpertHessians
from lsaq_mlx.modules import embedding as embedding_name, inner_model
from lsaq_mlx.scoring.lens import find_lens
from lsaq_mlx.sources.streaming import forward_by_rows

TOKENS, SEQ_LEN = 16384, 256  # calibration: 2,048 tokens overfit (KL above round to nearest), see README
HELD_OUT_TOKENS = 2048  # after TOKENS: not fitted on, the check that a calibrated module beats rounding
BATCH_TOKENS = 2048  # calibration tokens a layer runs on at once (its temporaries scale with them)
SAMPLE_TOKENS = 512  # calibration tokens of the layer's input and output kept for checks while it is loaded


@dataclass
class CalibratedLayer:
    """A loaded decoder layer with its input and output on ``SAMPLE_TOKENS`` calibration
    tokens, and on as many held-out ones where some were held out."""

    prefix: str  # its modules' paths in the model start with this
    module: nn.Module
    forward: Callable[..., mx.array]  # (h, first sequence of the batch it is)
    x_in: mx.array
    x_out: mx.array
    held_in: mx.array | None = None
    held_out: mx.array | None = None
    held_start: int = 0

    def output_error(self, params: dict[str, mx.array]) -> float:
        """The summed squared change of the layer's output on ``x_in`` with ``params``
        (names relative to the layer) in place of its own."""
        with _parameters(self.module, params):
            return mx.sum(mx.square(self.forward(self.x_in).astype(mx.float32) - self.x_out)).item()

    def held_out_error(self, params: dict[str, mx.array]) -> float:
        """The change of the layer's output on the held-out input with ``params``, each
        token's squared change relative to its output's squared norm, summed: what the
        next layer's norm sees. (A plain sum is decided by the few tokens whose hidden
        state is orders of magnitude larger than the rest, as Gemma's are.)"""
        with _parameters(self.module, params):
            change = mx.sum(mx.square(self.forward(self.held_in, self.held_start).astype(mx.float32) - self.held_out),
                            axis=-1)
        return mx.sum(change / mx.maximum(mx.sum(mx.square(self.held_out), axis=-1), 1e-12)).item()

    def unchanged_by(self, params: dict[str, mx.array], tolerance: float) -> bool:
        """Whether ``params`` in place of the layer's own change what it adds to its
        input by at most ``tolerance`` (relative)."""
        added = mx.sum(mx.square((self.x_out - self.x_in).astype(mx.float32))).item()
        return self.output_error(params) <= tolerance ** 2 * max(added, 1e-24)


class LayerHessians(dict):
    """``{path: H}`` of a layer's modules, fitted on; ``held_out``: the same from the
    held-out sequences (empty when none were held out); ``tracks``: a ``LayerHessians``
    of each further copy of the calibration batch (``each_layer_hessians``'s ``copies``)."""

    def __init__(self, fitted: dict, held_out: dict | None = None, tracks: list | None = None):
        super().__init__(fitted)
        self.held_out = held_out or {}
        self.tracks = tracks or []


class SpilledHessians(dict):
    """``{name: H}`` saved in a folder and read from it each time one is asked for
    (a matrix, or stacked experts' ``ExpertHessians`` whose experts are read one at a
    time): an activation track's Hessians wait on disk until a setting is fitted on them."""

    held_out: dict = {}  # as ``LayerHessians.held_out``

    def __init__(self, files: dict):
        super().__init__(files)
        self._factors: dict[Path, np.ndarray] = {}  # by file: what ``scale`` asked for, applied when read

    def scale(self, key: str, factors: np.ndarray) -> None:
        """``key``'s ``H`` (and that of every name sharing its file) multiplied by
        ``factors`` on both sides when read, as equalization scales an ``H`` in memory."""
        file = super().__getitem__(key)
        self._factors[file] = factors * self._factors.get(file, 1.0)

    @classmethod
    def saved(cls, hessians: dict, folder: Path) -> "SpilledHessians":
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for n, (key, h) in enumerate(hessians.items()):
            if isinstance(h, ExpertHessians):
                experts = [None if e is None else _saved(e, folder / f"{n}-{k}.npy") for k, e in enumerate(h.hessians)]
                files[key] = (experts, h.tokens)
            else:
                files[key] = _saved(h, folder / f"{n}.npy")
        hessians.clear()
        return cls(files)

    def renamed(self, keys: dict[str, str]) -> "SpilledHessians":
        """The same files under new names (``{new: old}``), still unread."""
        return SpilledHessians({new: dict.__getitem__(self, old) for new, old in keys.items()})

    def __getitem__(self, key: str):
        file = super().__getitem__(key)
        if isinstance(file, tuple):
            return ExpertHessians(_ReadEach(file[0]), file[1])
        h = np.load(file)
        if file in self._factors:
            scale_hessian(h, self._factors[file])
        return h

    def get(self, key: str, default=None):
        return self[key] if key in self else default


def scale_hessian(h: np.ndarray, factors: np.ndarray) -> None:
    """``H`` of inputs multiplied by ``factors``, in place (no second copy of ``H``)."""
    h *= factors[:, None]
    h *= factors[None, :]


class _ReadEach(list):
    """Files of arrays (or None), each read when indexed."""

    def __getitem__(self, e: int):
        file = super().__getitem__(e)
        return None if file is None else np.load(file)


def _saved(array: np.ndarray, file: Path) -> Path:
    np.save(file, array, allow_pickle=False)
    return file


def each_layer_hessians(streamed, tokens: mx.array, paths: set[str], on_modules, progress=None,
                        halves: bool = False, held_out: int = 0, copies: int = 1, spill: Path | None = None) -> None:
    """``on_modules({path: module}, {path: H}, layer)`` for the linear modules of
    ``paths`` of each decoder layer while it is loaded (``layer``: a
    ``CalibratedLayer``), then for the LM head or the embedding tied to it (``layer``
    None); ``H`` (float32 numpy) is the same array for modules sharing an input. If it
    returns parameters (names relative to the layer), the layer's output with them is
    passed on to the next. With ``halves``, ``H`` is a pair: the Hessians of two
    disjoint halves of the sequences. ``tokens``: (batch, length), of which the last
    ``held_out`` sequences are not in ``H`` but in ``hessians.held_out``
    (``LayerHessians``). With ``copies`` > 1 the batch runs that many times, each copy
    an activation track of its own: ``hessians.tracks`` holds the further copies' ``H``,
    and ``on_modules`` may return a list of parameters, one per copy, each copy passed
    on through the layer with its own (an adaptive folder's plans, each calibrated on
    what its own earlier layers compute). With ``spill`` (a folder), the further copies'
    ``H`` wait there and are read when asked for (``SpilledHessians``): a layer of the
    Llama-3-8B shape has 1 GB of them per copy, twice with held-out ones."""
    step = progress or (lambda n=1: None)
    rows = max(1, min(BATCH_TOKENS // tokens.shape[1], -(-tokens.shape[0] // 2) if halves else tokens.shape[0]))
    count = tokens.shape[0]  # sequences of one copy

    def on_layer(i, layer, x_in, x_out, forward):
        prefix = streamed.prefixes[i]
        kinds = nn.Linear if halves else (nn.Linear, SwitchLinear)
        modules = {p: m for p, m in layer.named_modules() if f"{prefix}{p}" in paths and isinstance(m, kinds)}
        fit = count - held_out
        hessians = _layer_hessians(layer, modules, forward, x_in[:fit], rows, halves)
        # held-out inputs check rows of matrices (``never_worse_than_rounding``), not experts
        matrices = {p: m for p, m in modules.items() if not isinstance(m, SwitchLinear)}
        checks = _layer_hessians(layer, matrices, forward, x_in[fit:count], rows, False, fit) if held_out else {}
        def kept(hessians: dict, name: str) -> dict:
            return SpilledHessians.saved(hessians, spill / f"{i}-{name}") if spill is not None else hessians

        tracks = [(kept(_layer_hessians(layer, modules, forward, x_in[c * count : c * count + fit], rows, False,
                                        c * count), f"{c}"),
                   kept(_layer_hessians(layer, matrices, forward, x_in[c * count + fit : (c + 1) * count], rows, False,
                                        c * count + fit), f"{c}-held") if held_out else {}) for c in range(1, copies)]
        n = max(1, SAMPLE_TOKENS // x_in.shape[1])
        held = (x_in[fit:fit + n], x_out[fit:fit + n].astype(mx.float32)) if held_out else (None, None)
        sample = CalibratedLayer(prefix, layer, forward, x_in[:n], x_out[:n].astype(mx.float32), *held, fit)
        def named(fitted, held):
            if isinstance(fitted, SpilledHessians):  # still on disk, by path
                found = fitted.renamed({prefix + p: input_key(p) for p in modules})
                found.held_out = held.renamed({prefix + p: input_key(p) for p in matrices}) if held else {}
                return found
            return LayerHessians({prefix + p: fitted[input_key(p)] for p in modules},
                                 {prefix + p: held[input_key(p)] for p in matrices if held})

        found = named(hessians, checks)
        found.tracks = [named(*t) for t in tracks]
        replaced = on_modules({prefix + p: m for p, m in modules.items()}, found, sample)
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
        step()
        if replaced is None:
            return None
        if copies == 1:
            with _parameters(layer, replaced):
                return forward_by_rows(forward, x_in, rows)
        out = mx.zeros((x_in.shape[0], *x_out.shape[1:]), x_out.dtype)  # filled in place: no second copy
        for c, params in enumerate(replaced if isinstance(replaced, list) else [replaced] * copies):
            out[c * count : (c + 1) * count] = _copy_output(layer, forward, x_in, c * count, count, rows, params)
            mx.eval(out)
        return out

    hidden = streamed.run_layers(mx.concatenate([tokens] * copies) if copies > 1 else tokens, on_layer, batch_rows=rows)
    head = head_path(streamed.model)
    if head in paths:
        normed = find_lens(streamed.model).norm(hidden).astype(mx.float32)
        fit = count - held_out
        gram = lambda part: np.array(_gram(part.reshape(-1, part.shape[-1])))  # noqa: E731
        parts = [normed[0:count:2], normed[1:count:2]] if halves else [normed[:fit]] + ([normed[fit:count]] if held_out else [])
        h = [gram(part) for part in parts]
        tracks = [LayerHessians({head: gram(normed[c * count : c * count + fit])},
                                {head: gram(normed[c * count + fit : (c + 1) * count])} if held_out else None)
                  for c in range(1, copies)]
        hessians = LayerHessians({head: tuple(h) if halves else h[0]}, {head: h[1]} if held_out else None, tracks)
        on_modules({head: dict(streamed.model.named_modules())[head]}, hessians, None)
    step()


def _copy_output(layer, forward, x_in, first: int, count: int, rows: int, params: dict) -> mx.array:
    """The layer's output on the copy of the batch from sequence ``first`` on, with ``params``."""
    with _parameters(layer, params):
        return forward_by_rows(lambda h, start=0: forward(h, first + start), x_in[first : first + count], rows)


def head_path(model: nn.Module) -> str | None:
    """The path of the matrix that maps the final hidden state to logits: the LM head,
    or the embedding where the head is tied to it."""
    holder = model.get("language_model", model)
    if "lm_head" in holder:
        return "lm_head" if isinstance(holder["lm_head"], (nn.Linear, nn.QuantizedLinear)) else None
    inner = inner_model(model)
    embedding = inner.get(embedding_name(inner))
    return next((p for p, m in model.named_modules() if m is embedding), None)


@contextmanager
def _parameters(module: nn.Module, params: dict[str, mx.array]):
    """``module`` with ``params`` (names relative to it) in place of its own, restored after."""
    with experts_held(module, params) as params:
        originals = [(k, v) for k, v in tree_flatten(module.parameters()) if k in params]
        module.update(tree_unflatten([(k, params[k].astype(v.dtype)) for k, v in originals]))
        try:
            yield module
        finally:
            module.update(tree_unflatten(originals))


def _gram(x: mx.array) -> mx.array:
    return x.T @ x


class _Recorder(nn.Module):
    """A linear module that adds ``x^T x`` of its inputs to ``sink[0][key]`` (when it
    is the one module recording that input)."""

    def __init__(self, module: nn.Module, sink: list, key: str | None):
        super().__init__()
        self.module, self._sink, self._key = module, sink, key

    def __call__(self, x, *args, **kwargs):
        if self._key is not None and isinstance(self.module, SwitchLinear):
            self._record_experts(x, args[0] if args else kwargs["indices"])
        elif self._key is not None:
            hessians, h = self._sink[0], _gram(x.reshape(-1, x.shape[-1]).astype(mx.float32))
            hessians[self._key] = h if self._key not in hessians else hessians[self._key] + h
        return self.module(x, *args, **kwargs)

    def _record_experts(self, x, indices):
        """``x^T x`` of the rows routed to each expert, and how many there were; while
        fewer rows than inputs reached an expert, the rows themselves (smaller: at
        Qwen3-235B-A22B a layer's 128 Hessians of 4096 inputs take 8.6 GB, its routed
        calibration rows 2.1 GB)."""
        rows = mx.broadcast_to(x, (*indices.shape, *x.shape[-2:])).reshape(-1, x.shape[-1]).astype(mx.float32)
        experts = np.array(indices.flatten())
        order = np.argsort(experts, kind="stable")
        counts = np.bincount(experts, minlength=experts_of(self.module).shape[0])
        rows = rows[mx.array(order)]
        grams, tokens = self._sink[0].setdefault(self._key, ([None] * len(counts), np.zeros(len(counts), np.int64)))
        start = 0
        width = rows.shape[-1]
        for e, n in enumerate(counts):
            if n:
                part, seen = rows[start : start + n], tokens[e] + n
                if seen < width:
                    grams[e] = part if grams[e] is None else mx.concatenate([grams[e], part])
                else:
                    held = _gram(grams[e]) if grams[e] is not None and tokens[e] < width else grams[e]
                    grams[e] = _gram(part) if held is None else held + _gram(part)
            start += n
        tokens += counts
        mx.eval([g for g in grams if g is not None])


def _layer_hessians(layer: nn.Module, modules: dict, forward, x_in: mx.array, rows: int, halves: bool,
                    first: int = 0) -> dict:
    """``H`` of each distinct input of ``modules`` (keyed by ``input_key``), the layer
    run on ``rows`` sequences at a time (``x_in``: the batch's sequences from ``first``
    on); with ``halves``, a pair from alternate chunks."""
    parts = [{}, {}] if halves else [{}]
    sink = [parts[0]]
    keys = {}
    for p in modules:
        keys.setdefault(input_key(p), p)  # the first module reading an input records it
    originals = list(modules.items())
    wrapped = [(p, _Recorder(m, sink, input_key(p) if keys[input_key(p)] == p else None)) for p, m in originals]
    layer.update_modules(tree_unflatten(wrapped))
    try:
        for n, start in enumerate(range(0, x_in.shape[0], rows)):
            sink[0] = parts[n % len(parts)]
            forward(x_in[start : start + rows], first + start)
            mx.eval(sink[0])
    finally:
        layer.update_modules(tree_unflatten(originals))
    arrays = [{k: _to_numpy(h) for k, h in part.items()} for part in parts]
    return {k: tuple(a[k] for a in arrays) for k in arrays[0]} if halves else arrays[0]


def _to_numpy(h):
    if not isinstance(h, tuple):
        return np.array(h)
    grams, tokens = h
    hessians = []
    for e in range(len(grams)):  # one at a time: a layer's expert Hessians are never held twice
        hessians.append(None if grams[e] is None else np.array(grams[e]))
        grams[e] = None
    return ExpertHessians(hessians, tokens)


_SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def input_key(path: str) -> str:
    """Modules reading the same tensor share a key (and so one ``H``)."""
    parent, _, name = path.rpartition(".")
    return f"{parent}.{_SHARED_INPUT.get(name, name)}"


def calibration_tokens(tokenizer, calib, held_out: int = 0) -> mx.array:
    """``TOKENS`` (plus ``held_out``) tokens of ``calib`` as (sequences, ``SEQ_LEN``)."""
    from lsaq_mlx.scoring.calibration import token_sequences

    sequences = token_sequences(tokenizer, calib, TOKENS + held_out, SEQ_LEN)
    return mx.array([s for s in sequences if len(s) == SEQ_LEN])
