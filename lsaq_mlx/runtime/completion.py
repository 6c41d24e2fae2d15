"""One stateless completion for the engine to run (what a server request becomes).

The engine thread feeds it tokens; the caller's thread reads ``CompletionEvent``s from
``events``. Text up to a stop sequence is sent and the rest withheld: a piece that could
be the start of a stop sequence waits until the next token decides it.
"""

import queue
import threading
from dataclasses import dataclass, field

from lsaq_mlx.runtime.sampling import Sampling


@dataclass(frozen=True)
class CompletionEvent:
    kind: str  # "started" | "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # done: "stop" | "length" | "cancelled"
    usage: dict | None = None  # done: prompt_tokens, completion_tokens, total_tokens
    info: dict | None = None  # done: bits per weight at the start and end, swaps while it ran
    logprobs: tuple = ()  # text: the log-probabilities of the tokens it ends (``token_logprob``), when asked
    status: int = 500  # error: as an HTTP status (400: the request itself cannot run)
    param: str | None = None  # error: the request field at fault
    code: str | None = None  # error: OpenAI's code ("context_length_exceeded")


@dataclass(eq=False)
class Completion:
    tokens: list[int]  # the whole prompt; empty: the engine makes it from ``prompt`` or ``messages``
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    logits: dict = field(default_factory=dict)  # make_logits_processors' arguments: logit_bias, *_penalty
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    text: str = ""  # everything generated, up to a stop sequence
    sent: int = 0  # characters of ``text`` sent as events
    stopped: bool = False  # a stop sequence was generated
    ended: bool = False  # its done or error event is sent
    prompt: str | None = None  # a raw prompt, tokenized by the engine (which owns the tokenizer)
    messages: tuple | None = None  # or chat messages, through the model's chat template
    logprobs: int | None = None  # report each token's log-probability and this many alternatives; None: do not
    tools: tuple | None = None  # function tools for the chat template (OpenAI's form)
    template_kwargs: dict | None = None  # more names for the chat template (enable_thinking...)
    pending: list = field(default_factory=list)  # log-probabilities of tokens whose text is not sent yet

    def cancel(self) -> None:
        """The caller has gone: the engine ends this completion at its next token (or skips it)."""
        self.cancelled.set()

    def logits_processors(self) -> list | None:
        from mlx_lm.sample_utils import make_logits_processors

        return make_logits_processors(**self.logits) if self.logits else None

    def refused(self, context: int, vocabulary: int) -> bool:
        """Ends the completion before it starts when its caller has left, its prompt does
        not fit ``context`` tokens, or a token id it names is outside ``vocabulary`` (MLX
        does not check indices: one would crash the process); whether it did."""
        ids = [*self.tokens, *(self.logits.get("logit_bias") or ())]
        if self.cancelled.is_set():
            self.finish("cancelled", len(self.tokens), 0, {})
        elif not self.tokens or len(self.tokens) >= context:
            self.fail(f"the prompt is {len(self.tokens)} tokens; the model's context holds {context}", 400,
                      "messages" if self.messages is not None else "prompt", "context_length_exceeded")
        elif not all(isinstance(t, int) and 0 <= t < vocabulary for t in ids):
            self.fail(f"a token id is outside the model's vocabulary of {vocabulary}", 400)
        else:
            return False
        return True

    def should_stop(self) -> bool:
        return self.stopped or self.cancelled.is_set()

    def feed(self, piece: str, logprob: dict | None = None) -> None:
        """Called by the engine with each token's text (and its ``token_logprob``)."""
        if self.stopped:
            return
        if logprob is not None:
            self.pending.append(logprob)
        self.text += piece
        cut = self._stop_at()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            self._send(len(self.text))
        else:
            self._send(len(self.text) - self._undecided())

    def finish(self, finish_reason: str, prompt_tokens: int, completion_tokens: int, info: dict,
               cached_tokens: int = 0) -> None:
        """``cached_tokens``: prompt tokens whose KV cache was reused, not computed."""
        self._send(len(self.text))
        reason = "cancelled" if self.cancelled.is_set() else "stop" if self.stopped else finish_reason
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": cached_tokens}}
        self.events.put(CompletionEvent("done", finish_reason=reason, usage=usage, info=info))
        self.ended = True

    def start(self) -> None:
        """Its prompt is tokenized and accepted: it will run (a server may now send headers)."""
        self.events.put(CompletionEvent("started"))

    def fail(self, message: str, status: int = 500, param: str | None = None, code: str | None = None) -> None:
        """Ends the completion with an error, unless it has already ended."""
        if not self.ended:
            self.events.put(CompletionEvent("error", text=message, status=status, param=param, code=code))
            self.ended = True

    def _stop_at(self) -> int | None:
        # a stop sequence may start in text already sent only if it was withheld, so the
        # search starts where the longest one could
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        found = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(found) if found else None

    def _undecided(self) -> int:
        """How many trailing characters could begin a stop sequence."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(s[:n])), default=0)

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.events.put(CompletionEvent("text", text=self.text[self.sent:upto], logprobs=tuple(self.pending)))
            self.sent, self.pending = upto, []


def token_logprob(tokenizer, token: int, logprobs, top: int) -> dict:
    """``{"token", "logprob", "top": [(text, logprob)...]}`` of a generated ``token`` from
    its step's log-probabilities over the vocabulary (an MLX vector), ``top`` alternatives."""
    import mlx.core as mx

    entry = {"token": tokenizer.decode([token]), "logprob": float(logprobs[token]), "top": []}
    if top:
        ids = mx.argpartition(-logprobs, top - 1)[:top]
        values = logprobs[ids]
        order = mx.argsort(-values)
        entry["top"] = [(tokenizer.decode([int(i)]), float(v)) for i, v in zip(ids[order].tolist(), values[order].tolist())]
    return entry
