"""The multiple-choice knapsack: pick one option per item, minimizing total cost
under a byte budget.

Solved by dynamic programming over bytes measured in units of ``unit`` bytes, each
option's bytes (above the item's smallest option) rounded *up* to whole units, so every
solution it returns fits the true budget. It is exact when ``unit`` is 1; otherwise its
cost is at most the exact optimum for a budget smaller by ``items * unit`` bytes (the
most the rounding can waste), which the caller reports as the optimality bound.
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class KnapsackSolution:
    picks: list[int]  # the chosen option of each item
    cost: float
    bytes: int
    unit: int  # DP resolution in bytes (1 = exact)


def solve_mckp(options: list[list[tuple[int, float]]], budget: int, resolution: int = 50_000) -> KnapsackSolution | None:
    """``options[i]`` lists (bytes, cost) of item i. Returns None when even the smallest
    option of every item does not fit."""
    base = [min(b for b, _ in item) for item in options]
    spare = budget - sum(base)
    if spare < 0:
        return None
    unit = max(1, -(-spare // resolution))
    capacity = spare // unit
    best = np.zeros(capacity + 1)  # best[c]: least cost using at most c units
    picks = np.zeros((len(options), capacity + 1), dtype=np.int16)
    for i, item in enumerate(options):
        new = np.full(capacity + 1, np.inf)
        for j, (size, cost) in enumerate(item):
            units = -(-(size - base[i]) // unit)
            if units > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[units:] = best[: capacity + 1 - units] + cost
            better = candidate < new
            new[better] = candidate[better]
            picks[i, better] = j
        best = new
    chosen, c = [0] * len(options), capacity
    for i in range(len(options) - 1, -1, -1):
        chosen[i] = int(picks[i, c])
        c -= -(-(options[i][chosen[i]][0] - base[i]) // unit)
    used = sum(options[i][j][0] for i, j in enumerate(chosen))
    return _fill_slack(options, chosen, budget - used, unit)


def _fill_slack(options, chosen, slack: int, unit: int) -> KnapsackSolution:
    """Spend bytes the rounding left unused on the upgrades that save the most cost."""
    improved = True
    while improved and slack > 0:
        improved, best = False, None
        for i, item in enumerate(options):
            size0, cost0 = item[chosen[i]]
            for j, (size, cost) in enumerate(item):
                gain, extra = cost0 - cost, size - size0
                if gain > 0 and extra <= slack and (best is None or gain > best[0]):
                    best = (gain, i, j, extra)
        if best:
            _, i, j, extra = best
            chosen[i], slack, improved = j, slack - extra, True
    cost = sum(options[i][j][1] for i, j in enumerate(chosen))
    size = sum(options[i][j][0] for i, j in enumerate(chosen))
    return KnapsackSolution(chosen, float(cost), int(size), unit)
