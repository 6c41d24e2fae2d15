"""A smaller setting stored as steps from the folder's stored weights: a swap without
the setting would round the stored weights anyway, and what the quantizer made is close
to that. Its grid (each group's float16 scale and bias) is stored as the steps of their
bit patterns from the grid ``mx.quantize`` would give the stored weights (recomputed
here in numpy), and its codes as the steps they take from the stored weights rounded
onto its grid: GPTQ's codes differ from that rounding in about one code in nine (on
SmolLM2, 3-4 bits from 6), mostly by one step. So instead of b bits a weight and a scale
and a bias a group, the setting keeps:

- ``changed_0`` .. ``changed_4``: one bit a code, set where the code is not the rounding,
  in five packed streams by how far the stored weight lies from its level (bands below
  0.15, 0.3, 0.4, 0.5 steps and beyond), each in row-major order: GPTQ changes about 1 %
  of the codes in the first band and 30 % in the last two, and each stream codes to its
  own odds;
- ``away``: one bit a changed code, set where it moved away from the stored weight
  (rare: a changed code nearly always crosses the middle toward it);
- ``far``: one bit a changed code, set where it is more than one step away;
- ``distances``: how many steps each far code is away (uint8);
- ``scale_steps``, ``bias_steps``: each group's float16 bits minus the predicted ones
  (modulo 2^16), low bytes then high bytes.

On SmolLM2's awq-gptq settings that is about 0.72 bits a weight after the store's zstd
(0.90 with one stream of changed flags and a down-or-up flag each), against 3.0 as
codes, scales and biases. Everything is computed in numpy float32, one
operation at a time (no fused multiply-add), so a Mac rebuilds exactly the setting a
Linux converter stored. Anything that does not add up (counts, sizes, codes out of
range) is refused with ``ValueError``.
"""

import numpy as np

from lsaq_mlx.gptq.packing import pack_codes, unpack_codes
from lsaq_mlx.planning.choices import Affine
from lsaq_mlx.storage.ahead import computed_ahead

# A code's band by its weight's distance from its level, in twentieths of a step: below
# 0.15, 0.3, 0.4, 0.5 and beyond (clipped).
_BAND_OF_TWENTIETH = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4], np.uint8)
CHANGED = tuple(f"changed_{k}" for k in range(int(_BAND_OF_TWENTIETH.max()) + 1))
STEP_PARAMS = (*CHANGED, "away", "far", "distances", "scale_steps", "bias_steps")
ROW_BLOCK_WEIGHTS = 1 << 20  # codes handled at once: 2.5-3x faster than 16 M here (cache)


def setting_steps(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, choice: Affine, top: dict,
                  top_choice: Affine) -> dict[str, np.ndarray]:
    """The steps (``STEP_PARAMS``) of a setting (``codes``: packed uint32, a matrix or
    stacked experts, with their float16 ``scales`` and ``biases``) from ``top`` (the
    stored module's ``weight``, ``scales`` and ``biases``, at ``top_choice``)."""
    top, (codes, scales, biases) = _matrices(top, codes, scales, biases)
    flags = {name: _Flags() for name in (*CHANGED, "away", "far")}
    distances, grid = [], []

    def block_steps(rows: slice):
        stored = _stored_rows(top, top_choice, rows)
        grid_steps = [_bits_of(made) - _bits_of(p) for made, p in zip((scales[rows], biases[rows]),
                                                                       _predicted_grid(stored, choice))]
        rounded, offset = _rounded(stored, scales[rows], biases[rows], choice)
        steps = unpack_codes(codes[rows], choice.bits).astype(np.int16) - rounded
        moved = steps != 0
        return grid_steps, [moved.ravel()[p] for p in _bands(offset)], steps[moved], offset[moved] < 0

    blocks = _row_blocks(scales.shape[0], _columns(scales, choice))
    for grid_steps, bands, moved, below in computed_ahead(block_steps, blocks):
        grid.append(grid_steps)
        for name, band in zip(CHANGED, bands):
            flags[name].add(band)
        is_far = np.abs(moved) > 1
        flags["away"].add((moved > 0) == below)
        flags["far"].add(is_far)
        distances.append(np.abs(moved[is_far]).astype(np.uint8))
    scale_steps, bias_steps = (np.concatenate([g[i].ravel() for g in grid]) for i in (0, 1))
    return {name: f.packed() for name, f in flags.items()} | {
        "distances": np.concatenate(distances), "scale_steps": _split(scale_steps), "bias_steps": _split(bias_steps)}


def setting_from_steps(steps: dict, choice: Affine, top: dict, top_choice: Affine, empty=np.empty) -> tuple:
    """``(codes, scales, biases)``: the setting ``setting_steps`` was given, of its
    steps from the same stored module, a row block at a time (no array of the whole
    module's flags); ``ValueError`` where the steps do not fit it. Each of the three is
    ``empty(shape, dtype)`` (called in that order), filled."""
    lead = np.shape(top.get("weight"))[:-1]  # stacked experts: (experts, rows)
    top, _ = _matrices(top)
    cols = top["weight"].shape[1] * 32 // top_choice.bits
    if cols % choice.group_size:
        raise ValueError(f"{cols} columns do not make groups of {choice.group_size}")
    count, groups = top["weight"].shape[0], cols // choice.group_size
    changed = [_array(steps, name) for name in CHANGED]
    away, far, distances, scale_steps, bias_steps = (_array(steps, p) for p in STEP_PARAMS[len(CHANGED):])
    if scale_steps.size != 2 * count * groups or bias_steps.size != scale_steps.size:
        raise ValueError(f"{count * groups} groups need {2 * count * groups} bytes of scale and bias steps")
    moves = sum(int(_ONES[c].sum(dtype=np.int64)) for c in changed)
    if away.size != -(-moves // 8) or far.size != away.size:
        raise ValueError(f"{moves} changed codes need {-(-moves // 8)} bytes of away and far flags")
    scale_steps, bias_steps = _joined(scale_steps), _joined(bias_steps)
    out = [empty((*lead, width), dtype) for width, dtype in
           ((cols * choice.bits // 32, np.uint32), (groups, np.float16), (groups, np.float16))]
    codes, scales, biases = (a.reshape(count, a.shape[-1]) for a in out)  # views: out is C-contiguous
    read, done, far_done = [0] * len(CHANGED), 0, 0

    def block_rounded(rows: slice):
        stored = _stored_rows(top, top_choice, rows)
        grid = [(_bits_of(p) + made[rows.start * groups : rows.stop * groups].reshape(p.shape)).view(np.float16)
                for made, p in zip((scale_steps, bias_steps), _predicted_grid(stored, choice))]
        block, offset = _rounded(stored, *grid, choice)
        return rows, grid, block, offset, _bands(offset)

    for rows, grid, block, offset, bands in computed_ahead(block_rounded, _row_blocks(count, cols)):
        scales[rows], biases[rows] = grid
        if any(r + p.size > 8 * stream.size for r, p, stream in zip(read, bands, changed)):
            raise ValueError("the changed flags hold too few bytes for the codes they flag")
        where = np.zeros(block.size, bool)
        for stream, r, p in zip(changed, read, bands):
            where[p[_bits(stream, r, p.size)]] = True
        where = np.flatnonzero(where)  # indices, once: each boolean mask below would be a pass of its own
        read = [r + p.size for r, p in zip(read, bands)]
        k = where.size
        size = np.ones(k, np.int16)
        is_far = _bits(far, done, k)
        if far_done + int(is_far.sum()) > distances.size:
            raise ValueError(f"more far codes than the {distances.size} distances")
        size[is_far] = distances[far_done : far_done + int(is_far.sum())]
        up = _bits(away, done, k) != (offset.reshape(-1)[where] >= 0)
        block.reshape(-1)[where] += np.where(up, size, -size)
        done, far_done = done + k, far_done + int(is_far.sum())
        if block.min(initial=0) < 0 or block.max(initial=0) >= 1 << choice.bits:
            raise ValueError(f"the steps lead out of {choice.bits}-bit codes")
        codes[rows] = pack_codes(block.astype(np.uint8), choice.bits)
    if any(stream.size != -(-n // 8) for stream, n in zip(changed, read)):
        raise ValueError("the changed flags hold more bytes than the codes they flag")
    if far_done != distances.size:
        raise ValueError(f"{far_done} far codes, {distances.size} distances")
    return tuple(out)


class _Flags:
    """Flags packed as they come (``np.packbits`` order), the last partial byte carried."""

    def __init__(self):
        self.bytes, self.rest = [], np.zeros(0, bool)

    def add(self, flags: np.ndarray) -> None:
        flags = np.concatenate([self.rest, flags.ravel()])
        whole = flags.size // 8 * 8
        self.bytes.append(np.packbits(flags[:whole]))
        self.rest = flags[whole:]

    def packed(self) -> np.ndarray:
        return np.concatenate([*self.bytes, np.packbits(self.rest)])


def _bands(offset: np.ndarray) -> list[np.ndarray]:
    """The positions (row-major) of the codes each ``changed_k`` stream flags: those in
    band ``k`` of ``|offset|``."""
    near = _BAND_OF_TWENTIETH[np.minimum(np.multiply(np.abs(offset.ravel()), np.float32(20)).astype(np.int32), 10)]
    return [np.flatnonzero(near == band) for band in range(len(CHANGED))]


_ONES = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1, dtype=np.uint8)  # set bits of each byte


def _bits(packed: np.ndarray, start: int, count: int) -> np.ndarray:
    """Bits ``start .. start + count - 1`` of ``packed`` (as ``np.packbits`` packs them)."""
    first = start // 8
    return np.unpackbits(packed[first : -(-(start + count) // 8)])[start - 8 * first :][:count].astype(bool)


def _bits_of(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float16).view(np.uint16)


def _split(words: np.ndarray) -> np.ndarray:
    """uint16 words as their low bytes, then their high bytes (each half codes better)."""
    return np.concatenate([(words & 0xFF).astype(np.uint8), (words >> 8).astype(np.uint8)])


def _joined(halves: np.ndarray) -> np.ndarray:
    n = halves.size // 2
    return halves[:n].astype(np.uint16) | (halves[n:].astype(np.uint16) << 8)


def _predicted_grid(stored: np.ndarray, choice: Affine) -> tuple[np.ndarray, np.ndarray]:
    """Each group's float16 scale and bias as ``mx.quantize`` makes them of ``stored``
    (its rows, float32): the range over the levels, its sign and edge set so that the
    edge of larger magnitude is a level."""
    groups = stored.reshape(stored.shape[0], -1, choice.group_size)
    lo, hi = groups.min(-1), groups.max(-1)
    scale = np.maximum(np.divide(np.subtract(hi, lo), np.float32((1 << choice.bits) - 1)), np.float32(1e-7))
    side = np.abs(lo) > np.abs(hi)
    scale = np.where(side, scale, -scale)
    edge = np.where(side, lo, hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        q0 = np.rint(np.divide(edge, scale))
        scale = np.where(q0 != 0, np.divide(edge, q0), scale)
    bias = np.where(q0 == 0, np.float32(0), edge)
    return scale.astype(np.float16), bias.astype(np.float16)


def _array(steps: dict, name: str) -> np.ndarray:
    value = steps.get(name)
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 1:
        raise ValueError(f"{name} is not a list of bytes")
    return value


def _matrices(top: dict, *arrays) -> tuple[dict, list]:
    """``top`` (the stored ``weight``, ``scales`` and ``biases``) and ``arrays`` with
    stacked experts as one matrix of all their rows (groups run along the rows), each
    checked to have the same rows."""
    if any(getattr(top.get(k), "ndim", 0) < 2 for k in ("weight", "scales", "biases")):  # arrays or row readers
        raise ValueError("the stored module is not quantized")
    top = {k: top[k].reshape(-1, top[k].shape[-1]) for k in ("weight", "scales", "biases")}
    arrays = [a.reshape(-1, a.shape[-1]) for a in arrays]
    if len({a.shape[0] for a in (*top.values(), *arrays)}) != 1:
        raise ValueError("the stored module and the setting have different rows")
    return top, arrays


def _columns(scales: np.ndarray, choice: Affine) -> int:
    return scales.shape[1] * choice.group_size


def _row_blocks(count: int, cols: int):
    step = max(1, ROW_BLOCK_WEIGHTS // cols)
    return [slice(r, min(count, r + step)) for r in range(0, count, step)]


def _rounded(stored: np.ndarray, scales: np.ndarray, biases: np.ndarray, choice: Affine) -> tuple:
    """``stored`` (float32 rows) rounded onto the grid of ``scales`` and ``biases``
    (int16 levels), and each weight's offset from its level, in steps (float32)."""
    s = scales.astype(np.float32)[..., None]
    b = biases.astype(np.float32)[..., None]
    groups = stored.reshape(stored.shape[0], -1, choice.group_size)
    if groups.shape[1] != s.shape[1]:
        raise ValueError(f"the stored weights have {stored.shape[1]} columns, the scales {s.shape[1]} groups")
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.divide(np.subtract(groups, b), s)
    levels = np.nan_to_num(levels, nan=0.0, posinf=0.0, neginf=0.0)
    rounded = np.clip(np.rint(levels), 0, (1 << choice.bits) - 1)
    return rounded.astype(np.int16).reshape(stored.shape), np.subtract(levels, rounded).reshape(stored.shape)


def _stored_rows(top: dict, top_choice: Affine, rows: slice) -> np.ndarray:
    """Float32 rows of the stored module: its codes times scales plus biases."""
    codes = unpack_codes(top["weight"][rows], top_choice.bits).astype(np.float32)
    groups = codes.reshape(codes.shape[0], -1, top_choice.group_size)
    s = top["scales"][rows].astype(np.float32)[..., None]
    b = top["biases"][rows].astype(np.float32)[..., None]
    if groups.shape[1] != s.shape[1]:
        raise ValueError(f"the stored codes have {codes.shape[1]} columns, their scales {s.shape[1]} groups")
    return np.add(np.multiply(groups, s), b).reshape(codes.shape)
