"""A plan's linear modules quantized with calibration (``quantizers.Quantizer``): one
streamed pass (``hessians``) gives each module's input Hessian while its layer is
loaded; the layer's groups are equalized first where asked (``equalization``), then
each module is quantized at its planned bits and group size, with GPTQ or round to
nearest, and written to a scratch folder, one safetensors file per layer; the next
layer is calibrated on this one's output as written (dequantized). The LM head
goes through GPTQ in row blocks (it is not equalized: fed by the final norm that the
lens reads), and so does an embedding tied to it, as the head, up to
``TIED_HEAD_MAX_BITS``. Other embeddings are lookups without an input Hessian: round to
nearest.
"""

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from lsaq_mlx.backend.expert_blocks import experts_of
from lsaq_mlx.backend.hybrid import float_weight
from lsaq_mlx.equalization.clipping import UNCLIPPED
from lsaq_mlx.equalization.groups import folded_source, scale_groups
from lsaq_mlx.equalization.search import equalizing_scales
from lsaq_mlx.gptq.hessians import (CalibratedLayer, SpilledHessians, each_layer_hessians, head_path, input_key,
                                   scale_hessian)
from lsaq_mlx.gptq.codes import ROW_BLOCK_BYTES
from lsaq_mlx.gptq.row_errors import row_output_errors
from lsaq_mlx.gptq.solver import AffineCodes, ExpertHessians, ModuleInputs
from lsaq_mlx.planning.choices import Affine
from lsaq_mlx.quantizers import QUANTIZERS

FOLD_TOLERANCE = 1e-3  # relative change of a layer's float output that makes a fold wrong
# An embedding tied to the LM head goes through GPTQ as the head up to these bits; above,
# round to nearest. GPTQ lowers the head's error but moves the rows the lookups read,
# which the head's Hessian does not weigh. Default model, awq-gptq, KL on WikiText with
# the embedding at 4 / 5 / 8 bits: GPTQ 0.460 / 0.0486 / 0.0122, rounded 0.505 / 0.0576 / 0.0104.
TIED_HEAD_MAX_BITS = 5


@dataclass
class CalibrationCounts:
    """What calibration did: how many scale groups were equalized, of those searched,
    and which were refused;
    how many experts were calibrated on their routed tokens, and how many too few
    tokens reached (rounded to nearest)."""

    equalized: int = 0
    searched: int = 0
    refused: list[str] = field(default_factory=list)
    experts_calibrated: int = 0
    experts_rounded: int = 0
    rows: int = 0  # rows checked on held-out inputs
    rows_rounded: int = 0  # of those, rows where round to nearest did better and was kept
    layers: int = 0  # decoder layers checked whole on held-out inputs
    layers_rounded: int = 0  # of those, layers written as round to nearest writes them (no equalization)


def calibrated_weights(streamed, tokens: mx.array, choices: dict, scratch: Path, quantizer, progress=None,
                       count: CalibrationCounts | None = None, held_out: int = 0, also=None,
                       equalize_for: dict | None = None, tracks: list | None = None) -> dict[str, dict]:
    """``{path: {param: array}}`` (lazily read from ``scratch``) of every linear module
    of ``choices`` (path -> planned choice) with an affine choice, quantized by
    ``quantizer`` on ``tokens`` (batch, length), plus the norms that equalization
    changed. Without GPTQ the LM head is left to the caller (round to nearest). With
    ``held_out`` (the last sequences of ``tokens``, not fitted on), each row of a module
    keeps the quantizer's codes or round to nearest's, whichever gives the lower output
    error on the held-out inputs (``never_worse_than_rounding``), and then each decoder
    layer is written as calibrated or as ``rtn`` writes it, whichever changes the
    layer's output on held-out inputs less (``_better_layer``: equalization's folds
    and the nonlinear parts of a layer are seen there, not by a row's error). ``also(path, weight,
    bias, H, codes, choice, codes_at)`` is called with each linear module's codes (stacked experts too) while
    its layer is loaded; ``codes_at(other_choice)`` makes the same module's codes at
    another setting, the same way (an adaptive folder's smaller settings; an embedding
    tied to the head goes through GPTQ at those up to ``TIED_HEAD_MAX_BITS`` even where
    its planned setting is above them and rounded);
    ``equalize_for``: the settings equalization searches its scales for, where they are
    not the planned ones (one set of scales serves all of an adaptive folder's plans).
    ``tracks``: other plans' choices (path -> choice; an adaptive folder's smaller
    plans), each calibrated on an activation track of its own: the calibration batch
    once more, passed through each layer as that plan writes it, and ``codes_at(choice)``
    fitted on the inputs of the tracks whose plan gives the module ``choice``, stacked
    experts on each expert's tokens routed in those tracks (a direct convert of each
    plan calibrates on its own plan's layers)."""
    affine = {p: c for p, c in choices.items() if isinstance(c, Affine)}
    head = head_path(streamed.model)
    tied = head is not None and head != "lm_head"
    # rounded as planned, but an adaptive folder's smaller settings of it may be within GPTQ's bits
    rounded_head = head if tied and head in affine and affine[head].bits > TIED_HEAD_MAX_BITS else None
    if not quantizer.uses_hessian or (rounded_head and also is None):
        affine.pop(head, None)
    count = count if count is not None else CalibrationCounts()
    written: dict[str, dict] = {}

    tracks = tracks or []

    def on_modules(modules: dict, hessians: dict, layer: CalibratedLayer | None):
        equalizing = quantizer.equalize and layer is not None
        made = {}  # (path, choice) -> codes, for the tracks' outputs
        # Equalization scales whole matrices (never stacked experts); otherwise row blocks
        # are upcast as they are quantized and experts read one at a time, so the LM head
        # and a layer's experts are never in float32 at once.
        weights = {p: experts_of(m) if isinstance(hessians[p], ExpertHessians) else
                   float_weight(m).astype(mx.float32) if equalizing else float_weight(m) for p, m in modules.items()}
        biases = {p: m.bias for p, m in modules.items() if "bias" in m}
        arrays = {}
        if equalizing:
            arrays = _equalize(layer, affine | (equalize_for or {}), weights, biases, hessians, count)
        fitted_on = _TrackHessians(hessians, tracks)
        for path in modules:
            h = hessians[path]
            clip = quantizer.equalize and not path.endswith(UNCLIPPED)
            if isinstance(h, ExpertHessians):
                codes = _expert_codes(quantizer, weights[path], h, affine[path], clip, count)
                if also is not None:
                    def expert_codes_at(choice, path=path, clip=clip):
                        h = fitted_on.experts(path, choice, affine[path])
                        made[path, choice] = _expert_codes(quantizer, weights[path], h, choice, clip, CalibrationCounts())
                        return made[path, choice] if tracks else made.pop((path, choice))

                    also(path, weights[path], biases.get(path), h, codes, affine[path], expert_codes_at)
            else:
                def codes_at(choice, path=path, clip=clip, tally=CalibrationCounts()):
                    if (path, choice) in made:
                        return made[path, choice]
                    if path == rounded_head and choice.bits > TIED_HEAD_MAX_BITS:
                        return QUANTIZERS["rtn"].codes(weights[path], None, choice, False)
                    inputs, check = fitted_on(path, choice, affine[path])
                    codes = quantizer.codes(weights[path], inputs, choice, clip)
                    if check is not None:
                        codes = never_worse_than_rounding(codes, weights[path], choice, check, tally)
                    if tracks:
                        made[path, choice] = codes
                    return codes

                codes = codes_at(affine[path], tally=count)
                if also is not None:
                    also(path, weights[path], biases.get(path), h, codes, affine[path], codes_at)
            if path != rounded_head:  # that one is written by rounding, as without ``also``
                arrays |= _named(path, codes, biases.get(path))
        if layer is not None and layer.held_in is not None and also is None:
            arrays = _better_layer(layer, modules, hessians, affine, arrays, count)
        if arrays:
            written.update(_save(arrays, Path(scratch) / f"{len(written)}.safetensors"))
        if layer is not None and arrays:
            # the next layer is calibrated on what this one computes (each track: as its plan writes it)
            return _as_written(arrays, layer.prefix, affine) if not tracks else \
                [_as_written(a, layer.prefix, c) for a, c in _track_arrays(arrays, modules, affine, tracks, made, biases)]
        return None

    each_layer_hessians(streamed, tokens, set(affine), on_modules, progress, held_out=held_out, copies=1 + len(tracks),
                        spill=Path(scratch) / "tracks" if tracks else None)
    return written


class _TrackHessians:
    """``(path, choice, planned) -> (ModuleInputs, held-out H or None)``: the planned
    track's for the planned choice (or without tracks), else their sums over the
    tracks whose plan gives ``path`` ``choice``. Modules reading the same input share
    the planned track's ``ModuleInputs``; of the tracks' sums only the last is kept
    (each is as large as the planned one, and tracks may wait on disk)."""

    def __init__(self, hessians, tracks: list):
        self.hessians, self.tracks = hessians, tracks
        self._inputs: dict[int, ModuleInputs] = {}  # by the planned H's identity
        self._last: tuple = (None, None)

    def __call__(self, path: str, choice, planned):
        users = self._users(path, choice)
        if choice == planned or not users:
            h = self.hessians[path]
            return self._inputs.setdefault(id(h), ModuleInputs(h)), getattr(self.hessians, "held_out", {}).get(path)
        key = (input_key(path), tuple(map(id, users)))
        if self._last[0] != key:
            self._last = (None, None)  # freed before the next is made
            fresh = all(isinstance(t, SpilledHessians) for t in users)
            self._last = key, (ModuleInputs(_added((t[path] for t in users), fresh)),
                               _added((t.held_out.get(path) for t in users), fresh))
        return self._last[1]

    def experts(self, path: str, choice, planned) -> ExpertHessians:
        """Stacked experts' inputs for ``choice``: the planned track's, else those of the
        tracks whose plan gives ``path`` ``choice`` (summed once per call: a layer's
        expert Hessians are large, and each setting is made once)."""
        users = [t[path] for t in self._users(path, choice)]
        if choice == planned or not users:
            return self.hessians[path]
        return users[0] if len(users) == 1 else ExpertHessians.summed(users)

    def _users(self, path: str, choice) -> list:
        return [t for t, plan in zip(getattr(self.hessians, "tracks", []), self.tracks) if plan.get(path) == choice]


def _added(arrays, fresh: bool):
    """The sum of ``arrays`` (read one at a time), or None where one is None; ``fresh``:
    each is read anew (``SpilledHessians``), so the first is summed into in place."""
    total = None
    for a in arrays:
        if a is None:
            return None
        if total is None:
            total = a if fresh else a.copy()
        else:
            total += a
        del a  # before the next is read
    return total


def _track_arrays(arrays: dict, modules: dict, affine: dict, tracks: list, made: dict, biases: dict):
    """``(arrays, choices)`` of the layer as the planned choices, then as each track's
    plan writes it (its modules at other settings: their codes in ``made``)."""
    yield arrays, affine
    for plan in tracks:
        own, choices = dict(arrays), dict(affine)
        for path in modules:
            choice = plan.get(path)
            if choice is not None and choice != affine.get(path) and (path, choice) in made:
                own |= _named(path, made[path, choice], biases.get(path))
                choices[path] = choice
        yield own, choices


def _as_written(arrays: dict, prefix: str, affine: dict) -> dict[str, mx.array]:
    """The layer's parameters (names relative to it) that ``arrays`` (its written
    modules and folded norms) give it, quantized modules dequantized to float32; stacked
    experts as their codes, scales and biases (``backend.expert_blocks.experts_held``
    dequantizes them a block at a time: a float32 copy of a layer's experts is 2.4 GB
    at Qwen3-30B-A3B)."""
    params = {}
    for name, value in arrays.items():
        path, _, param = name.rpartition(".")
        if path not in affine or param == "bias" or value.ndim == 3:
            params[name[len(prefix):]] = value
        elif param == "weight":
            choice = affine[path]
            weight = mx.dequantize(value, arrays[f"{path}.scales"], arrays[f"{path}.biases"], choice.group_size,
                                   choice.bits)
            params[name[len(prefix):]] = weight.astype(mx.float32)
    return params


def _better_layer(layer: CalibratedLayer, modules: dict, hessians: dict, affine: dict, arrays: dict,
                  count: CalibrationCounts) -> dict:
    """``arrays`` (the layer as calibrated), or the layer as round to nearest writes it
    where that changes the layer's output on its held-out inputs less."""
    rtn, tally = QUANTIZERS["rtn"], CalibrationCounts()
    rounded = {}
    for path, m in modules.items():
        h = hessians[path]
        codes = (_expert_codes(rtn, experts_of(m), h, affine[path], False, tally) if isinstance(h, ExpertHessians)
                 else rtn.codes(m.weight, None, affine[path], False))
        rounded |= _named(path, codes, m.bias if "bias" in m else None)
    errors = [layer.held_out_error(_as_written(a, layer.prefix, affine)) for a in (arrays, rounded)]
    count.layers += 1
    if errors[1] < errors[0]:
        count.layers_rounded += 1
        return rounded
    return arrays


def _equalize(layer: CalibratedLayer, affine: dict, weights: dict, biases: dict, hessians: dict,
              count: CalibrationCounts) -> dict:
    """Search and fold each scale group of ``layer`` whose modules are all planned
    affine, changing ``weights``, ``biases`` (full paths) and the Hessians in place;
    returns the folded norms' arrays. If the folds change the layer's float output
    (a norm that feeds more than its group), the layer is left unequalized."""
    named = dict(layer.module.named_modules())
    before = dict(weights), dict(biases)
    norms, changed, scaled = {}, set(), []
    for group in scale_groups(layer.module):
        members = [layer.prefix + m for m in group.members]
        source = layer.prefix + group.source
        linear_source = isinstance(named[group.source], nn.Linear)
        if not all(p in affine for p in members) or (linear_source and source not in weights):
            continue  # a module the plan keeps in float or SWSC is written elsewhere, unscaled
        count.searched += 1
        h = hessians[members[0]]  # one array for the group's members
        measure = _layer_error(layer, group.members) if group.through_layer else None
        scales = equalizing_scales([weights[p] for p in members], h, [affine[p] for p in members], measure)
        if scales is None:
            continue
        s = mx.array(scales)
        if not linear_source:
            norms[source], s = folded_source(named[group.source], s)
            scales = np.array(s, dtype=scales.dtype)
        _scale_inputs(hessians, members[0], 1.0 / scales)
        scaled.append((members[0], scales))
        for p in members:
            weights[p] = weights[p] * s
        if linear_source:
            weights[source] = weights[source] / s[:, None]
            if source in biases:
                biases[source] = biases[source] / s.astype(biases[source].dtype)
        changed |= {source, *members}
        count.equalized += 1
    if not changed:
        return {}
    params = {p: {"weight": weights[p]} | ({"bias": biases[p]} if p in biases else {}) for p in changed if p in weights}
    params |= norms
    if layer.unchanged_by({f"{p[len(layer.prefix):]}.{k}": v for p, d in params.items() for k, v in d.items()},
                          FOLD_TOLERANCE):
        return {f"{p}.{k}": v for p, d in norms.items() for k, v in d.items()}
    for saved, now in zip(before, (weights, biases)):
        now.clear()
        now.update(saved)
    for path, scales in scaled:
        _scale_inputs(hessians, path, scales)
    count.refused.append(layer.prefix.rstrip("."))
    return {}


def _scale_inputs(hessians, path: str, factors: np.ndarray) -> None:
    """Every Hessian of ``path``'s inputs, fitted on and held out, of every track, scaled
    by ``factors`` once: in place, or when read where it waits on disk."""
    done = []
    for each in [hessians, *getattr(hessians, "tracks", [])]:
        for found in (each, getattr(each, "held_out", {})):
            if isinstance(found, SpilledHessians):
                if path in found:
                    found.scale(path, factors)
            elif (h := found.get(path)) is not None and all(h is not d for d in done):
                scale_hessian(h, factors)
                done.append(h)


def _layer_error(layer: CalibratedLayer, members: tuple[str, ...]):
    return lambda weights: layer.output_error({f"{m}.weight": w for m, w in zip(members, weights)})


def never_worse_than_rounding(codes: AffineCodes, weight: mx.array, choice: Affine, held_out: np.ndarray,
                              count: CalibrationCounts) -> AffineCodes:
    """Row by row (rows are quantized independently), ``codes`` or round to nearest's
    codes of ``weight``, whichever has the lower output error ``d H d^T`` with ``H`` of
    the held-out inputs."""
    rtn = QUANTIZERS["rtn"].codes(weight, None, choice, False)
    step = max(1, ROW_BLOCK_BYTES // (4 * weight.shape[1]))  # an LM head is not upcast whole
    rounding = np.zeros(weight.shape[0], bool)
    for r in range(0, weight.shape[0], step):
        w = np.array(weight[r : r + step].astype(mx.float32))
        rows = slice(r, r + step)
        ours, plain = (row_output_errors(np.array(c.dequantized(choice, rows).astype(mx.float32)) - w, held_out)
                       for c in (codes, rtn))
        rounding[r : r + step] = plain < ours
    count.rows_rounded += int(rounding.sum())
    count.rows += len(rounding)
    if not rounding.any():
        return codes
    pick = rounding[:, None]
    return AffineCodes(*(np.where(pick, getattr(rtn, f), getattr(codes, f)) for f in ("weight", "scales", "biases")))


def _expert_codes(quantizer, stack, hessians: ExpertHessians, choice: Affine, clip: bool,
                  count: CalibrationCounts) -> AffineCodes:
    """Each expert's codes (of ``stack``, an ``ExpertStack``: one expert's weights read at
    a time) from its own routed inputs; one that too few calibration tokens reached
    (``MIN_EXPERT_TOKENS``) is rounded to nearest."""
    rtn = QUANTIZERS["rtn"]
    parts = []
    for e in range(stack.shape[0]):
        inputs, weight = hessians.expert(e), stack.block(e, e + 1)[0]
        parts.append(rtn.codes(weight, None, choice, False) if inputs is None
                     else quantizer.codes(weight, inputs, choice, clip))
        count.experts_rounded += inputs is None
        count.experts_calibrated += inputs is not None
    return AffineCodes.stacked(parts)


def _named(path: str, codes: AffineCodes, bias: mx.array | None) -> dict:
    weight, scales, biases = codes.arrays()
    out = {f"{path}.weight": weight, f"{path}.scales": scales, f"{path}.biases": biases}
    if bias is not None:
        out[f"{path}.bias"] = bias.astype(mx.float16)
    return out


def _save(arrays: dict, file: Path) -> dict[str, dict]:
    mx.save_safetensors(str(file), arrays)
    loaded = mx.load(str(file))  # lazy: read when the model is written
    out: dict[str, dict] = {}
    for name in loaded:
        path, _, param = name.rpartition(".")
        out.setdefault(path, {})[param] = loaded[name]
    return out
