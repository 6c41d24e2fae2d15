"""A smaller setting stored as the steps its codes take from the folder's stored weights
rounded onto its grid (its own scales and biases): a swap without the setting would
round the stored weights anyway, and the quantizer's codes differ from that rounding in
about one code in nine (GPTQ on SmolLM2, 3-4 bits from 6), mostly by one step. So
instead of b bits a weight the setting costs its scales and biases plus:

- ``changed``: one bit a code (packed, row-major), set where the code is not the rounding;
- ``lowered``: one bit a changed code, set where it is below the rounding;
- ``far``: one bit a changed code, set where it is more than one step away;
- ``distances``: how many steps each far code is away (uint8).

On SmolLM2 that is about 0.65 bits a weight after the store's zstd, against 3-4 for the
codes (``benchmarks/results/smollm2-adaptive-awq-gptq.json``). The rounding is computed
in numpy float32, operation by operation (no fused multiply-add), so a Mac rebuilds
exactly the codes a Linux converter stored. Anything that does not add up (counts,
sizes, codes out of range) is refused with ``ValueError``.
"""

import numpy as np

from lsaq_mlx.gptq.packing import pack_codes, unpack_codes
from lsaq_mlx.planning.choices import Affine

STEP_PARAMS = ("changed", "lowered", "far", "distances")
ROW_BLOCK_WEIGHTS = 1 << 20  # codes handled at once: 2.5-3x faster than 16 M here (cache)


def code_steps(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, choice: Affine, top: dict,
               top_choice: Affine) -> dict[str, np.ndarray]:
    """The steps (``STEP_PARAMS``) of ``codes`` (packed uint32, a matrix or stacked
    experts, with their float16 ``scales`` and ``biases``) from ``top`` (the stored
    module's ``weight``, ``scales`` and ``biases``, at ``top_choice``) rounded onto
    their grid."""
    codes, scales, biases, top = _matrices(codes, scales, biases, top)
    changed, lowered, far, distances = [], [], [], []
    for rows in _row_blocks(scales.shape[0], _columns(scales, choice)):
        steps = unpack_codes(codes[rows], choice.bits).astype(np.int16) - _rounded(top, top_choice, rows, scales,
                                                                                   biases, choice)
        moved = steps[steps != 0]
        changed.append(np.packbits(steps != 0))
        lowered.append(moved < 0)
        far.append(np.abs(moved) > 1)
        distances.append(np.abs(moved[np.abs(moved) > 1]).astype(np.uint8))
    return {"changed": np.concatenate(changed), "lowered": np.packbits(np.concatenate(lowered)),
            "far": np.packbits(np.concatenate(far)), "distances": np.concatenate(distances)}


def codes_from_steps(steps: dict, scales: np.ndarray, biases: np.ndarray, choice: Affine, top: dict,
                     top_choice: Affine) -> np.ndarray:
    """The packed codes ``code_steps`` was given, of the same steps, scales, biases and
    stored module, a row block at a time (no array of the whole module's flags);
    ``ValueError`` where the steps do not fit them."""
    shape = scales.shape
    _, scales, biases, top = _matrices(None, scales, biases, top)
    count, cols = scales.shape[0], _columns(scales, choice)
    changed, lowered, far, distances = (_array(steps, p) for p in STEP_PARAMS)
    if changed.size != count * cols // 8:
        raise ValueError(f"changed holds {changed.size} bytes, not {count * cols // 8}")
    moves = int(_ONES[changed].sum(dtype=np.int64))
    if lowered.size != -(-moves // 8) or far.size != lowered.size:
        raise ValueError(f"{moves} changed codes need {-(-moves // 8)} bytes of lowered and far flags")
    out, done, far_done = np.empty((count, cols * choice.bits // 32), np.uint32), 0, 0
    for rows in _row_blocks(count, cols):
        block = _rounded(top, top_choice, rows, scales, biases, choice)
        where = np.unpackbits(changed[rows.start * cols // 8 : rows.stop * cols // 8]).astype(bool).reshape(block.shape)
        k = int(where.sum())
        size = np.ones(k, np.int16)
        is_far = _bits(far, done, k)
        if far_done + int(is_far.sum()) > distances.size:
            raise ValueError(f"more far codes than the {distances.size} distances")
        size[is_far] = distances[far_done : far_done + int(is_far.sum())]
        block[where] += np.where(_bits(lowered, done, k), -size, size)
        done, far_done = done + k, far_done + int(is_far.sum())
        if block.min(initial=0) < 0 or block.max(initial=0) >= 1 << choice.bits:
            raise ValueError(f"the steps lead out of {choice.bits}-bit codes")
        out[rows] = pack_codes(block.astype(np.uint8), choice.bits)
    if far_done != distances.size:
        raise ValueError(f"{far_done} far codes, {distances.size} distances")
    return out.reshape(*shape[:-1], out.shape[-1])


_ONES = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1)  # set bits of each byte


def _bits(packed: np.ndarray, start: int, count: int) -> np.ndarray:
    """Bits ``start .. start + count - 1`` of ``packed`` (as ``np.packbits`` packs them)."""
    first = start // 8
    return np.unpackbits(packed[first : -(-(start + count) // 8)])[start - 8 * first :][:count].astype(bool)


def _array(steps: dict, name: str) -> np.ndarray:
    value = steps.get(name)
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 1:
        raise ValueError(f"{name} is not a list of bytes")
    return value


def _matrices(codes, scales, biases, top: dict):
    """Stacked experts as one matrix of all their rows (groups run along the rows)."""
    flat = lambda a: None if a is None else a.reshape(-1, a.shape[-1])  # noqa: E731
    top = {k: flat(top.get(k)) for k in ("weight", "scales", "biases")}
    if any(a is None or a.shape[0] != flat(scales).shape[0] for a in (*top.values(), flat(biases))):
        raise ValueError("the stored module and the setting have different rows")
    return flat(codes), flat(scales), flat(biases), top


def _columns(scales: np.ndarray, choice: Affine) -> int:
    return scales.shape[1] * choice.group_size


def _row_blocks(count: int, cols: int):
    step = max(8, ROW_BLOCK_WEIGHTS // cols // 8 * 8)  # whole bytes of ``changed`` per block
    return [slice(r, min(count, r + step)) for r in range(0, count, step)]


def _rounded(top: dict, top_choice: Affine, rows: slice, scales: np.ndarray, biases: np.ndarray, choice: Affine) -> np.ndarray:
    """Rows ``rows`` of the stored weights rounded onto ``choice``'s grid (int16)."""
    weights = _stored_rows(top, top_choice, rows)
    s = scales[rows].astype(np.float32)[..., None]
    b = biases[rows].astype(np.float32)[..., None]
    groups = weights.reshape(weights.shape[0], -1, choice.group_size)
    if groups.shape[1] != s.shape[1]:
        raise ValueError(f"the stored weights have {weights.shape[1]} columns, the scales {s.shape[1]} groups")
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.rint(np.divide(np.subtract(groups, b), s))
    levels = np.nan_to_num(levels, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(levels, 0, (1 << choice.bits) - 1).astype(np.int16).reshape(weights.shape)


def _stored_rows(top: dict, top_choice: Affine, rows: slice) -> np.ndarray:
    """Float32 rows of the stored module: its codes times scales plus biases."""
    codes = unpack_codes(top["weight"][rows], top_choice.bits).astype(np.float32)
    groups = codes.reshape(codes.shape[0], -1, top_choice.group_size)
    s = top["scales"][rows].astype(np.float32)[..., None]
    b = top["biases"][rows].astype(np.float32)[..., None]
    if groups.shape[1] != s.shape[1]:
        raise ValueError(f"the stored codes have {codes.shape[1]} columns, their scales {s.shape[1]} groups")
    return np.add(np.multiply(groups, s), b).reshape(codes.shape)
