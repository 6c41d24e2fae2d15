"""Tool calls: the request's tools through the model's chat template, and the calls the
model writes parsed into OpenAI ``tool_calls`` (streamed or not), through the official
``openai`` client."""

import json
import queue
import shutil
import threading
from dataclasses import dataclass

import pytest

from lsaq_mlx.runtime.prompts import PromptRefused, prompt_tokens
from lsaq_mlx.runtime.tool_calls import ToolCalling, ToolCallText
from lsaq_mlx.serve.server import ApiServer
from lsaq_mlx.sources import resolve_model
from lsaq_mlx.sources.load import load_tokenizer

openai = pytest.importorskip("openai")

# Qwen2.5's way, shortened: the tools in a system turn, calls as JSON between <tool_call> tags
TEMPLATE = """{%- if tools %}<|im_start|>system
You may call these functions: <tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>
Answer a call as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}{%- for m in messages %}{%- if m.role == "assistant" and m.tool_calls %}<|im_start|>assistant
{% for tc in m.tool_calls %}{%- set tool_call = tc.function %}<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == "tool" %}<|im_start|>user
<tool_response>{{ m.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tool_tokenizer(tmp_path_factory):
    """The default model's tokenizer with a chat template that calls tools."""
    folder = tmp_path_factory.mktemp("tools")
    for f in resolve_model("default").path.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("config.json", "special_tokens_map.json"):
            shutil.copy(f, folder / f.name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": TEMPLATE}))
    source = type("Source", (), {"path": folder})()
    return load_tokenizer(source)


def test_text_before_a_call_streams_and_the_call_is_parsed(tool_tokenizer):
    calling = ToolCalling.of(tool_tokenizer)
    assert calling and (calling.start, calling.end) == ("<tool_call>", "</tool_call>")
    split = ToolCallText(calling)
    shown = [split.feed(p) for p in ("Let me check.", "<tool", "_call>\n{\"name\": \"get_weather\", ",
                                     "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>")]
    assert "".join(shown) == "Let me check." and shown[1] == ""  # "<tool" might start a call: held
    rest, calls = split.finish([WEATHER])
    assert rest == "" and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    broken = ToolCallText(calling)
    broken.feed('<tool_call>\n{"name": "get_weath')  # cut off by max_tokens
    assert broken.finish([WEATHER]) == ("", [])


def test_tools_reach_the_chat_template_and_a_model_without_them_refuses(tool_tokenizer):
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"}]
    text = tool_tokenizer.decode(prompt_tokens(tool_tokenizer, None, messages, 4096, [WEATHER]))
    assert "get_weather" in text and "The weather in a city" in text and "sunny, 21 C" in text
    assert '"city": "Paris"' in text  # the earlier call, written back by the template
    plain = load_tokenizer(resolve_model("default"))
    with pytest.raises(PromptRefused, match="does not call tools"):
        prompt_tokens(plain, None, messages[:1], 4096, [WEATHER])


@dataclass
class Info:
    context: int
    vocabulary: int
    eos_token_ids: tuple
    tool_calling: object


class ScriptedEngine:
    """An engine that answers every completion with ``reply`` (what a model would write)."""

    def __init__(self, tokenizer, reply: str):
        self.info = Info(4096, 50000, (0,), ToolCalling.of(tokenizer))
        self.reply, self.events, self.jobs = reply, queue.Queue(), []

    def complete(self, job):
        self.jobs.append(job)
        job.start()
        for piece in (self.reply[i:i + 7] for i in range(0, len(self.reply), 7)):
            job.feed(piece)
        job.finish("stop", 10, 5, {})

    def running(self) -> bool:
        return True

    def request_state(self):
        raise TimeoutError


@pytest.fixture
def tool_server(tool_tokenizer):
    server = ApiServer(("127.0.0.1", 0), ScriptedEngine(tool_tokenizer, "Let me check. " + CALL), "tiny")
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_tool_call_round_trip_through_the_openai_client(tool_server):
    client = openai.OpenAI(base_url=tool_server.url, api_key="unused", max_retries=0, timeout=60)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check. "
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    job = tool_server.engine.jobs[-1]
    assert job.tools == (WEATHER,)  # handed to the engine, which puts them in the chat template
    answer = ask + [choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    client.chat.completions.create(model="tiny", messages=answer, tools=[WEATHER])
    sent = tool_server.engine.jobs[-1].messages
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"} and sent[2]["tool_call_id"] == call.id
    chunks = list(client.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert text == "Let me check. " and [t.function.name for t in streamed] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    no_tools = client.chat.completions.create(model="tiny", messages=ask)  # without tools the text is the text
    assert no_tools.choices[0].message.content == "Let me check. " + CALL and not no_tools.choices[0].message.tool_calls
