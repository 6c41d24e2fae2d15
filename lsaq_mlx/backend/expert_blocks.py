"""Stacked experts (mlx-lm's ``SwitchLinear``) that compute in float32 a block of experts
at a time, their weights held as stored (float16, bfloat16) or read from the checkpoint
for each block (an ``ExpertStack``: ``sources.expert_stacks``).

A decoder layer of a large mixture of experts is mostly its experts: 604 M weights in a
Qwen3-30B-A3B layer (2.4 GB in float32), 2.4 B in a Qwen3-235B-A22B one (9.7 GB). A
float32 copy of them, on top of the stored ones, was what set the memory of every
streamed stage. Here each call sorts its rows by expert and multiplies each block of
``EXPERT_BLOCK_BYTES`` upcast experts with the rows routed to it, evaluated before the
next block is upcast; the gradient with respect to the input (the Fisher's backward
pass) is computed the same way, the blocks upcast again rather than kept from the
forward. No gradient reaches the weights (the Fisher of experts is made from recorded
rows, ``planning.expert_fisher``).

An expert module read from the checkpoint has no ``weight`` parameter (nothing of it is
held between calls): code that needs its weights asks ``experts_of(module)``.
"""

import math
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
from mlx_lm.models.switch_layers import SwitchLinear

from lsaq_mlx.backend.hybrid import exact_dequantize

EXPERT_BLOCK_BYTES = 64 << 20  # float32 bytes of the experts upcast at once


class HeldExperts:
    """An ``ExpertStack`` (``shape``: experts x out x in; ``block(first, last)``: those
    experts' weights in float32) over a stacked weight in memory: float, or affine codes
    with their ``scales`` and ``biases`` (dequantized exactly, a block at a time)."""

    def __init__(self, weight: mx.array, scales: mx.array | None = None, biases: mx.array | None = None,
                 in_dims: int | None = None):
        self.weight, self.scales, self.biases = weight, scales, biases
        self.shape = tuple(weight.shape) if scales is None else (*weight.shape[:2], in_dims)

    def block(self, first: int, last: int) -> mx.array:
        if self.scales is None:
            return self.weight[first:last].astype(mx.float32)
        bits, group_size = self.weight.shape[2] * 32 // self.shape[2], self.shape[2] // self.scales.shape[2]
        return exact_dequantize(self.weight[first:last], self.scales[first:last],
                                None if self.biases is None else self.biases[first:last], group_size, bits)


class BlockedSwitchLinear(SwitchLinear):
    def __call__(self, x, indices, sorted_indices=False):
        rows = mx.broadcast_to(x, (*indices.shape, *x.shape[-2:])).reshape(-1, *x.shape[-2:])
        out = _blocked_product(experts_of(self))(rows, mx.stop_gradient(indices).flatten())
        out = out.reshape(*indices.shape, *out.shape[-2:])
        if "bias" in self:
            out = out + mx.expand_dims(self["bias"][indices], -2).astype(mx.float32)
        return out


def make_blocked(module, stack=None) -> bool:
    """Turn an mlx-lm ``SwitchLinear`` into a ``BlockedSwitchLinear`` in place (same
    fields; with ``stack``, an ``ExpertStack`` that replaces its weight); False for
    other modules."""
    if type(module) is not SwitchLinear:
        return isinstance(module, BlockedSwitchLinear)
    module.__class__ = BlockedSwitchLinear
    if stack is not None:
        module.pop("weight")
        module.expert_stack = stack
    return True


def experts_of(module):
    """The ``ExpertStack`` of a module of stacked experts: its weight as held, or where
    it holds none, the stack it reads."""
    return HeldExperts(module["weight"]) if "weight" in module else module.expert_stack


@contextmanager
def experts_held(layer, params: dict):
    """Within the block, the modules of ``layer`` that read their experts compute with
    the stacked weights ``params`` gives them (names relative to ``layer``; float, or
    codes with their ``.scales`` and ``.biases`` as a layer is written, then held as
    codes); yields the rest of ``params``, where experts a module holds as a parameter
    are given to it dequantized, in its dtype."""
    modules, rest, held = dict(layer.named_modules()), dict(params), {}
    for name, value in params.items():
        path, _, param = name.rpartition(".")
        module = modules.get(path)
        if param != "weight" or not isinstance(module, SwitchLinear) or value.ndim != 3:
            continue
        scales, biases = rest.pop(f"{path}.scales", None), rest.pop(f"{path}.biases", None)
        stack = HeldExperts(value, scales, biases, experts_of(module).shape[2])
        if "weight" in module:
            rest[name] = value if scales is None else stack.block(0, stack.shape[0]).astype(module.weight.dtype)
        else:
            held[path] = (module, stack)
            rest.pop(name)
    saved = {path: module.expert_stack for path, (module, _) in held.items()}
    for module, stack in held.values():
        module.expert_stack = stack
    try:
        yield rest
    finally:
        for path, (module, _) in held.items():
            module.expert_stack = saved[path]


def _blocked_product(stack):
    """``f(rows, experts)``: each row (``n x m x in``) times the transposed weight of its
    expert (of ``stack``), differentiable with respect to the rows."""

    @mx.custom_function
    def product(rows, experts):
        return _by_blocks(rows, experts, stack, transposed=True)

    @product.vjp
    def product_vjp(primals, cotangent, output):
        rows, experts = primals
        return _by_blocks(cotangent, experts, stack, transposed=False), mx.zeros_like(experts)

    return product


def _by_blocks(rows: mx.array, experts: mx.array, stack, transposed: bool) -> mx.array:
    """``rows[i] @ W[experts[i]].T`` (or ``@ W[experts[i]]``), a block of experts at a time,
    each expert's rows in one BLAS product (MLX's CPU ``gather_mm`` is ~30x slower)."""
    count = stack.shape[0]
    per_block = max(1, EXPERT_BLOCK_BYTES // (4 * math.prod(stack.shape[1:])))
    ids = np.array(experts).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    starts = np.searchsorted(ids[order], np.arange(count + 1))
    sorted_rows = rows[mx.array(order)].astype(mx.float32)
    parts = []
    for first in range(0, count, per_block):
        last = min(count, first + per_block)
        routed = [e for e in range(first, last) if starts[e + 1] > starts[e]]
        if not routed:
            continue
        # few routed experts (a token being generated): read those alone, not the block
        block = stack.block(first, last) if 2 * len(routed) > last - first else None
        products = []
        for e in routed:
            x = sorted_rows[int(starts[e]) : int(starts[e + 1])]
            weight = block[e - first] if block is not None else stack.block(e, e + 1)[0]
            w = weight.T if transposed else weight
            products.append((x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1]))
        part = mx.concatenate(products)
        mx.eval(part)
        # a copy outside the graph: under a vjp the evaluated part would keep its block of
        # float32 experts alive through the graph until the whole product is done
        parts.append(mx.array(np.array(part)))
    out_dims = stack.shape[1] if transposed else stack.shape[2]
    if not parts:
        return mx.zeros((*rows.shape[:-1], out_dims), mx.float32)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return mx.concatenate(parts)[mx.array(inverse)]
