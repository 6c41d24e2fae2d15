"""The Fisher of a layer's stacked experts (mlx-lm's ``SwitchLinear``), one expert at a time.

The dense per-sequence gradient of a layer's experts is as large as the experts
themselves (2.4 GB in float32 for a Qwen3-30B-A3B layer), and its running squares as
much again. Expert ``e``'s gradient on a sequence is ``g^T x`` over the tokens routed to
it (``g``: the gradient at the module's output, ``x``: its input). So the backward pass
records only those (a zero probe added to each expert module's output is a primal of
the vjp; its cotangent is ``g``), and each expert's Fisher is made from them, priced and
dropped in turn: memory is the layer's weights and the recorded activations.
"""

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.models.switch_layers import SwitchLinear

from lsaq_mlx.backend.expert_blocks import experts_of


class ExpertRecorder:
    """Probes on the expert modules ``paths`` (names relative to ``layer``)."""

    def __init__(self, layer: nn.Module, paths: list[str]):
        modules = dict(layer.named_modules())
        self.layer, self.modules = layer, {p: modules[p] for p in paths}
        self.shapes: dict[str, tuple] = {}
        self.current: dict[str, mx.array] | None = None  # the probes of the vjp under way
        self.seen: dict[str, tuple] = {}  # path -> (input rows, expert of each row) of the last forward
        self.records: dict[str, list] = {p: [] for p in paths}  # per sequence: (x rows, experts, g rows)

    @classmethod
    def of(cls, layer: nn.Module, relative_paths: list[str]) -> "ExpertRecorder":
        modules = dict(layer.named_modules())
        return cls(layer, [p for p in relative_paths if isinstance(modules.get(p), SwitchLinear)])

    @contextmanager
    def installed(self):
        self.layer.update_modules(tree_unflatten([(p, _Probe(m, self, p)) for p, m in self.modules.items()]))
        try:
            yield self
        finally:
            self.layer.update_modules(tree_unflatten(list(self.modules.items())))

    def probes(self, forward, h: mx.array) -> list[mx.array]:
        """Zero probes of each module's output shape (found by one forward of ``h``)."""
        if not self.shapes:
            forward(h)
        return [mx.zeros(self.shapes[p], mx.float32) for p in self.modules]

    def keep(self, cotangents: list[mx.array]) -> list[mx.array]:
        """Record the sequence's rows with the probes' cotangents; the arrays to evaluate."""
        kept = []
        for p, g in zip(self.modules, cotangents):
            x, experts = self.seen[p]
            self.records[p].append((x, experts, g.reshape(-1, g.shape[-1]).astype(mx.float32)))
            kept += self.records[p][-1]
        return kept

    def price(self, prefix: str, sequences: int, on_weights) -> None:
        """``on_weights(path, expert's weight, its Fisher)`` for every expert, one at a time."""
        for p, module in self.modules.items():
            stack = experts_of(module)
            count = stack.shape[0]
            records = [_by_expert(x, e, g, count) for x, e, g in self.records[p]]
            self.records[p] = []
            for expert in range(count):
                fisher = mx.zeros(stack.shape[1:], mx.float32)
                for x, g, starts in records:
                    rows = slice(int(starts[expert]), int(starts[expert + 1]))
                    if rows.stop > rows.start:
                        grad = g[rows].T @ x[rows]
                        fisher = fisher + grad * grad
                mx.eval(fisher)
                on_weights(prefix + p, stack.block(expert, expert + 1)[0], fisher / sequences)


def _by_expert(x: mx.array, experts: mx.array, g: mx.array, count: int):
    """The rows sorted by expert, and where each expert's rows start (``count + 1``)."""
    experts = np.array(experts)
    order = mx.array(np.argsort(experts, kind="stable"))
    starts = np.concatenate([[0], np.cumsum(np.bincount(experts, minlength=count))])
    return x[order], g[order], starts


class _Probe(nn.Module):
    def __init__(self, module: nn.Module, recorder: ExpertRecorder, path: str):
        super().__init__()
        self.module, self._recorder, self._path = module, recorder, path

    def __call__(self, x, indices, sorted_indices=False):
        out = self.module(x, indices, sorted_indices=sorted_indices)
        rows = mx.broadcast_to(x, (*indices.shape, *x.shape[-2:])).reshape(-1, x.shape[-1]).astype(mx.float32)
        self._recorder.seen[self._path] = (rows, indices.flatten())
        self._recorder.shapes[self._path] = out.shape
        current = self._recorder.current
        return out if current is None else out + current[self._path].astype(out.dtype)
