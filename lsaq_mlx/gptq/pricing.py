"""How much GPTQ lowers each candidate's error: a cost model for choices written with
GPTQ, measured against the planner's (``benchmarks/quality_table.py --priced``).

For each linear module and affine choice: the ratio of the output error
``tr(dW H dW^T)`` after GPTQ to that after round to nearest, on a sample of the
module's rows (GPTQ treats rows independently, so a sample estimates the whole), GPTQ
fitted on one half of the calibration sequences and both errors measured on the other:
measured on the inputs it was fitted to, the gain is overstated. Multiplying the cost
table's round-to-nearest errors by it would let the knapsack spend bits where
compensation helps least; measured, it makes plans worse (the local gain overstates
the gain at the logits), so the planner does not use it; see docs/plans.md. All bit widths of a group size run through
GPTQ together, as stacked rows. Cached as JSON next to the cost table.
"""

import math

import mlx.core as mx
import numpy as np

from lsaq_mlx.backend.hybrid import float_weight
from lsaq_mlx.cache import cache_entry, fingerprint_bytes, read_cache_json, write_json_atomic
from lsaq_mlx.gptq.hessians import SEQ_LEN, TOKENS, calibration_tokens, each_layer_hessians
from lsaq_mlx.gptq.row_errors import row_output_errors
from lsaq_mlx.gptq.solver import DAMP, compensated_codes, hessian_factor
from lsaq_mlx.planning.choices import Affine
from lsaq_mlx.planning.affine_error import roundtrip
from lsaq_mlx.progress import progress_bar

RATIO_VERSION = 4  # part of the table's key: bump when GPTQ or the estimate changes
SAMPLE_ROWS = 64


def compensation_ratios(weight: mx.array, hessians: tuple[np.ndarray, np.ndarray], choices: list[Affine]) -> dict[str, float]:
    """``{choice.key: GPTQ error / round-to-nearest error}`` on a sample of ``weight``'s
    rows, GPTQ fitted with ``hessians[0]``, errors measured with ``hessians[1]``."""
    w = np.array(weight[mx.array(_sample(weight.shape[0]))].astype(mx.float32))
    factor, hessian = hessian_factor(hessians[0]), hessians[1]
    ratios = {}
    for size in sorted({c.group_size for c in choices}):
        group = [c for c in choices if c.group_size == size]
        bits = np.repeat([c.bits for c in group], len(w))
        codes, scales, biases = compensated_codes(np.tile(w, (len(group), 1)), factor, bits, size)
        gptq = codes * np.repeat(scales.astype(np.float32), size, axis=1) + np.repeat(biases.astype(np.float32), size, axis=1)
        rtn = np.concatenate([np.array(roundtrip(mx.array(w), c)) for c in group])
        wide = np.tile(w, (len(group), 1))
        for c, g, r in zip(group, _errors(gptq - wide, hessian, len(group)), _errors(rtn - wide, hessian, len(group))):
            ratios[c.key] = g / r if r > 0 else 1.0
    return ratios


def _sample(rows: int) -> np.ndarray:
    return np.unique(np.linspace(0, rows - 1, min(rows, SAMPLE_ROWS)).round().astype(np.int64))


def _errors(d: np.ndarray, hessian: np.ndarray, parts: int) -> np.ndarray:
    """``tr(d_k H d_k^T)`` of each of ``parts`` equal row blocks of ``d``."""
    return row_output_errors(d, hessian).reshape(parts, -1).sum(axis=1)


def ratio_table(fingerprint: str, calib, ctx, streamed, tokenizer) -> dict[str, dict[str, float]]:
    """``{path: {choice.key: ratio}}`` for the linear modules of ``ctx`` and an embedding
    tied to the LM head (other embeddings have none: they stay round to nearest), from
    the cache or computed on ``streamed``."""
    path = cache_entry("errors", fingerprint) / f"gptq-{_key(fingerprint, calib)}.json"
    expected = {q.path: {c.key for c in q.choices() if isinstance(c, Affine)} for q in ctx.modules}
    table = read_cache_json(path, "GPTQ ratio table", lambda d: _check(d, expected))
    if table is not None:
        return table
    table = {}
    modules = {q.path: q for q in ctx.modules}

    def on_modules(loaded, hessians, _layer):
        for p, module in loaded.items():
            choices = [c for c in modules[p].choices() if isinstance(c, Affine)]
            table[p] = compensation_ratios(float_weight(module), hessians[p], choices)

    tokens = calibration_tokens(tokenizer, calib)
    with progress_bar("GPTQ pricing (layer by layer)", len(streamed.layers) + 1) as advance:
        each_layer_hessians(streamed, tokens, set(expected), on_modules, advance, halves=True)
    write_json_atomic(path, table)
    return table


def _key(fingerprint: str, calib) -> str:
    return fingerprint_bytes(fingerprint, calib.fingerprint, str(TOKENS), str(SEQ_LEN), str(DAMP), str(SAMPLE_ROWS),
                             str(RATIO_VERSION))


def _check(data, expected: dict) -> dict:
    """``data`` if its modules are some of this model's, each with a finite ratio per choice."""
    if not isinstance(data, dict) or not set(data) <= set(expected):
        raise ValueError("its modules are not this model's")
    for p, ratios in data.items():
        if (not isinstance(ratios, dict) or set(ratios) != expected[p]
                or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r >= 0
                           for r in ratios.values())):
            raise ValueError(f"the ratios of {p} are malformed")
    return data

