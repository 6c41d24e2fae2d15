"""The engine: one long-lived thread owns the model and does all MLX work.

Callers call its commands (``runtime.commands``: ``chat``, ``stop``, ``apply_plan``,
``apply_budget``, ``set_auto``, ``request_state``, ``reset``, ``retract``,
``set_system``, and ``complete`` for a server's stateless requests), which return at
once with their own reply (a ``Future``); displays receive the events of
``runtime.events`` through ``events`` or a callback (a completion's own events go to the
completion). A conversation keeps its KV cache
across turns (only the new part of the prompt is processed), across a stopped reply,
and across swaps. Swaps requested while a reply streams are applied between tokens, one
decoder layer per token.
"""

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors

from lsaq_mlx.backend.allocator import return_freed_memory
from lsaq_mlx.backend.compute import compute_mode, float_copy_bytes, float_copy_paths, prepare_for_compute
from lsaq_mlx.errors import UserError
from lsaq_mlx.planning.plan import PlanSet, QuantPlan
from lsaq_mlx.runtime.batch import CompletionBatch, batchable, batchable_model
from lsaq_mlx.runtime.commands import (
    IMMEDIATE,
    ApplyBudget,
    ApplyPlan,
    Chat,
    Command,
    Complete,
    EngineCommands,
    EngineStopped,
    Evaluate,
    RequestState,
    Reset,
    Retract,
    SetAuto,
    SetSystem,
)
from lsaq_mlx.runtime.completion import Completion, token_logprob
from lsaq_mlx.runtime.tool_calls import ToolCalling
from lsaq_mlx.runtime.conversation import Conversation
from lsaq_mlx.runtime.prompts import PromptRefused, prompt_tokens
from lsaq_mlx.runtime.events import (
    EngineError,
    EngineState,
    MemoryUpdate,
    Note,
    PerplexityMeasured,
    Ready,
    ReplyDone,
    ReplyStats,
    StateUpdate,
    Swapped,
    Token,
)
from lsaq_mlx.runtime.layers import module_precision
from lsaq_mlx.runtime.options import RuntimeOptions
from lsaq_mlx.runtime.policy import Policy
from lsaq_mlx.runtime.precision import PrecisionController, process_memory
from lsaq_mlx.runtime.swap import SwapInProgress, module_maker
from lsaq_mlx.sources.tensors import DequantizedTensors, stored_bits
from lsaq_mlx.adaptive.folder import planner_for
from lsaq_mlx.planning.planner import PlanRequest
from lsaq_mlx.sources import ModelSource, load_model
from lsaq_mlx.sources.load import load_tokenizer, model_tensors
from lsaq_mlx.documents import read_json
from lsaq_mlx.scoring.lens import find_lens


REPETITION_PENALTY = 1.1  # small models loop under greedy decoding without it
DEFAULT_CONTEXT = 4096  # tokens, for configs that do not say


LATER = object()  # a command whose reply comes later (a swap ends between tokens)


@dataclass(frozen=True)
class EngineInfo:
    """What callers on other threads may read of a started engine (it never changes)."""

    context: int  # tokens
    vocabulary: int  # token ids below this reach the model
    eos_token_ids: tuple[int, ...]
    tool_calling: object = None  # runtime.tool_calls.ToolCalling: the model's tool-call markers and parser


class Engine(EngineCommands):
    def __init__(self, source: ModelSource, planner=None, options: RuntimeOptions | None = None,
                 sampler=None, on_event=None, importance=None, sample_every: float = 1.0,
                 policy_options: dict | None = None):
        """``planner`` makes plans of ``options.method`` (in the engine thread);
        ``options.bits_budget`` picks the starting plan; in automatic mode (``options.auto``
        or a memory trace) ``options.budgets`` make the PlanSet it moves through as
        ``sampler``'s memory samples dictate (``policy_options`` tune its ``Policy``).
        ``importance() -> {"metric", "scores"}`` (one score per decoder layer) is called
        once while loading, for displays; ``options.memory_events`` sends a ``memory``
        event every ``sample_every`` seconds."""
        options = options or RuntimeOptions()
        following = options.auto or options.memory_trace is not None
        self.source, self.planner = source, planner
        self.budget, self.auto_budgets = options.bits_budget, list(options.budgets) if following else []
        self.method, self.sampling = options.method, options.sampling
        self.sampler, self.sample_every = sampler, sample_every
        self.policy_options = {"reserve": options.reserve_bytes} | (policy_options or {})
        self.importance_of, self.memory_events = importance, options.memory_events
        self.use_layer_store = options.layer_store
        self.planned = options.planned
        self.chat_template, self.template_args = options.chat_template, dict(options.chat_template_args)
        self.importance, self.last_sample, self._sampled_at = None, None, float("-inf")
        self._rank_plans: list | None = None  # a pipeline: each rank's (plan index, swaps) a display last saw
        self.events = queue.Queue()
        self.on_event = on_event or self.events.put
        self.conversation = Conversation()
        self.auto = bool(self.auto_budgets)
        self._init_commands()
        self._thread = threading.Thread(target=self._run, name="lsaq-engine", daemon=True)
        self._ready = threading.Event()
        self._error = None
        self.info: EngineInfo | None = None  # published at ready

    @property
    def messages(self) -> list[dict]:
        return self.conversation.messages

    # ---- called from any thread (the commands are EngineCommands') ----
    def start(self) -> "Engine":
        self._thread.start()
        self._ready.wait()
        if self._error:
            # the thread must be gone before the error ends the process: one still inside
            # MLX while the interpreter finalizes aborts it ("terminate called ...")
            self._thread.join()
            raise self._error
        return self

    def running(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop at the next token, whatever is running or queued, and end the engine thread."""
        self.inbox.close()
        self.stop()
        self._thread.join()

    # ---- the engine thread ----
    def _run(self) -> None:
        try:
            self._serve()
        except Exception as e:  # the loop itself failed: tell the caller, which cannot go on
            self.on_event(EngineError(f"the engine stopped: {type(e).__name__}: {e}", fatal=True))
        finally:
            # streams made by this thread (mlx-lm's generation stream) must die with it,
            # or the process aborts at exit
            mx.synchronize()
            mx.clear_streams()

    def _serve(self) -> None:
        if self.sampling.seed is not None:
            mx.random.seed(self.sampling.seed)
        try:
            self._load()
        except Exception as e:  # reported to start()
            self._error = e
            self._ready.set()
            return
        if self.chat_template:  # --chat-template: in place of the model's
            self.tokenizer.chat_template = self.chat_template
        self.info = EngineInfo(self.context, self.vocabulary, tuple(self.tokenizer.eos_token_ids),
                               ToolCalling.of(self.tokenizer))
        self._ready.set()
        self.on_event(Ready(self._state(), time.time()))
        try:
            while not self.inbox.closing.is_set():
                command = self.inbox.next(timeout=self.sample_every)
                if command is None:
                    self._follow_memory()
                    if hasattr(self.model, "tick_followers"):
                        self._follow_ranks()
                    continue
                self._run_command(command)
                while self.control.swap and not self.inbox.closing.is_set():  # a swap asked between replies: all now
                    self._swap_step()
        finally:
            stopped = EngineStopped("the engine has stopped")
            self.inbox.fail_all(stopped)
            for reply in self.control.swap.replies if self.control.swap else []:
                reply.set_exception(stopped)

    def _run_command(self, command: Command) -> None:
        """Run ``command`` and answer its reply (unless its answer comes later); a failure
        is also an ``EngineError`` event, for displays."""
        try:
            result = self._handle(command)
        except Exception as e:
            message = str(e) if isinstance(e, UserError) else f"{command.name} failed: {type(e).__name__}: {e}"
            self.on_event(EngineError(message, command.name))
            if not command.reply.done():
                command.reply.set_exception(e)
            return
        if result is not LATER and not command.reply.done():
            command.reply.set_result(result)

    def _handle(self, command: Command):
        """What ``command`` does; its reply, or ``LATER`` when the reply comes later."""
        match command:
            case Chat():
                return self._chat(command)
            case Complete(job=job):
                return self._complete(job)
            case ApplyPlan(plan=plan, reason=reason):
                self._by_hand()
                return self._apply_plan(plan, reason, command.reply)
            case ApplyBudget(bits_per_weight=bits):
                plan = self._plans([bits])[0]
                self._by_hand()
                return self._apply_plan(plan, f"budget {bits:g} bits/weight", command.reply)
            case SetAuto(on=on):
                return self._set_auto(on)
            case RequestState():
                return self._state_update()
            case SetSystem(text=text):
                self.conversation.set_system(text)
            case Reset():
                self.conversation.reset()
                self.cache, self.cache_tokens = None, []
            case Retract():
                self.conversation.retract()  # the KV cache of the rest is reused
            case Evaluate(tokens=tokens, seq_len=seq_len):
                from lsaq_mlx.evaluation.perplexity import perplexity

                event = PerplexityMeasured(perplexity(self.model, tokens, seq_len).to_dict())
                self.on_event(event)
                return event
        return self._state_update()  # the conversation commands answer with the state after them

    def _plans(self, budgets) -> list[QuantPlan]:
        if self.planner is None:
            raise UserError("this session has no planner")
        return self.planner.plans(PlanRequest(method=self.method, bits_budgets=list(budgets)))

    def _load(self) -> None:
        if self.planned is not None:
            return self._load_planned()
        plan, policy = self._starting_plan()
        stored_plan = getattr(self.planner, "stored_plan", None)  # an adaptive folder's
        source_bits = source_bytes = None
        if plan is not None and stored_plan is None:
            from lsaq_mlx.convert import quantized_model

            self.model, _ = quantized_model(self.source, plan, self.planner.model_in_memory())
            self.planner.release()  # planning again reads the cached cost table, not these weights
            self.tokenizer = load_tokenizer(self.source)
        else:
            from lsaq_mlx.swsc.layer import model_bits_per_weight

            self.model, self.tokenizer, _ = load_model(self.source, compute=False, lazy=True)
            source_bits = model_bits_per_weight(self.model)
            source_bytes = sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))
        precision = module_precision(self.model)
        float_paths = float_copy_paths(self.model, float_copy_bytes())
        config = self._source_config()
        self.context = int(config.get("max_position_embeddings") or DEFAULT_CONTEXT)
        self.vocabulary = find_lens(self.model).vocab_size
        weights = model_tensors(self.source)
        ceilings = stored_bits(weights, config)
        if config.get("quantization"):  # no float source: plans at or below the stored precision, from it
            weights = DequantizedTensors(weights, config)
        store = getattr(self.planner, "side_store", None)
        if self.use_layer_store and store is None:
            from lsaq_mlx.storage.layer_store import LayerStore

            store = LayerStore.for_model(self.source.fingerprint)
            store.build(policy.plans.plans if policy else [plan] if plan else [], module_maker(self.model, weights))
        self.control = PrecisionController(self.model, stored_plan or plan, precision, policy, weights, store,
                                           float_paths, compute_mode() == "float32", source_bits, source_bytes, ceilings)
        if stored_plan is not None and plan is not None and plan is not stored_plan:
            # before the stored model is read: the modules it replaces are never in memory
            self.control.start(plan, "the starting plan, from the stored one")
            while self.control.swap:
                self.control.step()
        prepare_for_compute(self.model, float_paths=float_paths)
        return_freed_memory()  # what building the model one module at a time took and freed
        self.batchable = batchable_model(self.model)
        self.cache, self.cache_tokens = None, []
        self.last_reply: ReplyStats | None = None
        if self.importance_of is not None:
            self.importance = self.importance_of()

    def _load_planned(self) -> None:
        """The model of a plan file (``--plan``): this rank's stage of a pipeline, or the
        whole plan; its precision stays as planned."""
        from lsaq_mlx.runtime.pipeline import PipelineStage

        self.model, config = self.planned.load(self.source)
        net = self.model.model if isinstance(self.model, PipelineStage) else self.model
        self.tokenizer = load_tokenizer(self.source)
        self.context = int(config.get("max_position_embeddings") or DEFAULT_CONTEXT)
        self.vocabulary = int(config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size"))
        own = self.planned.adaptation(self.source, self.model, config, self.policy_options)
        self.control = own or PrecisionController(net, self.planned.held_plan(), module_precision(net), None, None,
                                                  None, set(), compute_mode() == "float32")
        if isinstance(self.model, PipelineStage):
            self.model.control = self.control
        self.batchable = not isinstance(self.model, PipelineStage) and batchable_model(net)
        self.cache, self.cache_tokens = None, []
        self.last_reply: ReplyStats | None = None

    def _starting_plan(self) -> tuple[QuantPlan | None, Policy | None]:
        """The plan to load (``budget``'s, or automatic mode's pick) and automatic mode's policy."""
        plan = self._plans([self.budget])[0] if self.budget is not None else None
        if not self.auto_budgets:
            return plan, None
        plans = getattr(self.planner, "plan_set", None) or PlanSet(self._plans(self.auto_budgets))
        policy = Policy(plans, **self.policy_options)
        plans = policy.plans.plans
        if plan is None:
            policy.current = len(plans) - 1
            policy.decide(self.sampler.sample())
            return plans[policy.current], policy
        policy.current = min(range(len(plans)), key=lambda i: abs(plans[i].predicted_bytes - plan.predicted_bytes))
        return plan, policy

    def _chat(self, command: Chat) -> ReplyDone:
        self.conversation.ask(command.text)
        try:
            tokens, dropped = self.conversation.prompt(self.tokenizer, self.context, self.template_args)
            if dropped:
                self.on_event(Note(f"the conversation outgrew the model's context of {self.context} tokens: the "
                                   f"{dropped} oldest messages were dropped"))
            processors = make_logits_processors(repetition_penalty=REPETITION_PENALTY)
            reply, stats, _ = self._generate(tokens, min(command.max_tokens, self.context - len(tokens)),
                                             self.sampling.sampler(command.temp), processors,
                                             lambda text: self.on_event(Token(text)), command.cancel.is_set)
        except BaseException:  # the conversation stays as it was before this message
            self.conversation.take_back()
            raise
        self.conversation.answer(reply)
        self.last_reply = stats
        done = ReplyDone(reply, stats)
        self.on_event(done)
        return done

    def _complete(self, job: Completion) -> None:
        if batchable(job) and self.batchable:
            others = self._batchable_completions()
            if others:
                return self._run_batch([job, *others])
        if not self._accept(job):
            return
        start_bits, swaps = self.control.plan_info()["bits_per_weight"], self.control.swaps
        try:
            if job.sampling.seed is not None:
                mx.random.seed(job.sampling.seed)
            _, stats, reason = self._generate(job.tokens, min(job.max_tokens, self.context - len(job.tokens)),
                                              job.sampling.sampler(), job.logits_processors(), job.feed,
                                              job.should_stop, job.logprobs)
        except Exception as e:
            job.fail(f"generation failed: {type(e).__name__}: {e}")
            raise
        self.last_reply = stats
        job.finish(reason, len(job.tokens), stats.generation_tokens,
                   {"bits_per_weight_start": start_bits, "bits_per_weight_end": stats.bits_per_weight,
                    "swaps": self.control.swaps - swaps}, len(job.tokens) - stats.prompt_tokens)

    def _batchable_completions(self) -> list[Completion]:
        """The queued completions that may join a batch, taken from the queue (their
        commands are answered: from here on the completion's own events speak)."""
        taken = self.inbox.take(lambda c: isinstance(c, Complete) and batchable(c.job))
        for command in taken:
            command.reply.set_result(None)
        return [c.job for c in taken]

    def _accept(self, job: Completion) -> bool:
        """Tokenize ``job``'s prompt here, on the thread that owns the tokenizer, and check
        it: a prompt over the context, an id outside the vocabulary or a template that
        refuses the messages ends the job (a 400 for the server); whether it may run."""
        if not job.tokens:
            if job.prompt is None and job.messages is None:
                job.fail("the completion has no prompt", 400)
                return False
            try:
                job.tokens = prompt_tokens(self.tokenizer, job.prompt, job.messages, self.context, job.tools,
                                           self.template_args | (job.template_kwargs or {}))
            except PromptRefused as e:
                job.fail(str(e), 400, e.param, e.code)
                return False
        if job.refused(self.context, self.vocabulary):
            return False
        job.start()
        return True

    def _generate(self, tokens: list[int], max_tokens: int, sampler, processors, emit, should_stop,
                  logprobs: int | None = None) -> tuple[str, ReplyStats, str | None]:
        """Generate after ``tokens``, sending each piece of text to ``emit`` and ending
        early when ``should_stop()`` (or at shutdown); the text, its statistics and
        mlx-lm's finish reason. A reply stopped before it began is empty."""
        stopping = lambda: should_stop() or self.inbox.closing.is_set()  # noqa: E731
        prefix = self._reuse_cache(tokens)
        feed, generated, pieces, last = tokens[prefix:], [], [], None
        stopped, checked = stopping(), time.monotonic()
        started, first_token = time.perf_counter(), None
        steps = () if stopped else stream_generate(self.model, self.tokenizer, mx.array(feed), max_tokens=max_tokens,
                                                   sampler=sampler, prompt_cache=self.cache,
                                                   logits_processors=processors)
        for last in steps:
            generated.append(last.token)
            pieces.append(last.text)
            first_token = first_token or time.perf_counter() - started
            if logprobs is None:
                emit(last.text)
            else:  # each token's log-probability and its ``logprobs`` likeliest alternatives
                emit(last.text, token_logprob(self.tokenizer, last.token, last.logprobs, logprobs))
            if stopping():
                stopped = True
                break
            checked = self._between_tokens(checked)
        # tokens the cache holds (a hybrid model's recurrent layers do not count them)
        offset = next((c.offset for c in self.cache or [] if hasattr(c, "offset")), 0)
        self.cache_tokens = (tokens[:prefix] + feed + generated)[:offset]
        while self.control.swap and not stopped:
            self._swap_step()
        stats = ReplyStats(len(feed) if last else 0, last.prompt_tps if last else 0.0,
                           last.generation_tokens if last else 0, last.generation_tps if last else 0.0,
                           mx.get_peak_memory(), stopped, first_token or 0.0, self.control.plan_info()["bits_per_weight"])
        return "".join(pieces), stats, "stop" if stopped else last.finish_reason if last else "length"

    def _run_batch(self, jobs: list[Completion]) -> None:
        """Decode ``jobs`` together; completions queued meanwhile join; between steps as
        between tokens in ``_generate``. At shutdown the batch ends at the next step."""
        batch = CompletionBatch(self.model, self.tokenizer, self.context, self.vocabulary, self.sampling.max_kv_size,
                                lambda: (self.control.plan_info()["bits_per_weight"], self.control.swaps))
        checked, taken, closing = time.monotonic(), list(jobs), self.inbox.closing
        try:
            batch.add([j for j in jobs if self._accept(j)])
            while batch and not closing.is_set():
                batch.step()
                joining = self._batchable_completions()
                taken += joining
                batch.add([j for j in joining if self._accept(j)])
                checked = self._between_tokens(checked)
        except Exception as e:
            for job in taken:  # those still running or waiting to join; ended ones ignore it
                job.fail(f"generation failed: {type(e).__name__}: {e}")
            raise
        finally:
            batch.close()
            self.cache, self.cache_tokens = None, []  # the batch's caches were its own
            return_freed_memory()  # a long-running server returns the batch's buffers, sized by its peak
        for job in taken if closing.is_set() else []:
            job.fail("the server is shutting down", 503)
        self.last_reply = ReplyStats(batch.prompt_tokens, 0.0, batch.generated, batch.generation_tps(),
                                     mx.get_peak_memory(), False, 0.0, self.control.plan_info()["bits_per_weight"])

    def _between_tokens(self, checked: float) -> float:
        """Between two tokens: answer swap and state requests, swap one layer of a pending
        plan change or, every ``sample_every`` seconds after ``checked``, sample memory;
        the time of the last sample. Other commands wait for the reply to end."""
        for command in self.inbox.take(lambda c: isinstance(c, IMMEDIATE)):
            self._run_command(command)
        if self.control.swap:
            self._swap_step()
        elif (self.auto or self.memory_events) and time.monotonic() - checked >= self.sample_every:
            checked = time.monotonic()
            self._follow_memory(during_generation=True)
        return checked

    def _reuse_cache(self, tokens: list[int]) -> int:
        """Keep the cache of the longest common prefix; return its length. A recurrent
        layer's state cannot be trimmed: it is kept only when nothing is to be trimmed."""
        prefix = 0
        for a, b in zip(self.cache_tokens, tokens):
            if a != b:
                break
            prefix += 1
        prefix = min(prefix, len(tokens) - 1)  # at least one token must be fed
        if self.cache is not None and prefix > 0 and prefix == len(self.cache_tokens):
            return prefix
        if self.cache is not None and prefix > 0 and can_trim_prompt_cache(self.cache):
            trim_prompt_cache(self.cache, len(self.cache_tokens) - prefix)
            return prefix
        self.cache = make_prompt_cache(self.model, self.sampling.max_kv_size)
        return 0

    # ---- precision changes ----
    def _source_config(self) -> dict:
        from lsaq_mlx.formats import normalized_config

        return normalized_config(read_json(self.source.path / "config.json"))

    def _apply_plan(self, plan: QuantPlan | int, reason: str = "requested", reply: Future | None = None):
        """Start swapping to ``plan``, or to the plan of that index in the PlanSet (smallest
        first), one layer group at a time (all of it now unless a reply streams); ``reply``
        gets its ``Swapped`` when it is done. Returns ``LATER``."""
        plan = self.control.plan_at(plan) if isinstance(plan, int) else plan
        done = self.control.start(plan, reason, reply)
        if done:
            self._swapped(done)
        return LATER

    def _swap_step(self) -> None:
        done = self.control.step()
        if done:
            self._swapped(done)

    def _swapped(self, swap: SwapInProgress) -> None:
        r = swap.report
        event = Swapped(len(r.changed), r.failed, time.perf_counter() - swap.started, r.source_bytes, r.store_bytes,
                        swap.from_bits_per_weight, swap.reason, swap.at, swap.memory_before, process_memory(),
                        self._state())
        self.on_event(event)
        for reply in swap.replies:
            if not reply.done():
                reply.set_result(event)

    def _sample(self, max_age: float = 0.0):
        """A memory sample; one taken less than ``max_age`` seconds ago is reused (a
        sampler that replays a trace moves on with every sample)."""
        if self.last_sample is None or time.monotonic() - self._sampled_at >= max_age:
            self.last_sample, self._sampled_at = self.sampler.sample(), time.monotonic()
        return self.last_sample

    def _follow_memory(self, during_generation: bool = False) -> None:
        """Sample the memory: report it (``memory_events``) and, in automatic mode, let
        the policy pick the plan."""
        policy = self.control.policy
        following = self.auto and self.sampler and policy
        if not self.sampler or not (following or self.memory_events):
            return
        sample = self._sample()
        if self.memory_events:
            self.on_event(MemoryUpdate(sample.to_dict(), policy.describe() if policy else None))
        if not following:
            return
        before = policy.current
        choice = policy.decide(sample)
        if choice is not None:
            direction = "down" if choice < before else "up"
            reason = (f"auto {direction}: {sample.available_bytes / 1e9:.2f} GB available, "
                      f"{sample.pressure} pressure")
            self._apply_plan(policy.plans.plans[choice], reason)
            if not during_generation:
                while self.control.swap:
                    self._swap_step()

    def _follow_ranks(self) -> None:
        """A pipeline, idle: the other ranks follow their memory too; a display hears
        when one of them moved to another plan."""
        self.model.tick_followers()
        if not self.memory_events:
            return
        state = self._state()
        plans = [(r["plan_index"], r["swaps"]) for r in state.ranks]
        if plans != self._rank_plans:
            self._rank_plans = plans
            self.on_event(StateUpdate(state))

    # ---- everything else ----
    def _set_auto(self, on: bool) -> StateUpdate:
        policy = self.control.policy
        if on and not (self.sampler and policy):
            raise UserError("automatic mode needs a plan set: start in automatic mode or with a memory trace",
                            setting="auto")
        if on and not self.auto:  # the policy moves on from the plan of the set nearest to what is held
            held = self.control.plan_info()["weight_bytes"]
            policy.current = min(range(len(policy.plans.plans)),
                                 key=lambda i: abs(policy.plans.plans[i].predicted_bytes - held))
        self.auto = on
        return self._state_update()

    def _by_hand(self) -> None:
        """A plan chosen by hand ends automatic mode (the policy would undo it); a note says so."""
        if self.auto:
            self.auto = False
            self.on_event(Note("automatic mode is off: a plan was chosen by hand (/auto on resumes it)"))

    def _state_update(self) -> StateUpdate:
        event = StateUpdate(self._state())
        self.on_event(event)
        return event

    def _state(self) -> EngineState:
        sample = self._sample(max_age=self.sample_every).to_dict() if self.sampler else {}
        control = self.control
        plan = control.plan_info() | {"layer_bits": control.layer_bits()}
        ranks = self.model.ranks_state() if hasattr(self.model, "ranks_state") else None
        if ranks:  # the model is every rank's layers
            plan |= self.model.whole_model(ranks, plan["layer_bits"]["other"])
        return EngineState(**plan, auto=self.auto, messages=len(self.conversation.messages),
                           cached_tokens=len(self.cache_tokens), mlx_active_bytes=mx.get_active_memory(),
                           mlx_peak_bytes=mx.get_peak_memory(), memory=sample, layers=control.layer_settings(),
                           last_reply=self.last_reply.to_dict() if self.last_reply else {},
                           importance=self.importance,
                           policy=control.policy.describe() if control.policy else None, ranks=ranks)


def build_engine(source: ModelSource, options: RuntimeOptions):
    """An engine (not started) for ``source``: a planner for ``options.method``, the plan
    set of ``options.budgets`` in automatic mode, the system's memory or a replayed trace."""
    from lsaq_mlx.runtime.memory import ScriptedSampler, SystemSampler

    options.check()
    planner = planner_for(source)
    sampler = ScriptedSampler(options.memory_trace) if options.memory_trace else SystemSampler()
    importance = None
    if options.importance:
        importance = lambda: _importance(planner, options.importance)  # noqa: E731 - run in the engine thread
    return Engine(source, planner, options, sampler, importance=importance)


def _importance(planner, metric: str) -> dict:
    scores = planner.scores(metric)
    return {"metric": scores.metric, "scores": scores.scores}
