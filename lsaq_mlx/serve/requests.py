"""OpenAI request bodies -> ``CompletionRequest``, or an ``ApiError`` naming the field.

A field we read with the wrong type or range is a 400; so is a field asking for what we
do not do (tools, log-probabilities, a JSON response format...): a client must not take
a reply for what it asked when it was not. Fields that change nothing of the reply
(``user``, ``metadata``, ``store``...) are ignored, as OpenAI-compatible servers do.
"""

import math
from dataclasses import dataclass

from lsaq_mlx.documents import parse_json
from lsaq_mlx.errors import UserError
from lsaq_mlx.runtime.sampling import Sampling

MAX_BODY_BYTES = 8 << 20
MAX_BODY_DEPTH = 16  # messages with content parts nest 5 deep
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256  # each token's text is matched against every prefix of every stop sequence
MAX_LOGIT_BIAS = 300  # OpenAI's limit
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class CompletionRequest:
    chat: bool  # /v1/chat/completions (messages) or /v1/completions (prompt)
    messages: tuple[dict, ...] | None
    prompt: str | None
    model: str | None
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logits: dict  # mlx-lm's logits processors: logit_bias, repetition/presence/frequency_penalty
    logprobs: int | None = None  # each token's log-probability and this many likeliest alternatives; None: not asked
    tools: tuple | None = None  # chat: OpenAI function tools, for the model's chat template
    template_kwargs: dict | None = None  # chat: chat_template_kwargs (enable_thinking...), as mlx_lm.server takes


def parse_body(raw: bytes) -> dict:
    try:
        body = parse_json(raw, "the request body", MAX_BODY_DEPTH)
    except UserError as e:
        raise ApiError(400, str(e)) from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def completion_request(body: dict, chat: bool, default_max_tokens: int, defaults: Sampling | None = None,
                       vocabulary: int | None = None) -> CompletionRequest:
    """The request in ``body``; what it leaves out comes from ``default_max_tokens`` and
    the server's ``defaults`` (its --temp, --top-p, --min-p, --seed, --max-kv-size);
    token ids (``logit_bias``) must be below ``vocabulary``."""
    get, defaults = _Fields(body), defaults or Sampling()
    _refuse_unsupported(body)
    if get.number("n", 1, 1, integer=True) != 1:
        raise ApiError(400, "only n = 1 is supported", "n")
    options = get.typed("stream_options", dict, "an object", {})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "stream_options.include_usage must be a boolean", "stream_options")
    max_tokens = get.number("max_completion_tokens", None, 1, integer=True)
    max_tokens = max_tokens or get.number("max_tokens", default_max_tokens, 1, integer=True)
    sampling = Sampling(temp=get.number("temperature", defaults.temp, 0.0, 2.0),
                        top_p=get.number("top_p", defaults.top_p, 0.0, 1.0),
                        top_k=get.number("top_k", defaults.top_k, 0, integer=True),
                        min_p=get.number("min_p", defaults.min_p, 0.0, 1.0),
                        seed=get.number("seed", defaults.seed, integer=True), max_kv_size=defaults.max_kv_size)
    try:
        sampling.check()
    except UserError as e:
        raise ApiError(400, str(e), e.setting) from None
    return CompletionRequest(
        chat=chat, messages=_messages(body) if chat else None, prompt=None if chat else _prompt(body),
        model=get.typed("model", str, "a string"), max_tokens=max_tokens, sampling=sampling, stop=_stop(body),
        stream=get.typed("stream", bool, "a boolean", False), include_usage=include_usage,
        logits=_logits(get, body, vocabulary), logprobs=_logprobs(get, body, chat), tools=_tools(body) if chat else None,
        template_kwargs=_template_kwargs(body) if chat else None)


UNSUPPORTED = ("functions", "function_call", "suffix", "audio", "prediction")
MAX_TOOLS = 128
MAX_TEMPLATE_KWARGS = 32
TEMPLATE_OWN = ("messages", "tools", "add_generation_prompt", "tokenize", "conversation")  # set by the server


def _template_kwargs(body: dict) -> dict | None:
    """``chat_template_kwargs``: names the model's chat template reads (``enable_thinking``),
    each a string, number, boolean or null."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs in (None, {}):
        return None
    if (not isinstance(kwargs, dict) or len(kwargs) > MAX_TEMPLATE_KWARGS
            or not all(k.isidentifier() and k not in TEMPLATE_OWN for k in kwargs)
            or not all(v is None or isinstance(v, (str, int, float, bool)) for v in kwargs.values())):
        raise ApiError(400, f"chat_template_kwargs must map at most {MAX_TEMPLATE_KWARGS} names to strings, numbers or "
                            "booleans", "chat_template_kwargs")
    return dict(kwargs)



def _tools(body: dict) -> tuple | None:
    """``tools``: function tools (each ``{"type": "function", "function": {"name", ...}}``);
    ``tool_choice`` may be ``auto`` (the default) or ``none`` (the tools are left out)."""
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise ApiError(400, "tool_choice: only \"auto\" and \"none\" are supported", "tool_choice",
                       "unsupported_parameter")
    tools = body.get("tools")
    if tools in (None, []) or choice == "none":
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) and t["function"]["name"] for t in tools):
        raise ApiError(400, f"tools must be a list of at most {MAX_TOOLS} function tools, each with a name", "tools")
    return tuple(tools)
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API (its completions API: 5)


def _logprobs(get: "_Fields", body: dict, chat: bool) -> int | None:
    """Chat: ``logprobs`` (a boolean) and ``top_logprobs`` (0-20, needs it); completions:
    ``logprobs`` (0-5 alternatives). None when not asked."""
    if not chat:
        return get.number("logprobs", None, 0, 5, integer=True)
    wanted = get.typed("logprobs", bool, "a boolean", False)
    top = get.number("top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    if top is not None and not wanted:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if wanted else None


def _refuse_unsupported(body: dict) -> None:
    """A 400 naming the first field that asks for something this server does not do."""
    for key in UNSUPPORTED:
        if body.get(key) not in (None, [], {}):
            raise ApiError(400, f"{key} is not supported by this server", key, "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ApiError(400, "response_format: only {\"type\": \"text\"} is supported", "response_format",
                       "unsupported_parameter")
    if body.get("echo") not in (None, False):
        raise ApiError(400, "echo is not supported by this server", "echo", "unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "best_of must be 1", "best_of", "unsupported_parameter")


class _Fields:
    def __init__(self, body: dict):
        self.body = body

    def number(self, key, default, low=None, high=None, integer=False):
        value = self.body.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not math.isfinite(value):
            raise ApiError(400, f"{key} must be {'an integer' if integer else 'a number'}", key)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise ApiError(400, f"{key} must be {bounds}, not {value}", key)
        return value

    def typed(self, key, kind, what, default=None):
        """The value of ``key`` (``default`` when absent or null), which must be a ``kind``."""
        value = self.body.get(key)
        if value is None:
            return default
        if not isinstance(value, kind):
            raise ApiError(400, f"{key} must be {what}", key)
        return value


def _messages(body: dict) -> tuple[dict, ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be an object with a role of {', '.join(ROLES)}", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        message = {"role": role, "content": _content(m.get("content"), i)}
        for key in ("tool_call_id", "name"):
            if isinstance(m.get(key), str):
                message[key] = m[key]
        if m.get("tool_calls") is not None:
            message["tool_calls"] = _tool_calls(m["tool_calls"], i)
        out.append(message)
    return tuple(out)


def _tool_calls(calls, i: int) -> list[dict]:
    """An assistant message's earlier tool calls, their JSON arguments read back into
    objects (chat templates write them out themselves)."""
    bad = ApiError(400, f"messages[{i}].tool_calls must be a list of function calls with a name and JSON arguments",
                   "messages")
    if not isinstance(calls, list):
        raise bad
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad
        arguments = function.get("arguments", "{}")
        try:
            arguments = parse_json(arguments, "arguments", MAX_BODY_DEPTH) if isinstance(arguments, str) else arguments
        except UserError:
            raise bad from None
        out.append({"id": str(call.get("id", "")), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def _content(content, i: int) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (one prompt per request)", "prompt")
    return prompt


def _logits(get: _Fields, body: dict, vocabulary: int | None) -> dict:
    logits = {"logit_bias": _logit_bias(body, vocabulary), "repetition_penalty": get.number("repetition_penalty", None, 0.0, 10.0),
              "presence_penalty": get.number("presence_penalty", None, -2.0, 2.0),
              "frequency_penalty": get.number("frequency_penalty", None, -2.0, 2.0)}
    return {k: v for k, v in logits.items() if v}


def _logit_bias(body: dict, vocabulary: int | None) -> dict[int, float] | None:
    """OpenAI's ``logit_bias``: token ids (as strings) -> a bias in [-100, 100]."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    try:
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
            raise ValueError
        out = {_token_id(k): float(v) for k, v in bias.items() if not isinstance(v, bool)}
        if len(out) != len(bias) or not all(-100 <= v <= 100 for v in out.values()):
            raise ValueError
    except (TypeError, ValueError):
        raise ApiError(400, f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to numbers between -100 and 100",
                       "logit_bias") from None
    outside = [k for k in out if vocabulary is not None and k >= vocabulary]
    if outside:
        raise ApiError(400, f"logit_bias: token id {outside[0]} is not in the model's vocabulary of {vocabulary}",
                       "logit_bias")
    return out


def _token_id(key: str) -> int:
    """A token id written as decimal digits (no sign, spaces or other digits ``int`` takes)."""
    if not (key.isascii() and key.isdigit() and len(key) <= 10):
        raise ValueError
    return int(key)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES}, each of 1 to "
                            f"{MAX_STOP_CHARS} characters", "stop")
    return tuple(stop)
