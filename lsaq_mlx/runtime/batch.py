"""Several completions decoded together (continuous batching with mlx-lm's ``BatchGenerator``).

Decoding one token for four sequences reads the weights once instead of four times, so
concurrent requests finish sooner than in turn. Completions join while others run and
leave when they end, are cancelled, or generate a stop sequence. The longest prompt
prefix that the first completions share (a chat template's system prompt) is processed
once and its KV cache copied to every completion that starts with it. Seeded completions are
not batched (one random stream serves the whole batch), nor are models whose caches
cannot be merged (as mlx-lm's server decides).
"""

import time

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import KVCache, make_prompt_cache

from lsaq_mlx.runtime.completion import Completion, token_logprob


MIN_SHARED_PREFIX = 8  # tokens: a shorter shared prefix is not worth a cache of its own


def batchable_model(model) -> bool:
    return all(hasattr(c, "merge") for c in make_prompt_cache(model))


def batchable(job: Completion) -> bool:
    return job.sampling.seed is None


class CompletionBatch:
    def __init__(self, model, tokenizer, context: int, vocabulary: int, max_kv_size: int | None, plan_now):
        """``plan_now() -> (bits per weight, swaps so far)``, for each completion's report."""
        self.model, self.tokenizer, self.context, self.plan_now = model, tokenizer, context, plan_now
        self.vocabulary = vocabulary
        self.max_kv_size = max_kv_size
        self.prefix: tuple[list[int], list] | None = None  # a shared prompt prefix and its KV cache
        self.generator = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                                        max_kv_size=max_kv_size, stream=mx.default_stream(mx.default_device()))
        self.running: dict[int, dict] = {}  # uid -> the completion, its detokenizer and counts
        self.prompt_tokens = self.generated = 0
        self.started = time.perf_counter()

    def __bool__(self) -> bool:
        return bool(self.running)

    def add(self, jobs: list[Completion]) -> None:
        jobs = [j for j in jobs if not j.refused(self.context, self.vocabulary)]
        if not jobs:
            return
        if self.prefix is None:
            self.prefix = self._shared_prefix([j.tokens for j in jobs])
        shared = [self._reuses_prefix(j.tokens) for j in jobs]
        uids = self.generator.insert([j.tokens[n:] for j, n in zip(jobs, shared)],
                                     caches=[self._prefix_copy() if n else None for n in shared],
                                     all_tokens=[j.tokens[:n] for j, n in zip(jobs, shared)],
                                     max_tokens=[min(j.max_tokens, self.context - len(j.tokens)) for j in jobs],
                                     samplers=[j.sampling.sampler() for j in jobs],
                                     logits_processors=[j.logits_processors() or [] for j in jobs])
        bits, swaps = self.plan_now()
        for uid, job, cached in zip(uids, jobs, shared):
            self.running[uid] = {"job": job, "detokenizer": self.tokenizer.detokenizer, "tokens": 0,
                                 "bits": bits, "swaps": swaps, "cached": cached}
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
            job = entry["job"]
            wanted = job.logprobs is not None and r.finish_reason != "stop"
            job.feed(detokenizer.last_segment,
                     token_logprob(self.tokenizer, r.token, r.logprobs, job.logprobs) if wanted else None)
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
                             "swaps": swaps - entry["swaps"], "batched": True}, entry["cached"])

    def _shared_prefix(self, prompts: list[list[int]]) -> tuple[list[int], list] | None:
        """The longest prefix of ``prompts`` (two or more) that leaves each at least one
        token, with its KV cache; None when it is short or the caches are not plain."""
        if len(prompts) < 2:
            return None
        n = 0
        while n < min(len(p) for p in prompts) - 1 and len({p[n] for p in prompts}) == 1:
            n += 1
        cache = make_prompt_cache(self.model, self.max_kv_size)
        if n < MIN_SHARED_PREFIX or not all(type(c) is KVCache for c in cache):
            return None
        self.model(mx.array(prompts[0][:n])[None], cache=cache)
        mx.eval([c.state[:2] for c in cache])
        return prompts[0][:n], cache

    def _reuses_prefix(self, tokens: list[int]) -> int:
        """How many leading tokens of ``tokens`` the shared prefix's cache covers."""
        if self.prefix is None:
            return 0
        n = len(self.prefix[0])
        return n if len(tokens) > n and tokens[:n] == self.prefix[0] else 0

    def _prefix_copy(self) -> list:
        copies = []
        for c in self.prefix[1]:
            copy = KVCache()
            copy.state = (c.keys[..., : c.offset, :], c.values[..., : c.offset, :], c.offset)  # fresh arrays: no sharing
            copies.append(copy)
        return copies
