"""One rank's stage, called as mlx-lm calls a model, and how rank 0 drives the ranks that
follow it (a chat or a server runs on rank 0 only)."""

import time
from contextlib import nullcontext
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from lsaq_mlx.errors import UserError
from lsaq_mlx.planning.pipeline import PipelinePlan, RankShare
from lsaq_mlx.runtime.pipeline.guard import StallGuard, end_pipeline, peer_lost
from lsaq_mlx.runtime.pipeline.stand_ins import EmbeddingStandIn, SendActivations, rank_plan


FORWARD, STOP, STATE, TICK = 1, 2, 3, 4  # what rank 0 tells the ranks that follow it


class PipelineStage:
    """``model`` (one rank's stage) called as mlx-lm calls a model: logits of the last
    position (all of them with ``all_positions``), the same on every rank. Everything
    else (``layers``, ``make_cache``, ``args``) is the model's.

    ``driven``: only rank 0 decides what to compute (a chat, a server); before each call
    it tells the other ranks, which ``follow``, the input's shape and where its cache
    stands, and every call is evaluated at once, so all ranks run the same transfers in
    the same order whatever the caller evaluates."""

    def __init__(self, model: nn.Module, pipeline: PipelinePlan, ranks, vocabulary: int, driven: bool = False):
        self.model, self.ranks, self.vocabulary, self.driven = model, ranks, vocabulary, driven
        self.rank, self.group = ranks.rank, ranks.group
        self.plan = rank_plan(pipeline, ranks.rank)
        self._last_cache = None
        self.guard: StallGuard | None = None
        self.float_paths: set = set()  # the modules with float32 copies (the CPU's compute mode)
        self.control = None  # a PrecisionController when this rank adapts to its memory
        self.adaptation: RankAdaptation | None = None  # a following rank's own policy
        self.share: RankShare = pipeline.share(self.rank)
        self.all_positions = False
        dtype = next((v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)),
                     mx.float32)
        for _, module in model.named_modules():
            if isinstance(module, EmbeddingStandIn):
                module.dtype = dtype
        self.sender = next((m for m in model.layers if isinstance(m, SendActivations)), None)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None, **kwargs):
        if self.driven and self.rank == 0:
            self._announce(FORWARD, cache, inputs.shape)
        with self.guard or nullcontext():  # a driven rank 0 waits between calls as long as you type
            logits = self._forward(inputs, cache, **kwargs)
            if self.driven:
                try:
                    mx.eval(logits)
                except RuntimeError as e:
                    if peer_lost(e):
                        end_pipeline(self.rank, "another rank ended: its connection was lost")
                    raise
        return logits

    def _forward(self, inputs, cache, **kwargs):
        out = self.model(inputs, cache=cache, **kwargs)
        positions = out.shape[1] if self.all_positions else 1
        if self.sender is not None:
            sent = self.sender.sent
            _carry(cache[self.share.end_layer - 1] if cache else None, sent)
            logits = mx.depends(mx.zeros((out.shape[0], positions, self.vocabulary), mx.float32), sent)
        else:
            logits = out[:, -positions:, :].astype(mx.float32)
        return mx.distributed.all_sum(logits, group=self.group)

    def _announce(self, op: int, cache=None, shape=(0, 0)) -> None:
        new = cache is not self._last_cache
        self._last_cache = cache
        header = [op, int(new), self._offset(cache), *shape, int(self.all_positions)]
        mx.eval(mx.distributed.all_sum(mx.array(header, dtype=mx.int32), group=self.group))

    def _offset(self, cache) -> int:
        """Tokens in the cache of this rank's first layer that counts them; -1 if none."""
        for i in self.share.layers:
            if cache and hasattr(cache[i], "offset"):
                return int(cache[i].offset)
        return -1

    def ranks_state(self) -> list[dict]:
        """Rank 0: every rank's layers, plan and memory, in rank order."""
        self._announce(STATE)
        return self.ranks.gather(self._own_state())

    def _own_state(self) -> dict:
        import psutil

        from lsaq_mlx.runtime.layers import layer_bits, module_precision

        state = {"rank": self.rank, "layers": [self.share.first_layer, self.share.end_layer],
                 "weight_bytes": self.share.weight_bytes, "bits_per_weight": self.share.bits_per_weight,
                 "plan_index": None, "plans": 1, "swaps": 0}
        if self.control is not None:
            info, policy = self.control.plan_info(), self.control.policy
            state |= {"weight_bytes": info["weight_bytes"], "bits_per_weight": info["bits_per_weight"],
                      "plan_index": policy.current if policy else None,
                      "plans": len(policy.plans.plans) if policy else 1, "swaps": self.control.swaps}
            held = self.control.layer_bits()["layers"]
        else:
            held = layer_bits(module_precision(self.model), self.plan.modules)["layers"]
        return state | {"layer_bits": held, "mlx_active_bytes": mx.get_active_memory(),
                        "mlx_peak_bytes": mx.get_peak_memory(), "rss_bytes": psutil.Process().memory_info().rss,
                        "available_bytes": psutil.virtual_memory().available}

    @staticmethod
    def whole_model(ranks: list[dict], other_bits: float | None) -> dict:
        """The model across ``ranks`` (``ranks_state``): weight bytes every rank holds
        together, their bits per weight, and every layer's bits from the rank that holds it."""
        weight_bytes = sum(r["weight_bytes"] for r in ranks)
        weights = sum(r["weight_bytes"] * 8 / r["bits_per_weight"] for r in ranks if r["bits_per_weight"])
        return {"weight_bytes": weight_bytes, "bits_per_weight": weight_bytes * 8 / weights if weights else None,
                "layer_bits": {"layers": [b for r in ranks for b in r["layer_bits"]], "other": other_bits}}

    def tick_followers(self) -> None:
        """Rank 0, idle: the ranks that follow it check their memory (they adapt after
        every call otherwise)."""
        if self.driven and self.rank == 0:
            self._announce(TICK)

    def release_followers(self) -> None:
        """Rank 0, at the end: the ranks that follow it stop."""
        if self.driven and self.rank == 0:
            self._announce(STOP)

    def follow(self) -> None:
        """Ranks after 0: run the calls rank 0 announces, on caches that track rank 0's
        (a new cache, or one trimmed back to where rank 0's stands), until it stops."""
        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

        cache = None
        while True:
            header = mx.distributed.all_sum(mx.zeros((6,), mx.int32), group=self.group).tolist()
            op, new, offset, batch, length, all_positions = header
            if op == STOP:
                return
            if op == STATE:
                self.ranks.gather(self._own_state())
                continue
            if op == TICK:
                if self.adaptation:
                    self.adaptation.between_calls(idle=True)
                continue
            if op != FORWARD:
                raise UserError(f"rank {self.rank}: rank 0 sent an unknown request ({op})")
            if new or cache is None:
                cache = make_prompt_cache(self)
            elif offset >= 0 and self._offset(cache) > offset:
                trim_prompt_cache(cache, self._offset(cache) - offset)
            self.all_positions = bool(all_positions)
            self(mx.zeros((batch, length), mx.int32), cache=cache)
            if self.adaptation:
                self.adaptation.between_calls()


def _carry(cache, sent) -> None:
    """Make evaluating ``cache`` (what a prefill evaluates) evaluate ``sent`` too."""
    if getattr(cache, "keys", None) is not None:
        cache.keys = mx.depends(cache.keys, sent)
    elif isinstance(getattr(cache, "cache", None), list) and cache.cache and cache.cache[0] is not None:
        cache.cache[0] = mx.depends(cache.cache[0], sent)
    else:
        mx.eval(sent)


def bytes_between_ranks(pipeline: PipelinePlan, hidden: int, vocabulary: int, tokens: int = 1) -> int:
    """What crosses between ranks for ``tokens`` positions: each rank's activations to
    the next (float32) and the logits' all-sum (each rank sends about its size once)."""
    n = len(pipeline.ranks)
    return tokens * (n - 1) * hidden * 4 + n * vocabulary * 4


@dataclass
class RankAdaptation:
    """A following rank's own memory policy: between rank 0's calls it samples its
    memory (at most every ``every`` seconds) and swaps its own layers, a layer group
    per call (all of them when idle)."""

    control: object  # runtime.precision.PrecisionController
    sampler: object
    every: float = 1.0
    sampled: float = float("-inf")

    def between_calls(self, idle: bool = False) -> None:
        control = self.control
        while control.swap:
            control.step()
            if not idle:
                return
        if time.monotonic() - self.sampled < self.every:
            return
        self.sampled = time.monotonic()
        sample = self.sampler.sample()
        choice = control.policy.decide(sample)
        if choice is not None:
            control.start(control.policy.plans.plans[choice], f"rank memory: {sample.available_bytes / 1e9:.2f} GB "
                          "available")
            if idle:
                while control.swap:
                    control.step()
