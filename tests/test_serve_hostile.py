"""``serve`` under hostile and heavy requests: every request answered, the process never dies.

The server runs on the real engine (a tiny random model) on 127.0.0.1; each case is sent
as raw bytes where the client library would refuse to send it.
"""

import concurrent.futures
import json
import os
import socket

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from test_serve import eos_ban, plans, start_server, stop_server  # noqa: F401  (plans: a module fixture)

FUZZ_EXAMPLES = int(os.environ.get("LSAQ_MLX_FUZZ_EXAMPLES", "120"))
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tiny_llama, plans):  # noqa: F811
    server = start_server(tiny_llama, plans, budget=8)
    yield server
    stop_server(server)


def exchange(server, raw: bytes, timeout: float = 60, half_close: bool = False) -> tuple[int, bytes]:
    """Send ``raw`` as it is; the status code and body of the reply (0 when none came).
    ``half_close``: then end the request's side of the connection (the server takes a
    client that did so while it waited for its reply to have left)."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as s:
        s.sendall(raw)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    if not data.startswith(b"HTTP/1."):
        return 0, data
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def request(body: bytes, path: str = CHAT, headers: bytes | None = None) -> bytes:
    headers = b"Content-Length: %d\r\n" % len(body) if headers is None else headers
    return b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n" + headers + b"\r\n" + body


def chat(**fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2} | fields).encode()


def alive(server) -> bool:
    return exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0] == 200


def error_of(body: bytes) -> dict:
    return json.loads(body)["error"]


@pytest.mark.parametrize("bias", [{"4096": 100}, {"99999999": 100}, {"9" * 40: 1}, {"-1": 1}, {" 5": 1}, {"1e3": 1},
                                  {"²": 1}, {str(i): 1 for i in range(301)}])
def test_logit_bias_ids_outside_the_vocabulary_are_refused(server, bias):
    code, body = exchange(server, request(chat(logit_bias=bias)))
    assert code == 400 and error_of(body)["param"] == "logit_bias"
    assert alive(server)


def test_the_last_id_of_the_vocabulary_is_accepted(server):
    last = server.info.vocabulary - 1
    code, body = exchange(server, request(chat(logit_bias={str(last): 100} | eos_ban(server))))
    assert code == 200, body


@pytest.mark.parametrize("seed, code", [(-1, 400), (2**64, 400), (2**200, 400), (2**64 - 1, 200), (0, 200)])
def test_seeds_outside_what_mlx_takes_are_a_400(server, seed, code):
    got, body = exchange(server, request(chat(seed=seed, temperature=1.0)))
    assert got == code, body
    if code == 400:
        assert error_of(body)["param"] == "seed"
    assert alive(server)


@pytest.mark.parametrize("headers, code", [
    (b"Content-Length: 10\r\nContent-Length: 10\r\n", 400),
    (b"Content-Length: \xc2\xb2\r\n", 400),  # a digit to str.isdigit, not to HTTP
    (b"Content-Length: +10\r\n", 400),
    (b"Content-Length: -1\r\n", 400),
    (b"Transfer-Encoding: chunked\r\n", 411),
    (b"", 411),
])
def test_http_framing_is_strict(server, headers, code):
    got, body = exchange(server, request(b'{"messages": []}', headers=headers))
    assert got == code and error_of(body)["message"]
    assert alive(server)


def test_a_body_shorter_than_its_length_is_not_served(server):
    got, _ = exchange(server, request(b"{}", headers=b"Content-Length: 100\r\n"), half_close=True)
    assert got == 0 and alive(server)


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
                                  chat(stop=["x" * 257]), b"\xff\xfe{}"],
                         ids=["deep-list", "deep-object", "long-stop", "not-utf8"])
def test_deep_or_odd_bodies_are_a_400(server, body):
    got, reply = exchange(server, request(body))
    assert got == 400 and error_of(reply)["message"]
    assert alive(server)


class CountingTokenizer:
    """The engine's tokenizer, recording the longest text the server tokenizes."""

    def __init__(self, tokenizer):
        self._tokenizer, self.longest = tokenizer, 0

    def encode(self, text, *args, **kwargs):
        self.longest = max(self.longest, len(text))
        return self._tokenizer.encode(text, *args, **kwargs)

    def apply_chat_template(self, messages, *args, **kwargs):
        self.longest = max(self.longest, sum(len(m["content"]) for m in messages))
        return self._tokenizer.apply_chat_template(messages, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("chat_request", [True, False])
def test_an_over_long_prompt_is_refused_with_bounded_work(server, chat_request):
    engine = server.engine
    text = "word " * (7 << 20 >> 3)  # 4.6 MB
    body = chat(messages=[{"role": "user", "content": text}]) if chat_request else json.dumps(
        {"prompt": text, "max_tokens": 2}).encode()
    counting = engine.tokenizer = CountingTokenizer(engine.tokenizer)
    try:
        got, reply = exchange(server, request(body, "/v1/chat/completions" if chat_request else "/v1/completions"))
    finally:
        engine.tokenizer = counting._tokenizer
    assert got == 400 and error_of(reply)["code"] == "context_length_exceeded"
    # the context is 512 tokens: a few pieces of text are tokenized, never the 4.6 MB
    assert 0 < counting.longest <= 64 << 10


def test_fifty_concurrent_clients_are_all_answered_right(server):
    prompts = [f"story {i % 5}" for i in range(50)]
    bodies = [chat(messages=[{"role": "user", "content": p}], max_tokens=4, logit_bias=eos_ban(server)) for p in prompts]
    alone = {p: exchange(server, request(b))[1] for p, b in list(zip(prompts, bodies))[:5]}
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(lambda b: exchange(server, request(b), timeout=300), bodies))
    assert [code for code, _ in replies] == [200] * 50  # none reset, none refused
    for p, (_, body) in zip(prompts, replies):
        assert json.loads(body)["choices"][0]["message"]["content"] == json.loads(alone[p])["choices"][0]["message"]["content"]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
FIELDS = ["messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "min_p", "seed", "stop",
          "stream", "stream_options", "logit_bias", "n", "model", "repetition_penalty", "presence_penalty",
          "frequency_penalty"]
field_values = st.one_of(json_values, st.integers(-2**70, 2**70), st.sampled_from([4096, 4095, 2**64, -1, 0.5, 1e308]),
                         st.dictionaries(st.integers(-5, 10**9).map(str), st.floats(-200, 200), max_size=3))
bodies = st.fixed_dictionaries({}, optional={k: field_values for k in FIELDS}).map(
    lambda fields: {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "max_tokens": 2} | fields)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=bodies, path=st.sampled_from([CHAT, "/v1/completions"]))
def test_fuzzed_request_bodies_always_get_an_answer(server, body, path):
    data = json.dumps(body).encode()
    got, reply = exchange(server, request(data, path))
    event(f"status {got}")  # --hypothesis-show-statistics shows how many got each
    assert got in (200, 400, 404), (got, reply)  # 404: a model this server does not serve
    if got in (400, 404):
        assert error_of(reply)["message"]
    elif not body.get("stream"):
        assert json.loads(reply)["choices"]
    assert server.engine.running()


@settings(max_examples=FUZZ_EXAMPLES // 2, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=st.binary(max_size=300), head=st.sampled_from([b"", b"POST /v1/chat/completions HTTP/1.1\r\n",
                                                          b"GET /v1/models HTTP/1.1\r\nContent-Length: 3\r\n"]))
def test_fuzzed_raw_requests_never_stop_the_server(server, raw, head):
    exchange(server, head + raw, timeout=120, half_close=True)
    assert alive(server)


def test_top_k_is_honoured(server):
    greedy = exchange(server, request(chat(max_tokens=6, logit_bias=eos_ban(server))))[1]
    sampled = [json.loads(exchange(server, request(chat(max_tokens=6, temperature=1.0, seed=3, logit_bias=eos_ban(server),
                                                        **top_k)))[1])["choices"][0]["message"] for top_k in ({}, {"top_k": 1})]
    greedy = json.loads(greedy)["choices"][0]["message"]
    assert sampled[0] != greedy and sampled[1] == greedy  # sampling moves off greedy; top-1 sampling cannot
    code, body = exchange(server, request(chat(top_k=-1)))
    assert code == 400 and error_of(body)["param"] == "top_k"


def test_cors_only_for_the_origins_allowed(tiny_llama, plans):  # noqa: F811
    closed = start_server(tiny_llama, plans, budget=8)
    try:
        preflight = (b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Origin: http://evil.example\r\nAccess-Control-Request-Method: POST\r\n\r\n")
        code, _ = exchange(closed, preflight)
        assert code == 403
        with socket.create_connection(closed.server_address[:2], timeout=60) as s:
            s.sendall(request(chat(), headers=b"Content-Length: %d\r\nOrigin: http://evil.example\r\n" % len(chat())))
            head = s.recv(65536).split(b"\r\n\r\n")[0]
        assert b"Access-Control-Allow-Origin" not in head  # the browser keeps the reply from the page
    finally:
        stop_server(closed)
    server = start_server(tiny_llama, plans, budget=8)
    server.allowed_origins = ("http://localhost:3000",)
    try:
        allowed = preflight.replace(b"http://evil.example", b"http://localhost:3000")
        with socket.create_connection(server.server_address[:2], timeout=60) as s:
            s.sendall(allowed)
            head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 204") and b"Access-Control-Allow-Origin: http://localhost:3000" in head
        assert b"Access-Control-Allow-Headers: Authorization, Content-Type" in head
    finally:
        stop_server(server)


def test_the_request_log_says_who_what_and_the_status(server, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="lsaq_mlx.serve"):
        exchange(server, request(chat()))
        exchange(server, request(b"{"))
    lines = [r.getMessage() for r in caplog.records if r.name == "lsaq_mlx.serve"]
    assert any('"POST /v1/chat/completions HTTP/1.1" 200' in line for line in lines)
    assert any('"POST /v1/chat/completions HTTP/1.1" 400' in line for line in lines)


@pytest.mark.parametrize("field", [{"tools": [{"type": "function", "function": {"name": "f"}}]},
                                   {"top_logprobs": 3}, {"response_format": {"type": "json_object"}},
                                   {"tool_choice": "required"}, {"logprobs": 2}],
                         ids=["tools", "top_logprobs without logprobs", "response_format", "tool_choice",
                              "logprobs not a boolean"])
def test_fields_asking_for_what_is_not_done_are_a_400_naming_them(server, field):
    code, body = exchange(server, request(chat(**field)))
    assert code == 400 and error_of(body)["param"] == next(iter(field))


def test_fields_that_change_nothing_are_accepted(server):
    fields = {"user": "u1", "metadata": {"a": "b"}, "store": False, "logprobs": False, "response_format": {"type": "text"},
              "tools": []}
    assert exchange(server, request(chat(**fields)))[0] == 200
