"""Writing an adaptive folder's smaller settings: while ``convert`` calibrates each module
of the top plan, the quantizer also makes the module at every smaller setting the set's
other plans use (``AdaptiveSide.collect``); each is worth keeping by how much it beats
rounding the stored top weights to that setting, the swap's way without it. Worth is
measured as the output error on the calibration inputs (``d H d^T``) and put in the
cost table's units (the module's cost at that setting, times the error saved over
rounding's error), so modules of different layers compare, then as a share of the
summed cost of each plan that uses the setting (``AdaptiveSide.shares``), so every plan
gets room. A setting's bytes are what the store takes for it: its steps from the stored
codes (``adaptive.steps``). The best gain per byte is kept until the whole folder
reaches its size (``AdaptiveSide.write``)."""

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import mlx.core as mx
import numpy as np

from lsaq_mlx.adaptive.folder import PLANS_FILE, SIDE_FOLDER
from lsaq_mlx.adaptive.steps import setting_steps
from lsaq_mlx.adaptive.store import SideStore
from lsaq_mlx.gptq.codes import ROW_BLOCK_BYTES, affine_codes
from lsaq_mlx.gptq.row_errors import row_output_errors
from lsaq_mlx.gptq.solver import AffineCodes
from lsaq_mlx.planning.affine_error import roundtrip
from lsaq_mlx.planning.choices import Affine
from lsaq_mlx.planning.plan import PlanSet
from lsaq_mlx.progress import progress_bar
from lsaq_mlx.storage.layer_store import encoded_bytes

REPORT_BYTES = 16 << 10  # room left for lsaq_report.json, written last


@dataclass(frozen=True)
class SettingErrors:
    """Output errors on the calibration inputs of one module at one setting."""

    made: float  # the quantizer's codes
    derived: float  # the stored top weights rounded to the setting (a swap without side data)
    rounded: float  # the module's own weights rounded to the setting (what the cost table prices)


@dataclass
class SideSetting:
    path: str
    choice: Affine
    bytes: int
    gain: float  # the cost-table error the made codes save over deriving
    arrays: dict  # {param: array}, lazily read from the scratch folder


def lower_settings(plans: PlanSet) -> dict[str, list[Affine]]:
    """``{path: settings}``: the affine settings the smaller plans give a module that the
    top plan does not."""
    top = plans.plans[-1].modules
    lower: dict[str, list[Affine]] = {}
    for plan in plans.plans[:-1]:
        for path, choice in plan.modules.items():
            if isinstance(choice, Affine) and choice != top[path] and choice not in lower.get(path, []):
                lower.setdefault(path, []).append(choice)
    return lower


def setting_errors(weight: mx.array, hessian: np.ndarray | None, top, top_choice: Affine,
                   made: dict) -> dict[Affine, SettingErrors]:
    """``SettingErrors`` of each setting of ``made`` (setting -> its ``AffineCodes``, or
    None where they are the weight rounded to nearest) for ``weight`` whose stored codes
    are ``top`` (at ``top_choice``), by row blocks (the stored weights dequantized once
    per block); without ``hessian``, the squared weight errors."""
    step = max(1, ROW_BLOCK_BYTES // (4 * weight.shape[1]))
    totals = {choice: np.zeros(3) for choice in made}
    for r in range(0, weight.shape[0], step):
        w = weight[r : r + step].astype(mx.float32)
        rows = slice(r, r + step)
        stored = top.dequantized(top_choice, rows)
        w_np = np.array(w) if hessian is not None else None
        for choice, codes in made.items():
            rounded = roundtrip(w, choice)
            candidates = (rounded if codes is None else codes.dequantized(choice, rows), roundtrip(stored, choice),
                          rounded)
            if hessian is None:
                totals[choice] += [mx.sum(mx.square(c - w)).item() for c in candidates]
            else:
                totals[choice] += [row_output_errors(np.array(c) - w_np, hessian).sum() for c in candidates]
    return {choice: SettingErrors(*map(float, t)) for choice, t in totals.items()}


def relative_gains(weight, hessian, top, top_choice: Affine, made: dict) -> dict[Affine, float]:
    """Each setting of ``made``'s output error saved over deriving it, as a share of
    rounding's error (``SettingErrors``: (derived - made) / rounded). ``weight``: a
    matrix, or stacked experts (an ``ExpertStack``, ``hessian`` its ``ExpertHessians``
    or None; ``top`` and ``made`` their stacked codes): then the mean over experts, each
    read alone and measured on its own routed inputs, or by its squared weight errors
    where too few tokens reached it (a share, so the two kinds of error can be averaged)."""
    if len(weight.shape) == 2:
        errors = setting_errors(weight, hessian, top, top_choice, made)
        return {c: (e.derived - e.made) / max(e.rounded, 1e-30) for c, e in errors.items()}
    totals = dict.fromkeys(made, 0.0)
    for e in range(weight.shape[0]):
        inputs = hessian.expert(e) if hessian is not None else None
        gains = relative_gains(weight.block(e, e + 1)[0], inputs.hessian if inputs is not None else None,
                               top.expert(e), top_choice, {c: None if m is None else m.expert(e) for c, m in made.items()})
        totals = {c: totals[c] + g for c, g in gains.items()}
    return {c: t / weight.shape[0] for c, t in totals.items()}


def rounded_codes(weight, choice: Affine) -> AffineCodes:
    """Round to nearest of a matrix, or of stacked experts (an ``ExpertStack``, read an
    expert at a time)."""
    if len(weight.shape) == 2:
        return affine_codes(weight, None, choice)
    return AffineCodes.stacked([affine_codes(weight.block(e, e + 1)[0], None, choice) for e in range(weight.shape[0])])


def stored_bytes(path: str, codes: AffineCodes, bias, choice: Affine, top: AffineCodes, top_choice: Affine) -> int:
    """The bytes the store takes for ``codes`` at ``choice``: their steps from ``top``
    (the module's stored codes; ``adaptive.steps``)."""
    steps = setting_steps(codes.weight, codes.scales, codes.biases, choice, vars(top), top_choice)
    arrays = {p: mx.array(a) for p, a in steps.items()}
    return encoded_bytes(arrays | ({"bias": bias} if bias is not None else {}), choice, path)


def _bytes_in(folder: Path, leaving: Path | None) -> int:
    """The bytes of every file in ``folder`` but those under ``leaving``."""
    return sum(f.stat().st_size for f in folder.rglob("*")
               if f.is_file() and not (leaving and f.is_relative_to(leaving)))


@dataclass
class AdaptiveSide:
    """What ``convert --adaptive`` adds to the top plan's folder. ``costs``: the cost
    table (``CostTable``); ``size``: the whole folder's most bytes over the top plan's
    folder (weights, tokenizer, configs, costs: what ``convert -b`` writes for it; 1.3:
    the plans and the store at most 30 % more)."""

    plans: PlanSet
    costs: object
    size: float
    scratch: Path | None = None
    own_tracks: bool = True  # each smaller plan calibrated on its own activations (``tracks``)
    lower: dict = field(init=False)
    candidates: list[SideSetting] = field(default_factory=list)
    collected: set = field(default_factory=set)  # paths whose smaller settings were made

    def __post_init__(self):
        self.lower = lower_settings(self.plans)

    @property
    def tracks(self) -> list[dict]:
        """The smaller plans' affine settings, each calibrated on its own activations
        (none without ``own_tracks``: every setting on the largest plan's)."""
        if not self.own_tracks:
            return []
        return [{p: c for p, c in plan.modules.items() if isinstance(c, Affine)} for plan in self.plans.plans[:-1]]

    @cached_property
    def shares(self) -> dict:
        """``{(path, setting): weight}``: the sum, over the smaller plans that give ``path``
        that setting, of one over the plan's summed cost, so a setting's gain counts as a
        share of each plan's error it lowers (else the smallest plan, whose errors are the
        largest, would take the whole store)."""
        shares: dict = {}
        for plan in self.plans.plans[:-1]:
            total = max(sum(self.costs.cost(p, c) for p, c in plan.modules.items()), 1e-30)
            for key in plan.modules.items():
                shares[key] = shares.get(key, 0.0) + 1.0 / total
        return shares

    @property
    def equalize_for(self) -> dict:
        """The settings equalization searches for: the smallest plan's, where quantizing
        gains most from it (one set of scales is folded for every plan)."""
        top = self.plans.plans[-1].modules
        return {p: c for p, c in self.plans.plans[0].modules.items() if isinstance(c, Affine) and isinstance(top[p], Affine)}

    def collect(self, path: str, weight: mx.array, bias: mx.array | None, hessian: np.ndarray, top,
                top_choice: Affine, make_codes, rounding: bool = False) -> None:
        """Make the module at ``path`` at each smaller setting (``make_codes(choice)``) and
        price it; ``weight``: the float weight the quantizer saw (a matrix, or stacked
        experts: see ``relative_gains``), ``top``: its stored codes; ``rounding``:
        ``make_codes`` rounds ``weight`` to nearest."""
        choices = self.lower.get(path, [])
        if not choices:
            return
        self.collected.add(path)
        # rounding's gains need no codes: each setting is then made only when it is stored
        made = dict.fromkeys(choices) if rounding else {choice: make_codes(choice) for choice in choices}
        gains = relative_gains(weight, hessian, top, top_choice, made)
        self.scratch.mkdir(parents=True, exist_ok=True)
        for choice in choices:  # on disk until written, one setting's codes in memory at a time
            codes = made.pop(choice) or make_codes(choice)
            size = stored_bytes(path, codes, bias, choice, top, top_choice)
            arrays = {f: mx.array(getattr(codes, f)) for f in ("weight", "scales", "biases")}
            del codes
            file = self.scratch / f"side-{len(self.candidates)}.safetensors"
            mx.save_safetensors(str(file), arrays | ({"bias": bias} if bias is not None else {}))
            del arrays
            gain = self.costs.cost(path, choice) * gains[choice] * self.shares.get((path, choice), 0.0)
            self.candidates.append(SideSetting(path, choice, size, gain, mx.load(str(file))))

    def collect_rounded(self, path: str, weight: mx.array, bias: mx.array | None, top_choice: Affine) -> None:
        """``collect`` for a module the quantizer rounds to nearest (priced by the squared
        weight error: there is no input Hessian)."""
        rtn = lambda choice: rounded_codes(weight, choice)  # noqa: E731
        if path in self.lower:
            self.collect(path, weight, bias, None, rtn(top_choice), top_choice, rtn, rounding=True)

    def choose(self, room: float) -> list[SideSetting]:
        """The candidates of best gain per byte, while their bytes fit ``room``."""
        kept = []
        for c in sorted((c for c in self.candidates if c.gain > 0), key=lambda c: -c.gain / c.bytes):
            if c.bytes <= room:
                kept.append(c)
                room -= c.bytes
        return kept

    def write(self, folder: Path, model_kinds: dict) -> dict:
        """Write ``lsaq_plans.json`` and the store of the chosen settings into ``folder``
        (``model_kinds``: each module path's stored class name); what was written."""
        top = _bytes_in(folder, self.scratch)  # the top plan's folder, as ``convert -b`` writes it
        self.plans.save(folder / PLANS_FILE)
        kept = self.choose(self.size * top - _bytes_in(folder, self.scratch) - REPORT_BYTES)
        store = SideStore(folder, SIDE_FOLDER, self.plans.plans[-1])
        modules = {}
        for c in kept:  # handed to the store, which frees each once written: they are a fraction of the model
            modules[c.path, c.choice], c.arrays = (model_kinds[c.path], c.arrays), {}
        with progress_bar("writing the smaller settings", len(kept)) as advance:
            store.add(modules, advance)
        store.close()
        return {"budgets": [p.budget.get("bits_per_weight") for p in self.plans.plans],
                "plan_bytes": [p.predicted_bytes for p in self.plans.plans],
                "settings_made": len(self.candidates), "settings_kept": len(kept),
                "settings_derived": sum(map(len, self.lower.values())) - len(kept),
                "side_bytes": store.bytes(), "size_cap": self.size}
