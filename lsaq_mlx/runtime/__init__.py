"""The runtime: an engine thread that owns the model, hot-swaps layer precision from the
source weights on disk, and follows the machine's memory through a policy; its events
are in ``runtime.events``."""

from lsaq_mlx.runtime.engine import Engine
from lsaq_mlx.runtime.memory import MemorySample, ScriptedSampler, SystemSampler
from lsaq_mlx.runtime.policy import Policy

__all__ = ["Engine", "MemorySample", "Policy", "ScriptedSampler", "SystemSampler"]
