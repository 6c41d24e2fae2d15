"""Stacked experts (mlx-lm's ``SwitchLinear``) that compute in float32 a block of experts
at a time, holding their weights as stored (float16, bfloat16).

A decoder layer of a large mixture of experts is mostly its experts: 604 M weights in a
Qwen3-30B-A3B layer (2.4 GB in float32), 2.4 B in a Qwen3-235B-A22B one (9.7 GB). A
float32 copy of them, on top of the stored ones, was what set the memory of every
streamed stage. Here each call sorts its rows by expert and multiplies each block of
``EXPERT_BLOCK_BYTES`` upcast experts with the rows routed to it, evaluated before the
next block is upcast; the gradient with respect to the input (the Fisher's backward
pass) is computed the same way, the blocks upcast again rather than kept from the
forward. No gradient reaches the weights (the Fisher of experts is made from recorded
rows, ``planning.expert_fisher``).
"""

import mlx.core as mx
import numpy as np
from mlx_lm.models.switch_layers import SwitchLinear

EXPERT_BLOCK_BYTES = 64 << 20  # float32 bytes of the experts upcast at once


class BlockedSwitchLinear(SwitchLinear):
    def __call__(self, x, indices, sorted_indices=False):
        rows = mx.broadcast_to(x, (*indices.shape, *x.shape[-2:])).reshape(-1, *x.shape[-2:])
        out = _blocked_product(self["weight"])(rows, mx.stop_gradient(indices).flatten())
        out = out.reshape(*indices.shape, *out.shape[-2:])
        if "bias" in self:
            out = out + mx.expand_dims(self["bias"][indices], -2).astype(mx.float32)
        return out


def make_blocked(module) -> bool:
    """Turn an mlx-lm ``SwitchLinear`` into a ``BlockedSwitchLinear`` in place (same
    fields); False for other modules."""
    if type(module) is not SwitchLinear:
        return isinstance(module, BlockedSwitchLinear)
    module.__class__ = BlockedSwitchLinear
    return True


def _blocked_product(weight: mx.array):
    """``f(rows, experts)``: each row (``n x m x in``) times the transposed weight of its
    expert, differentiable with respect to the rows."""

    @mx.custom_function
    def product(rows, experts):
        return _by_blocks(rows, experts, weight, transposed=True)

    @product.vjp
    def product_vjp(primals, cotangent, output):
        rows, experts = primals
        return _by_blocks(cotangent, experts, weight, transposed=False), mx.zeros_like(experts)

    return product


def _by_blocks(rows: mx.array, experts: mx.array, weight: mx.array, transposed: bool) -> mx.array:
    """``rows[i] @ W[experts[i]].T`` (or ``@ W[experts[i]]``), a block of experts at a time,
    each expert's rows in one BLAS product (MLX's CPU ``gather_mm`` is ~30x slower)."""
    count = weight.shape[0]
    per_block = max(1, EXPERT_BLOCK_BYTES // (4 * weight[0].size))
    ids = np.array(experts).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    starts = np.searchsorted(ids[order], np.arange(count + 1))
    sorted_rows = rows[mx.array(order)].astype(mx.float32)
    parts = []
    for first in range(0, count, per_block):
        last = min(count, first + per_block)
        if starts[last] == starts[first]:
            continue
        block = weight[first:last].astype(mx.float32)
        products = []
        for e in range(first, last):
            x = sorted_rows[int(starts[e]) : int(starts[e + 1])]
            if x.shape[0]:
                w = block[e - first].T if transposed else block[e - first]
                products.append((x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1]))
        part = mx.concatenate(products)
        mx.eval(part)
        # a copy outside the graph: under a vjp the evaluated part would keep its block of
        # float32 experts alive through the graph until the whole product is done
        parts.append(mx.array(np.array(part)))
    out_dims = weight.shape[1] if transposed else weight.shape[2]
    if not parts:
        return mx.zeros((*rows.shape[:-1], out_dims), mx.float32)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return mx.concatenate(parts)[mx.array(inverse)]
