"""Causal attention in query blocks, for long prompts on MLX's CPU backend.

There ``mx.fast.scaled_dot_product_attention`` computes all L x L scores and masks
the upper triangle, and its softmax exponentials (single-threaded, 10-20 ns each on
our x86 machines) are a third of a forward pass over 512 tokens. Queries split into
blocks, each attending only to keys up to its own end, skip most masked scores; the
masked ones only ever added exact zeros, so the outputs are the same numbers.
"""

from contextlib import contextmanager

import mlx.core as mx

from lsaq_mlx.backend.compute import backend

QUERY_BLOCK = 64


def blockwise_causal(sdpa):
    """``sdpa`` with "causal" self-attention over more than one query block split by blocks."""

    def attention(queries, keys, values, *args, mask=None, **kwargs):
        length = queries.shape[-2]
        if not (isinstance(mask, str) and mask == "causal") or keys.shape[-2] != length or length <= QUERY_BLOCK:
            return sdpa(queries, keys, values, *args, mask=mask, **kwargs)
        blocks = [
            sdpa(queries[..., start : start + QUERY_BLOCK, :], keys[..., : start + QUERY_BLOCK, :],
                 values[..., : start + QUERY_BLOCK, :], *args, mask="causal", **kwargs)
            for start in range(0, length, QUERY_BLOCK)
        ]
        return mx.concatenate(blocks, axis=-2)

    attention.blockwise = True
    return attention


@contextmanager
def causal_attention_in_blocks():
    """Within the block, models' causal attention on the CPU backend runs in query blocks."""
    original = mx.fast.scaled_dot_product_attention
    if backend() != "cpu" or getattr(original, "blockwise", False):
        yield
        return
    mx.fast.scaled_dot_product_attention = blockwise_causal(original)
    try:
        yield
    finally:
        mx.fast.scaled_dot_product_attention = original
