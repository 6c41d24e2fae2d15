"""How long the UI loop could not run: a timer ticks every ``interval`` seconds and each
tick records how late it came. A swap runs on the engine thread; this shows whether it
ever held up the interface."""

import time
from collections import deque


class StallMeter:
    def __init__(self, interval: float = 0.02, keep: float = 120.0):
        self.interval, self.keep = interval, keep
        self.ticks: deque[tuple[float, float]] = deque()  # (time, how late)
        self._last = None

    def tick(self) -> None:
        now = time.monotonic()
        if self._last is not None:
            self.ticks.append((now, max(now - self._last - self.interval, 0.0)))
        self._last = now
        while self.ticks and self.ticks[0][0] < now - self.keep:
            self.ticks.popleft()

    def longest(self, since: float) -> float:
        """The longest stall, in seconds, of the ticks after ``since`` (time.monotonic)."""
        return max((late for t, late in self.ticks if t >= since), default=0.0)
