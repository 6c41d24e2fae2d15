"""The joint plan of a model over several ranks: contiguous layers per rank and every
module's setting, at the least total cost such that each rank's weights, KV cache and
reserve fit its memory (``planning.pipeline``).

For a given split the ranks are independent knapsacks. The split is chosen by dynamic
programming over the ranks' last layers, pricing each rank's share with the Lagrangian
relaxation of its knapsack: at a price ``lam`` per byte every module takes the option of
least ``cost + lam * bytes``, so bytes and cost add over layers (prefix sums over a grid
of prices) and a layer range is priced in O(grid). The chosen split's ranks are then
solved exactly (``knapsack.solve_mckp``), each under its own budget, which no rank ever
exceeds. A tied embedding (held by the first and the last rank) is one setting for
both: each of its options is tried.
"""

import time

import numpy as np

from lsaq_mlx.errors import UserError
from lsaq_mlx.planning.budgets import Budget
from lsaq_mlx.planning.choices import FLOAT_BYTES
from lsaq_mlx.planning.knapsack import solve_mckp
from lsaq_mlx.planning.pipeline import ModelLayout, PipelinePlan, RankShare, rank_needs
from lsaq_mlx.sizes import format_size

GRID = 256  # prices per byte the split search evaluates


class _Prices:
    """Each module's Lagrangian choice at every price of a grid, summed by layer (prefix
    sums) and by the ranks that hold the modules outside the layers."""

    def __init__(self, layout: ModelLayout, options: list[list[tuple[int, float]]], n_ranks: int):
        sizes = np.full((len(options), max(map(len, options))), np.inf)
        costs = np.full_like(sizes, np.inf)
        for i, item in enumerate(options):
            order = sorted(item)  # ties at a price go to the fewest bytes
            sizes[i, :len(item)] = [s for s, _ in order]
            costs[i, :len(item)] = [c for _, c in order]
        slopes = [(c0 - c1) / (s1 - s0) for item in options for (s0, c0) in item for (s1, c1) in item
                  if s1 > s0 and c0 > c1]
        lo, hi = (min(slopes) / 4, max(slopes) * 4) if slopes else (1.0, 1.0)
        self.prices = np.concatenate([[0.0], np.geomspace(lo, hi, GRID - 2), [hi * 1e6]])
        picked_bytes = np.empty((GRID, len(options)))
        picked_cost = np.empty_like(picked_bytes)
        finite = np.where(np.isfinite(sizes), sizes, 0)
        for g, lam in enumerate(self.prices):
            pick = np.argmin(costs + lam * finite + np.where(np.isfinite(sizes), 0, np.inf), axis=1)
            picked_bytes[g] = sizes[np.arange(len(options)), pick]
            picked_cost[g] = costs[np.arange(len(options)), pick]
        layers = np.zeros((len(options), layout.n_layers + 1))
        held = np.zeros((len(options), n_ranks))
        for i, q in enumerate(layout.modules):
            if q.layer is None:
                held[i, list(layout.holder(q, n_ranks))] = 1
            else:
                layers[i, q.layer + 1] = 1
        self.layer_bytes = np.cumsum(picked_bytes @ layers, axis=1)  # [grid, layers + 1]
        self.layer_cost = np.cumsum(picked_cost @ layers, axis=1)
        self.rest_bytes = picked_bytes @ held  # [grid, ranks]
        first = held * (np.cumsum(held, axis=1) == 1)  # a module held twice is paid for once
        self.rest_cost = picked_cost @ first

    def price(self, rank: int, first: int, end: int, room: float) -> tuple[float, float]:
        """``(estimated least cost, bytes)`` of a rank holding layers [first, end) in
        ``room`` bytes; inf when even the smallest options do not fit."""
        size = self.layer_bytes[:, end] - self.layer_bytes[:, first] + self.rest_bytes[:, rank]
        fits = np.nonzero(size <= room)[0]
        if not len(fits):
            return np.inf, np.inf
        g = fits[0]
        cost = self.layer_cost[g, end] - self.layer_cost[g, first] + self.rest_cost[g, rank]
        if g > 0:  # between two grid prices: the relaxation is linear in bytes
            more_cost = self.layer_cost[g - 1, end] - self.layer_cost[g - 1, first] + self.rest_cost[g - 1, rank]
            cost -= (cost - more_cost) * (room - size[g]) / max(size[g - 1] - size[g], 1e-9)
        return float(cost), float(size[g])


def plan_pipeline(ctx, costs, layout: ModelLayout, memories: list[int], context: int,
                  budget: Budget | None = None, method: str = "lsaq") -> PipelinePlan:
    """The joint plan of ``ctx``'s model over ranks of ``memories`` bytes; ``budget``
    (bits per weight) caps the total as well."""
    started = time.perf_counter()
    n = len(memories)
    if layout.n_layers < n:
        raise UserError(f"the model has {layout.n_layers} decoder layers: too few for {n} ranks", setting="ranks")
    embed = next((i for i, q in enumerate(layout.modules) if q.layer is None and "embed" in q.path), None)
    best = None
    for shared in ctx.options(layout.modules[embed]) if layout.tied and embed is not None else [None]:
        choices = [[shared] if i == embed and shared else ctx.options(q) for i, q in enumerate(layout.modules)]
        options = [[(q.bytes_for(c), costs.cost(q.path, c)) for c in cs] for q, cs in zip(layout.modules, choices)]
        found = _best_split(layout, options, memories, context, ctx.module_budget(budget) if budget else None)
        if found and (best is None or found[0] < best[0]):
            best = (*found, options, choices)
    if best is None:
        raise _does_not_fit(ctx, layout, memories, context)
    estimate, bounds, rooms, options, choices = best
    picks, shares = {}, []
    for rank, (first, end) in enumerate(bounds):
        held = [i for i, q in enumerate(layout.modules) if (q.layer is not None and first <= q.layer < end)
                or (q.layer is None and rank in layout.holder(q, n))]
        free = [i for i in held if i not in picks]  # a tied embedding is chosen once, on rank 0
        room = rooms[rank] - sum(options[i][picks[i]][0] for i in held if i in picks)
        solution = solve_mckp([options[i] for i in free], int(room))
        if solution is None:
            raise _does_not_fit(ctx, layout, memories, context)
        picks |= dict(zip(free, solution.picks))
        floats, kv, reserve = rank_needs(layout, n, rank, range(first, end), context, memories[rank])
        weights = sum(options[i][picks[i]][0] for i in held)
        params = sum(layout.modules[i].params for i in held) + floats // FLOAT_BYTES
        shares.append(RankShare(rank, memories[rank], first, end, weights + floats, kv, reserve, params))
    chosen = {q.path: choices[i][picks[i]] for i, q in enumerate(layout.modules)}
    exact = sum(options[i][j][1] for i, j in picks.items())
    details = {"cost": exact, "estimated_cost": estimate, "ranks_memory": memories, "context": context,
               "seconds": round(time.perf_counter() - started, 3)}
    stated = budget or Budget(bytes=ctx.total_bytes(chosen), assumptions={"ranks_memory": memories, "context": context})
    plan = ctx.plan(method, stated, chosen, details={"pipeline": details, "cost": exact})
    return PipelinePlan(plan, shares, context, details)


def add_rank_plans(pipeline: PipelinePlan, ctx, costs, layout: ModelLayout, budgets: list[float]) -> PipelinePlan:
    """Give each rank plans of its own modules at ``budgets`` (bits per weight of what
    it holds) below its share, its share last: the PlanSet its own memory policy moves
    through at run time. A tied embedding keeps its one setting."""
    n = len(pipeline.ranks)
    sets = []
    for share in pipeline.ranks:
        held = [q for q in layout.modules if (q.layer is not None and q.layer in share.layers)
                or (q.layer is None and share.rank in layout.holder(q, n))]
        shared = {q.path for q in held if q.layer is None and len(layout.holder(q, n)) > 1}
        options = [[pipeline.plan.modules[q.path]] if q.path in shared else ctx.options(q) for q in held]
        floats = share.weight_bytes - sum(q.bytes_for(pipeline.plan.modules[q.path]) for q in held)
        plans = []
        for bits in sorted(b for b in budgets if b < share.bits_per_weight - 1e-6):
            room = int(bits * share.parameters / 8) - floats
            solution = solve_mckp([[(q.bytes_for(c), costs.cost(q.path, c)) for c in cs] for q, cs in zip(held, options)],
                                  room)
            if solution is not None:
                choices = {q.path: cs[j] for q, cs, j in zip(held, options, solution.picks)}
                plans.append(rank_plan_of(pipeline, share, held, choices, floats, {"bits_per_weight": bits}))
        top = {q.path: pipeline.plan.modules[q.path] for q in held}
        sets.append(plans + [rank_plan_of(pipeline, share, held, top, floats, {"share": True})])
    pipeline.rank_plans = sets
    return pipeline


def rank_plan_of(pipeline: PipelinePlan, share: RankShare, held: list, choices: dict, floats: int, budget: dict):
    """A QuantPlan of one rank's modules (``held``): its bytes and bits per weight are the rank's."""
    from dataclasses import replace

    size = floats + sum(q.bytes_for(choices[q.path]) for q in held)
    return replace(pipeline.plan, budget=budget | {"rank": share.rank}, modules=choices, predicted_bytes=size,
                   predicted_bits_per_weight=size * 8 / share.parameters, parameters=share.parameters, details={})


def _best_split(layout, options, memories, context, cap: int | None):
    """``(estimated cost, [(first, end)] per rank, bytes of modules per rank)`` of the
    best split, or None. ``cap``: the most bytes of modules in all, shared out in
    proportion to the weights each rank holds (at one price per byte their bytes are
    about in that proportion), then what ranks short of memory leave to the others."""
    n, n_layers = len(memories), layout.n_layers
    prices = _Prices(layout, options, n)
    weights = np.zeros(n_layers + 1)
    rest, twice = np.zeros(n), np.zeros(n)
    for q, item in zip(layout.modules, options):
        if q.layer is not None:
            weights[q.layer + 1] += q.params
        else:
            holders = layout.holder(q, n)
            rest[holders[0]] += q.params
            for r in holders[1:]:
                twice[r] += min(size for size, _ in item)  # a tied embedding: one setting, held again
    weights, total = np.cumsum(weights), weights.sum() + rest.sum()
    rooms = {}

    def room(rank, first, end):
        if (rank, first, end) not in rooms:
            floats, kv, reserve = rank_needs(layout, n, rank, range(first, end), context, memories[rank])
            rooms[rank, first, end] = memories[rank] - floats - kv - reserve
            if cap is not None:
                share = cap * (weights[end] - weights[first] + rest[rank]) / total + twice[rank]
                rooms[rank, first, end] = min(rooms[rank, first, end], share)
        return rooms[rank, first, end]

    best = [{} for _ in range(n)]  # best[r][end]: (cost, first) of ranks 0..r holding layers [0, end)
    for rank in range(n):
        for end in [n_layers] if rank == n - 1 else range(rank + 1, n_layers - (n - rank) + 2):
            found = []
            for first in [0] if rank == 0 else range(rank, end):
                before = 0.0 if rank == 0 else best[rank - 1].get(first, (np.inf,))[0]
                cost = before + prices.price(rank, first, end, room(rank, first, end))[0]
                if np.isfinite(cost):
                    found.append((cost, first))
            if found:
                best[rank][end] = min(found)
    if n_layers not in best[n - 1]:
        return None
    bounds, end = [], n_layers
    for rank in range(n - 1, -1, -1):
        bounds.insert(0, (best[rank][end][1], end))
        end = bounds[0][0]
    shares = [room(r, a, b) for r, (a, b) in enumerate(bounds)]
    if cap is not None:
        shares = _share_spare(shares, [_memory_room(layout, memories, context, r, a, b) for r, (a, b) in enumerate(bounds)],
                              cap - sum(shares) + twice.sum())
    return best[n - 1][n_layers][0], bounds, shares


def _memory_room(layout, memories, context, rank, first, end) -> float:
    floats, kv, reserve = rank_needs(layout, len(memories), rank, range(first, end), context, memories[rank])
    return memories[rank] - floats - kv - reserve


def _share_spare(shares: list[float], limits: list[float], spare: float) -> list[float]:
    """``shares`` plus ``spare`` bytes, given in proportion to the ranks that are below
    their ``limits`` (water filling)."""
    shares = list(shares)
    while spare > 1:
        open_ = [r for r in range(len(shares)) if shares[r] < limits[r] - 1]
        if not open_:
            break
        weight = sum(shares[r] for r in open_) or len(open_)
        given = 0.0
        for r in open_:
            extra = min(limits[r] - shares[r], spare * (shares[r] or 1) / weight)
            shares[r] += extra
            given += extra
        spare -= given
    return shares


def _does_not_fit(ctx, layout: ModelLayout, memories: list[int], context: int) -> UserError:
    """The one line for a model the ranks cannot hold: the rank that falls shortest in a
    split in proportion to memory (exo's), at the smallest settings."""
    n, total = len(memories), sum(memories)
    smallest = {q.path: min(ctx.options(q), key=q.bytes_for) for q in layout.modules}
    ends = np.round(np.cumsum(memories) / total * layout.n_layers).astype(int).tolist()
    ends = [min(max(e, r + 1), layout.n_layers - (n - 1 - r)) for r, e in enumerate(ends)]
    worst = None
    for rank, end in enumerate(ends):
        first = ends[rank - 1] if rank else 0
        floats, kv, reserve = rank_needs(layout, n, rank, range(first, end), context, memories[rank])
        weights = sum(q.bytes_for(smallest[q.path]) for q in layout.modules
                      if (q.layer is not None and first <= q.layer < end) or (q.layer is None and rank in layout.holder(q, n)))
        short = weights + floats + kv + reserve - memories[rank]
        if worst is None or short > worst[1]:
            worst = (rank, short, first, end)
    rank, short, first, end = worst
    return UserError(f"the ranks cannot hold this model even at the smallest settings: rank {rank} "
                     f"({format_size(memories[rank])}) with layers {first}-{end - 1} is short by "
                     f"{format_size(max(short, 0))} (weights, KV at {context} tokens and a reserve); "
                     "add memory or lower --context", setting="ranks")
