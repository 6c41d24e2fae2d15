"""The cost model of the ``lsaq`` allocator.

    cost(module m, choice c) = weight(layer of m) * sum_ij F_ij (W_ij - Q_c(W)_ij)^2

``F`` is the diagonal empirical Fisher information of the weights on calibration text
(the mean squared gradient of the next-token loss), so the sum estimates twice the loss
increase that quantizing ``W`` with choice ``c`` causes (a second-order Taylor
expansion). ``Q`` is MLX's affine round trip with float16 scales and biases, exactly
what the written model holds. ``weight`` is the layer's LSAQ (jaccard) importance over
the mean importance, raised to a power (embeddings and the LM head get the largest
layer weight); measured best at power 0 (``PlanRequest.importance_power``), where it is
1 for every layer. Costs add over modules: the allocator minimizes their sum under the
byte budget.
``benchmarks/quality_table.py`` checks that the summed cost ranks held-out plans like their
measured KL divergence.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from lsaq_mlx.planning.plan import QuantModule


@dataclass(frozen=True)
class CostTable:
    """The cost of every module at every priced choice, ``{path: {choice.key: error}}``
    (``planning.cost_table`` computes and caches it)."""

    errors: dict[str, dict[str, float]]

    def cost(self, path: str, choice) -> float:
        """The module's error at ``choice``; 0 for one not priced (a pinned setting that is
        the module's only option, whose cost cannot change the plan)."""
        return self.errors[path].get(choice.key, 0.0)

    def scaled(self, factors: dict[str, dict[str, float]], power: float = 1.0) -> "CostTable":
        """Each priced choice's error times its factor (``{path: {key: factor}}``, 1 where
        none) to ``power``."""
        return CostTable({p: {k: e * factors.get(p, {}).get(k, 1.0) ** power for k, e in errs.items()}
                          for p, errs in self.errors.items()})


def module_errors(weight: mx.array, fisher: mx.array, choices) -> dict[str, float]:
    """``{choice.key: sum F (W - Q(W))^2}`` for ``weight`` (float32) and its Fisher,
    each codec pricing its own choices (``Choice.errors``); stacked experts as the rows
    of one matrix."""
    weight, fisher = weight.reshape(-1, weight.shape[-1]), fisher.reshape(-1, fisher.shape[-1])
    mx.eval(weight, fisher)
    errors = {}
    for codec in dict.fromkeys(type(c) for c in choices):
        group = [c for c in choices if type(c) is codec]
        errors |= dict(zip((c.key for c in group), codec.errors(weight, fisher, group)))
    return errors


def layer_weights(importance: list[float] | None, modules: list[QuantModule], power: float = 0.0) -> dict:
    """``{path: weight}``: the importance of the module's layer over the mean importance,
    to ``power`` (1 for every module without importance). Weighting layers by their
    jaccard importance on top of the Fisher made plans worse on SmolLM2 (KL at 4.0 bits
    per weight: 0.69 with power 0, 1.00 with 1, 1.21 with 2; see README), so the default
    is 0 and the Fisher alone carries importance."""
    if importance is None or power == 0:
        return {q.path: 1.0 for q in modules}
    imp = np.maximum(np.asarray(importance, dtype=float), 1e-6)
    rel = (imp / imp.mean()) ** power
    return {q.path: float(rel[q.layer] if q.layer is not None else rel.max()) for q in modules}
