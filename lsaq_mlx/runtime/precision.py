"""The precision a running model holds: its plan, the plan set and policy of automatic
mode, and a plan change in progress, applied one layer group at a time."""

import mlx.core as mx
import psutil

from lsaq_mlx.backend.allocator import return_freed_memory
from lsaq_mlx.errors import UserError
from lsaq_mlx.modules import layer_label
from lsaq_mlx.planning.plan import QuantPlan
from lsaq_mlx.runtime.layers import layer_bits
from lsaq_mlx.runtime.policy import Policy
from lsaq_mlx.runtime.swap import SwapInProgress, layer_groups, swap_modules


class PrecisionController:
    def __init__(self, model, plan: QuantPlan | None, precision: dict, policy: Policy | None, weights, store,
                 float_paths: set[str], float32: bool, source_bits: float | None = None, source_bytes: int = 0,
                 stored_bits: dict | None = None):
        """``precision``: each module's setting as loaded; ``weights``: the source's
        tensors, read to re-quantize (a quantized source's dequantized); ``stored_bits``:
        the bits of each module such a source stores, above which no plan can go;
        ``store``: a layer store to read ready modules from; ``source_bits`` and
        ``source_bytes``: what the model holds without a plan."""
        self.model, self.plan, self.precision, self.policy = model, plan, precision, policy
        self.weights, self.store, self.float_paths, self.float32 = weights, store, float_paths, float32
        self.source_bits, self.source_bytes, self.stored_bits = source_bits, source_bytes, stored_bits or {}
        self.choices = dict(plan.modules) if plan else {}
        self.swap: SwapInProgress | None = None
        self.swaps = 0  # plan changes finished

    def plan_at(self, index: int) -> QuantPlan:
        plans = self.policy.plans.plans if self.policy else []
        if not 0 <= index < len(plans):
            raise UserError(f"there is no plan {index} (this session has {len(plans)})")
        return plans[index]

    def start(self, plan: QuantPlan, reason: str, reply=None) -> SwapInProgress | None:
        """Begin the change to ``plan``; ``reply`` gets its ``Swapped`` (so do those of a
        change it takes over). Returns the change when there is nothing to swap (done)."""
        changes = {p: c for p, c in plan.modules.items() if self.choices.get(p) != c}
        above = [(p, c) for p, c in changes.items() if p in self.stored_bits and getattr(c, "bits", 16) > self.stored_bits[p]]
        if above:
            path, choice = above[0]
            raise UserError(f"this model stores {path} at {self.stored_bits[path]} bits, below the plan's "
                            f"{choice.label} ({len(above)} modules): plans above the stored precision need the float "
                            "source (e.g. --model default)")
        replies = (self.swap.replies if self.swap else []) + ([reply] if reply else [])
        self.swap = SwapInProgress(layer_groups(changes), self.plan_info()["bits_per_weight"], reason,
                                   process_memory(), replies)
        self.plan = plan
        if self.policy and any(p is plan for p in self.policy.plans.plans):
            self.policy.current = next(i for i, p in enumerate(self.policy.plans.plans) if p is plan)
        return self._finish() if not self.swap.groups else None

    def step(self) -> SwapInProgress | None:
        """Swap the next layer group; the change when this was its last."""
        group = self.swap.groups.pop(0)
        report = swap_modules(self.model, group, self.weights, self.float32, self.store, self.float_paths)
        for path in report.changed:
            self.choices[path] = group[path]
        self.swap.report.merge(report)
        return_freed_memory()  # each group's read and decode buffers, before the next group's
        if self.swap.groups:
            return None
        return self._finish()

    def _finish(self) -> SwapInProgress:
        done, self.swap = self.swap, None
        self.swaps += 1
        return done

    def plan_info(self) -> dict:
        if self.plan:
            index = next((i for i, p in enumerate(self.policy.plans.plans) if p is self.plan), None) if self.policy else None
            return {"method": self.plan.method, "bits_per_weight": self.plan.predicted_bits_per_weight,
                    "weight_bytes": self.plan.predicted_bytes, "plan_index": index}
        return {"method": "as loaded", "bits_per_weight": self.source_bits, "weight_bytes": self.source_bytes,
                "plan_index": None}

    def layer_bits(self) -> dict:
        return layer_bits(self.precision, self.choices)

    def layer_settings(self) -> dict:
        """``{"3": {"mlp.down_proj": "4/64", ...}, "rest": {...}}``: each module's setting by layer."""
        layers: dict = {}
        for path, choice in self.choices.items():
            label = layer_label(path)
            module = path.split(f"layers.{label}.", 1)[1] if label != "rest" else path
            layers.setdefault(label, {})[module] = choice.label
        return layers


def process_memory() -> dict:
    return {"mlx_active_bytes": mx.get_active_memory(), "rss_bytes": psutil.Process().memory_info().rss}
