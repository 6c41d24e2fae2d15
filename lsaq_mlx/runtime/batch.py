"""Several completions decoded together (continuous batching with mlx-lm's ``BatchGenerator``).

Decoding one token for four sequences reads the weights once instead of four times, so
concurrent requests finish sooner than in turn. Completions join while others run and
leave when they end, are cancelled, or generate a stop sequence. Seeded completions are
not batched (one random stream serves the whole batch), nor are models whose caches
cannot be merged (as mlx-lm's server decides).
"""

import time

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache

from lsaq_mlx.runtime.completion import Completion


def batchable_model(model) -> bool:
    return all(hasattr(c, "merge") for c in make_prompt_cache(model))


def batchable(job: Completion) -> bool:
    return job.sampling.seed is None


class CompletionBatch:
    def __init__(self, model, tokenizer, context: int, max_kv_size: int | None, plan_now):
        """``plan_now() -> (bits per weight, swaps so far)``, for each completion's report."""
        self.tokenizer, self.context, self.plan_now = tokenizer, context, plan_now
        self.generator = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                                        max_kv_size=max_kv_size, stream=mx.default_stream(mx.default_device()))
        self.running: dict[int, dict] = {}  # uid -> the completion, its detokenizer and counts
        self.prompt_tokens = self.generated = 0
        self.started = time.perf_counter()

    def __bool__(self) -> bool:
        return bool(self.running)

    def add(self, jobs: list[Completion]) -> None:
        jobs = [j for j in jobs if not self._refused(j)]
        if not jobs:
            return
        uids = self.generator.insert([j.tokens for j in jobs],
                                     max_tokens=[min(j.max_tokens, self.context - len(j.tokens)) for j in jobs],
                                     samplers=[j.sampling.sampler() for j in jobs],
                                     logits_processors=[j.logits_processors() or [] for j in jobs])
        bits, swaps = self.plan_now()
        for uid, job in zip(uids, jobs):
            self.running[uid] = {"job": job, "detokenizer": self.tokenizer.detokenizer, "tokens": 0,
                                 "bits": bits, "swaps": swaps}
            self.prompt_tokens += len(job.tokens)

    def step(self) -> None:
        """One decoding step for every running completion (or a prompt chunk for new ones)."""
        _, responses = self.generator.next()
        for r in responses:
            entry = self.running.get(r.uid)
            if entry is None:
                continue
            detokenizer = entry["detokenizer"]
            if r.finish_reason != "stop":  # the end-of-sequence token is not text
                detokenizer.add_token(r.token)
                entry["tokens"] += 1
                self.generated += 1
            if r.finish_reason is not None:
                detokenizer.finalize()
            entry["job"].feed(detokenizer.last_segment)
            if r.finish_reason is not None:
                self._finish(r.uid, r.finish_reason)
        ended = [uid for uid, e in self.running.items() if e["job"].should_stop()]
        if ended:
            self.generator.remove(ended)
            for uid in ended:
                self._finish(uid, "stop")

    def close(self) -> None:
        self.generator.close()

    def generation_tps(self) -> float:
        return self.generated / max(time.perf_counter() - self.started, 1e-9)

    def _finish(self, uid: int, reason: str) -> None:
        entry = self.running.pop(uid)
        bits, swaps = self.plan_now()
        entry["job"].finish(reason, len(entry["job"].tokens), entry["tokens"],
                            {"bits_per_weight_start": entry["bits"], "bits_per_weight_end": bits,
                             "swaps": swaps - entry["swaps"], "batched": True})

    def _refused(self, job: Completion) -> bool:
        if job.cancelled.is_set():
            job.finish("cancelled", len(job.tokens), 0, {})
            return True
        if len(job.tokens) >= self.context:
            job.fail(f"the prompt is {len(job.tokens)} tokens; the model's context holds {self.context}")
            return True
        return False
