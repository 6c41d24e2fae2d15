"""``lsaq-mlx serve`` through the official ``openai`` client, on 127.0.0.1 and a random port."""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")

from lsaq_mlx.planning.methods import plan_uniform  # noqa: E402
from lsaq_mlx.planning.planner import FixedPlans, Planner  # noqa: E402
from lsaq_mlx.runtime import Engine, ScriptedSampler  # noqa: E402
from lsaq_mlx.runtime.completion import Completion  # noqa: E402
from lsaq_mlx.runtime.options import RuntimeOptions  # noqa: E402
from lsaq_mlx.serve.server import ApiServer  # noqa: E402

LONG = 100_000  # max_tokens of replies that only a disconnect ends


@pytest.fixture(scope="module")
def plans(tiny_llama):
    ctx = Planner(tiny_llama).context()
    return {b: plan_uniform(ctx, None, b, 32) for b in (3, 8)}


def start_server(source, plans, api_key=None, budget=None, **engine_options):
    options = engine_options.pop("options", None) or RuntimeOptions(bits_budget=budget)
    engine = Engine(source, FixedPlans(plans), options, **engine_options).start()
    server = ApiServer(("127.0.0.1", 0), engine, "tiny", api_key, max_tokens=8)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def stop_server(server):
    server.shutdown()
    server.server_close()
    server.engine.shutdown()


@pytest.fixture(scope="module")
def server(tiny_llama, plans):
    server = start_server(tiny_llama, plans, budget=8)
    yield server
    stop_server(server)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def eos_ban(server) -> dict:
    return {str(t): -100 for t in server.info.eos_token_ids}


def status(server) -> dict:
    return json.load(urllib.request.urlopen(server.url + "/status", timeout=30))


def wait_for(condition, seconds=60):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_models_and_chat(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                           logit_bias=eos_ban(server))
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
    assert reply.usage.prompt_tokens > 0 and isinstance(reply.choices[0].message.content, str)
    again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                           logit_bias=eos_ban(server))
    assert again.choices[0].message.content == reply.choices[0].message.content  # greedy by default


def test_streaming_chat_matches_the_reply_and_reports_usage(client, server):
    request = dict(model="tiny", messages=[{"role": "user", "content": "tell me"}], max_tokens=12, logit_bias=eos_ban(server))
    whole = client.chat.completions.create(**request).choices[0].message.content
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_completions_stop_and_seed(client, server):
    free = client.completions.create(model="tiny", prompt="once upon", max_tokens=12, logit_bias=eos_ban(server))
    text = free.choices[0].text
    stop = text[3:5]  # a stop sequence the greedy reply is known to contain
    cut = client.completions.create(model="tiny", prompt="once upon", max_tokens=12, stop=[stop],
                                    logit_bias=eos_ban(server))
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="once upon", max_tokens=12, stop=stop, stream=True,
                                         logit_bias=eos_ban(server))
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    sampled = [client.completions.create(model="tiny", prompt="once", max_tokens=8, temperature=1.0, seed=7,
                                         logit_bias=eos_ban(server)).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def post(server, path, body: bytes, headers=None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


@pytest.mark.parametrize("body, status_code, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": [1]}).encode(), 400, "stop"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 2}).encode(), 400, "n"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"a": 1}}).encode(), 400, "logit_bias"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 5000}]}).encode(), 400, "messages"),
])
def test_bad_requests_get_a_4xx_json_error(server, body, status_code, param):
    code, reply = post(server, "/v1/chat/completions", body)
    assert code == status_code and reply["error"]["param"] == param and reply["error"]["message"]


def test_unknown_paths_methods_and_models(server, client):
    assert post(server, "/v1/completions", json.dumps({"prompt": 3}).encode())[1]["error"]["param"] == "prompt"
    assert post(server, "/v1/nothing", b"{}")[0] == 404
    assert post(server, "/v1/models", b"{}")[0] == 405
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    assert client.models.retrieve("tiny").id == "tiny"
    code, reply = post(server, "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "word " * 5000}]}).encode())
    assert reply["error"]["code"] == "context_length_exceeded"
    assert status(server)["requests"]["in_flight"] == 0


def test_a_client_that_disconnects_frees_the_engine(server, client):
    before = status(server)["requests"]["cancelled"]
    host, port = server.server_address[:2]
    body = json.dumps({"messages": [{"role": "user", "content": "go"}], "max_tokens": LONG, "stream": True,
                       "logit_bias": eos_ban(server)}).encode()

    def send(body):
        connection = socket.create_connection((host, port))
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return connection

    running = send(body)
    assert running.recv(4096).startswith(b"HTTP/1.1 200")  # streaming has begun
    waiting = send(body.replace(b'"stream": true', b'"stream": false'))
    assert wait_for(lambda: status(server)["requests"]["in_flight"] == 2)  # queued behind it (not a fixed sleep: CI load)
    waiting.close()
    running.close()
    assert wait_for(lambda: status(server)["requests"]["in_flight"] == 0)
    assert status(server)["requests"]["cancelled"] == before + 2, status(server)["requests"]
    # the context would let it run on for about 2,000 tokens
    assert status(server)["last_reply"]["generation_tokens"] < server.engine.context // 2
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_api_key(tiny_llama, plans):
    server = start_server(tiny_llama, plans, api_key="s3cret", budget=3)
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=server.url, api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "tiny"
        assert urllib.request.urlopen(server.url.removesuffix("/v1") + "/health").status == 200
    finally:
        stop_server(server)


def test_a_swap_forced_by_a_memory_trace_during_a_stream(tiny_llama, plans, tmp_path):
    trace = tmp_path / "trace.txt"
    trace.write_text("0\n")  # nothing available: only the smallest plan fits
    reserve = plans[8].predicted_bytes - plans[3].predicted_bytes
    server = start_server(tiny_llama, plans, options=RuntimeOptions(bits_budget=8, auto=True, budgets=(3, 8)),
                          sampler=ScriptedSampler(trace), sample_every=0.2, policy_options={"reserve": reserve})
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        # sent at once: the engine samples memory only between tokens of this reply
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a long one"}],
                                                max_tokens=300, stream=True, logit_bias=eos_ban(server))
        chunks = list(stream)
        last = chunks[-1].model_dump()
        assert chunks[-1].choices[0].finish_reason == "length"
        assert len("".join(c.choices[0].delta.content or "" for c in chunks)) > 0
        info = last["lsaq_mlx"]
        assert info["swaps"] == 1 and info["bits_per_weight_start"] > info["bits_per_weight_end"]
        swaps = status(server)["swaps"]
        assert len(swaps) == 1 and swaps[0]["reason"].startswith("auto down")
        assert swaps[0]["to_bits_per_weight"] == pytest.approx(plans[3].predicted_bits_per_weight)
        assert status(server)["plan"]["bits_per_weight"] == pytest.approx(plans[3].predicted_bits_per_weight)
    finally:
        stop_server(server)


def test_completion_withholds_what_may_start_a_stop_sequence():
    job = Completion([1], 10, stop=("END",))
    for piece in ["ab", "cE", "N", "x", "yEN", "D", "more"]:
        job.feed(piece)
    sent = []
    while not job.events.empty():
        sent.append(job.events.get().text)
    assert sent == ["ab", "c", "ENx", "y"] and job.stopped and job.text == "abcENxy"


def test_the_cli_refuses_a_remote_host_and_serves_on_loopback(tmp_path, tiny_llama):
    from cli_run import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("serve", "-m", str(tiny_llama.path), "--host", "0.0.0.0"), "--allow-remote")
    env = dict(os.environ, LSAQ_MLX_CACHE=str(tmp_path / "cache"))
    process = subprocess.Popen([sys.executable, "-m", "lsaq_mlx", "serve", "-m", str(tiny_llama.path), "--port", "0",
                                "-b", "8", "--method", "uniform"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = []
        while not (seen and "serving" in seen[-1]) and len(seen) < 50:  # progress lines come first, piped
            seen.append(process.stderr.readline())
            assert seen[-1], "".join(seen)  # the server ended before it served
        line = seen[-1]
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        reply = client.completions.create(model=tiny_llama.path.name, prompt="hi", max_tokens=3)  # the folder's name
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gpt-4o", prompt="hi", max_tokens=3)
        assert reply.usage.completion_tokens <= 3
        assert json.load(urllib.request.urlopen(url + "/status"))["plan"]["method"] == "uniform"
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 128 + 15


@pytest.mark.parametrize("prompts", [
    ["alpha beta", "a much longer prompt than the other one", "x"],
    # a shared preamble: processed once, its KV cache copied to each
    ["Here is a shared preamble that every request starts with, then: " + end for end in ("one", "two", "three")],
])
def test_concurrent_requests_are_batched_and_give_the_same_replies(client, server, prompts):
    from concurrent.futures import ThreadPoolExecutor

    def ask(prompt, n):
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, logit_bias=eos_ban(server))
        return (reply.choices[0].text, reply.model_dump()["lsaq_mlx"], reply.usage.completion_tokens,
                reply.usage.prompt_tokens_details.cached_tokens)

    alone = [ask(p, 8) for p in prompts]
    ask("reset the engine's cache", 1)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(ask, "keep going", 300)  # runs alone while the others queue behind it
        assert wait_for(lambda: status(server)["requests"]["in_flight"] >= 1)
        together = list(pool.map(lambda p: ask(p, 8), prompts))
        first.result()
    assert [t[0] for t in together] == [a[0] for a in alone] and [t[2] for t in together] == [8, 8, 8]
    batched = [t for t in together if t[1].get("batched")]
    assert len(batched) >= 2
    shared = len(server.engine.tokenizer.encode(prompts[0])) - 3  # at least this much, when the prompts share a start
    assert all(t[3] >= shared for t in batched) if prompts[0].startswith("Here") else all(t[3] == 0 for t in batched)


def _check_entry(entry, top: int) -> None:
    assert entry.logprob <= 0 and len(entry.top_logprobs) == top
    alternatives = [t.logprob for t in entry.top_logprobs]
    assert alternatives == sorted(alternatives, reverse=True)
    assert entry.logprob == pytest.approx(alternatives[0], abs=1e-5)  # greedy: the likeliest token is the one taken
    assert entry.bytes == list(entry.token.encode("utf-8"))


def test_chat_logprobs_with_alternatives_streamed_or_not(client, server):
    asked = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
                 logit_bias=eos_ban(server), logprobs=True, top_logprobs=3)
    reply = client.chat.completions.create(**asked)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    for entry in content:
        _check_entry(entry, 3)
    streamed = [e for chunk in client.chat.completions.create(**asked, stream=True) if chunk.choices
                and chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    plain = client.chat.completions.create(**{k: v for k, v in asked.items() if "logprobs" not in k})
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_form(client, server):
    reply = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0,
                                      logit_bias=eos_ban(server), logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text and len(logprobs.tokens) == 5
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert value <= 0 and len(top) <= 2 and max(top.values()) == pytest.approx(value, abs=1e-5)


def test_batched_completions_report_the_same_logprobs_as_alone(client, server):
    from concurrent.futures import ThreadPoolExecutor

    def ask(prompt, n=6):
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                          logit_bias=eos_ban(server), logprobs=1)
        return reply.model_dump()["lsaq_mlx"], reply.choices[0].logprobs

    prompts = ["alpha beta", "gamma delta epsilon"]
    alone = [ask(p)[1] for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(ask, "keep going", 200)  # runs alone while the others queue behind it
        assert wait_for(lambda: status(server)["requests"]["in_flight"] >= 1)
        together = list(pool.map(ask, prompts))
        first.result()
    assert any(info.get("batched") for info, _ in together)
    for (_, batched), single in zip(together, alone):
        assert batched.tokens == single.tokens
        assert batched.token_logprobs == pytest.approx(single.token_logprobs, abs=1e-3)
