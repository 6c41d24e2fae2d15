"""Which plan of a ``PlanSet`` the memory allows, without oscillating.

The policy keeps ``reserve`` bytes free. The memory it may give the weights is what is
available now plus what the current plan's weights already hold. It downgrades at once
when that is too little (or the system reports critical pressure), and upgrades only
after ``window`` consecutive samples in which the larger plan fits with ``hysteresis``
bytes to spare, and never sooner than ``min_interval`` seconds after the last change.
"""

from dataclasses import dataclass

from lsaq_mlx.planning.plan import PlanSet
from lsaq_mlx.runtime.memory import MemorySample


@dataclass
class Policy:
    plans: PlanSet
    reserve: int = 512 << 20
    hysteresis: int = 256 << 20
    window: int = 3
    min_interval: float = 5.0
    current: int = 0  # index into plans.plans (smallest first)
    last_change: float = float("-inf")
    _upgrade_streak: int = 0

    def fits(self, index: int, sample: MemorySample, margin: int = 0) -> bool:
        room = sample.available_bytes + self.plans.plans[self.current].predicted_bytes - self.reserve
        return self.plans.plans[index].predicted_bytes + margin <= room

    def decide(self, sample: MemorySample) -> int | None:
        """The index of the plan to switch to, or None to stay."""
        best = max((i for i in range(len(self.plans.plans)) if self.fits(i, sample)), default=0)
        if sample.pressure == "critical":
            best = min(best, max(self.current - 1, 0))
        if best < self.current:
            self._upgrade_streak = 0
            return self._change(best, sample)
        larger = max((i for i in range(len(self.plans.plans)) if self.fits(i, sample, self.hysteresis)), default=0)
        if larger > self.current and sample.pressure != "critical":
            self._upgrade_streak += 1
            if self._upgrade_streak >= self.window and sample.time - self.last_change >= self.min_interval:
                self._upgrade_streak = 0
                return self._change(larger, sample)
        else:
            self._upgrade_streak = 0
        return None

    def describe(self) -> dict:
        """The plans, the current one, and for each plan the available memory below which
        it no longer fits (from the current plan: the lines a memory display draws)."""
        held = self.plans.plans[self.current].predicted_bytes
        return {"current": self.current, "reserve": self.reserve, "hysteresis": self.hysteresis,
                "plans": [{"bits_per_weight": p.predicted_bits_per_weight, "bytes": p.predicted_bytes,
                           "min_available": p.predicted_bytes + self.reserve - held} for p in self.plans.plans]}

    def _change(self, index: int, sample: MemorySample) -> int:
        self.current, self.last_change = index, sample.time
        return index
