"""Request bodies in the shapes real front ends send (``tests/fixtures/frontends``), posted
as they are to ``lsaq-mlx serve`` on a tiny model whose chat template calls tools: each is
answered with a well-formed stream, none refused and none with a field silently dropped."""

import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lsaq_mlx.planning.planner import FixedPlans
from lsaq_mlx.runtime import Engine
from lsaq_mlx.runtime.options import RuntimeOptions
from lsaq_mlx.serve.server import ApiServer
from lsaq_mlx.sources import resolve_model
from test_tool_calls import TEMPLATE

FIXTURES = Path(__file__).parent / "fixtures" / "frontends"


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("frontends") / "tiny-tools"
    shutil.copytree(tiny_llama.path, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": TEMPLATE}))
    engine = Engine(resolve_model(str(folder)), FixedPlans({}), RuntimeOptions()).start()
    server = ApiServer(("127.0.0.1", 0), engine, "tiny-tools", max_tokens=8)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()
    engine.shutdown()


def post(server, path: str, body: dict) -> tuple[int, list]:
    request = urllib.request.Request(server.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        lines = [line.decode().strip() for line in response if line.strip()]
    return response.status, lines


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.json")))
def test_a_front_ends_request_streams_a_well_formed_reply(server, name):
    body = json.loads((FIXTURES / f"{name}.json").read_text()) | {"model": "tiny-tools"}
    chat = "messages" in body
    status, lines = post(server, "/chat/completions" if chat else "/completions", body)
    assert status == 200 and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["model"] == "tiny-tools" and c["object"] == ("chat.completion.chunk" if chat else "text_completion")
               for c in chunks)
    finished = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finished) == 1 and finished[0] in ("stop", "length", "tool_calls")
    usage = [c["usage"] for c in chunks if "usage" in c]
    wanted = body.get("stream_options", {}).get("include_usage", False)
    assert (len(usage) == 1 and usage[0]["completion_tokens"] <= body["max_tokens"]) if wanted else not usage


def test_chat_template_kwargs_reach_the_template(server):
    from lsaq_mlx.runtime.prompts import prompt_tokens

    tokenizer = server.engine.tokenizer
    messages = [{"role": "user", "content": "hi"}]
    # a template that reads a name only the request can give
    tokenizer.chat_template = "{% if shout %}LOUD {% endif %}{{ messages[0].content }}"
    try:
        loud = tokenizer.decode(prompt_tokens(tokenizer, None, messages, 512, None, {"shout": True}))
        quiet = tokenizer.decode(prompt_tokens(tokenizer, None, messages, 512))
    finally:
        tokenizer.chat_template = TEMPLATE
    assert "LOUD" in loud and "LOUD" not in quiet
    with pytest.raises(urllib.error.HTTPError) as refused:  # a name the server sets itself
        post(server, "/chat/completions", {"messages": messages, "chat_template_kwargs": {"tools": 1}})
    assert refused.value.code == 400 and json.loads(refused.value.read())["error"]["param"] == "chat_template_kwargs"
