"""The OpenAI front's pieces that need no server: tool calls read from each model family's own format,
the plans response_format and tools make, streamed tool-call deltas, and error bodies without addresses."""

from __future__ import annotations

import json

import pytest

from builder.openai.errors import APIError, error_body
from builder.openai.guided import parse_calls, plan
from builder.openai.schema import ChatRequest

NAMES = {"weather", "time"}


@pytest.mark.parametrize("text,calls", [
    ('<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>', [("weather", {"city": "Paris"})]),
    ('<tool_call>{"name": "weather", "arguments": {"city": "A"}}</tool_call>\n<tool_call>{"name": "time", '
     '"arguments": {}}</tool_call>', [("weather", {"city": "A"}), ("time", {})]),  # Hermes / Qwen, two calls
    ('{"name": "weather", "parameters": {"city": "Rome"}}', [("weather", {"city": "Rome"})]),  # Llama 3 JSON
    ('<|python_tag|>{"name": "time", "parameters": {"zone": "UTC"}}', [("time", {"zone": "UTC"})]),
    ('[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Oslo"}}]', [("weather", {"city": "Oslo"})]),  # Mistral
    ("The weather is fine.", []),
    ('{"name": "unknown", "arguments": {}}', []),  # not one of the tools: content
])
def test_tool_calls_in_each_model_familys_format(text, calls):
    got = parse_calls(text, NAMES)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in got] == calls
    assert all(c.id.startswith("call_") and c.type == "function" for c in got)


TOOL = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _chat(**kw) -> ChatRequest:
    return ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)


def test_plans_of_response_format_and_tool_choice():
    assert plan(_chat()).guide is None and not plan(_chat()).parses
    assert plan(_chat(response_format={"type": "json_object"})).guide == {"json_object": True}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert plan(_chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})).guide \
        == {"json_schema": schema}
    auto = plan(_chat(tools=[TOOL]))
    assert auto.guide is None and auto.parses and auto.template_tools[0]["function"]["name"] == "weather"
    named = plan(_chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "weather"}}))
    assert named.forced and named.guide["json_schema"]["properties"]["name"] == {"const": "weather"}
    assert named.guide["json_schema"]["properties"]["arguments"] == TOOL["function"]["parameters"]
    assert [t["function"]["name"] for t in named.template_tools] == ["weather"]
    assert plan(_chat(tools=[TOOL], tool_choice="none")).template_tools is None


@pytest.mark.parametrize("kw,param", [
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}}), "tool_choice"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format.json_schema"),
])
def test_plans_that_cannot_be_made_are_a_400(kw, param):
    with pytest.raises(APIError) as caught:
        plan(_chat(**kw))
    assert caught.value.status == 400 and caught.value.param == param


def test_streamed_text_that_is_a_call_becomes_tool_call_deltas_and_other_text_streams_on():
    auto = plan(_chat(tools=[TOOL]))
    stream = auto.stream()
    pieces = ['<tool_', 'call>{"name": "weather", ', '"arguments": {"city": "Paris"}}</tool_call>']
    deltas = [stream.feed(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
    assert deltas[:2] == [{}, {}] and stream.called
    [call] = deltas[2]["tool_calls"]
    assert call["index"] == 0 and call["function"]["name"] == "weather"
    prose = auto.stream()
    assert prose.feed("It is", False) == {"content": "It is"} and prose.feed(" sunny.", True) == {"content": " sunny."}
    assert not prose.called


def test_error_bodies_never_carry_a_server_address():
    body = error_body("failed at 127.0.0.1:8001/v2/models/x/generate and http://localhost:8000", "server_error")
    assert "127.0.0.1" not in body["error"]["message"] and "localhost" not in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}


class _FakeTriton:
    """Stands in for the gRPC client: a refusal before any token, or a failure after the first piece."""

    async def generate(self, model, request, tokenizer=None):
        from builder.openai.triton import GenerationError, Piece

        if request.inputs.get("max_tokens") == [999]:
            raise GenerationError("max_tokens: 999 new tokens exceed the cache", started=False)
        yield Piece("Hello", num_input_tokens=3, num_output_tokens=1)
        raise GenerationError("generation failed: RuntimeError: lost 10.0.0.5:8001 (http://10.0.0.5:8000/v2)", True)

    async def ready(self):
        return True

    async def close(self):
        pass


@pytest.fixture
def fake_front(tmp_path):
    from builder.openai import start_front
    from tiny_llm import make_tokenizer

    (tmp_path / "m" / "1").mkdir(parents=True)
    make_tokenizer(tmp_path / "m" / "1", chat=True)
    (tmp_path / "triton-builder.json").write_text(json.dumps({"schema": 1, "models": {"m": {
        "status": "passed", "generation": {"max_total_tokens": 128}}}}))
    front = start_front(tmp_path, "127.0.0.1:1", 0)
    front.server.config.app.state.front.triton = _FakeTriton()
    yield f"http://127.0.0.1:{front.server_port}"
    front.shutdown()


def _post(url: str, body: dict) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_failure_mid_stream_is_an_error_event_without_addresses_and_a_refusal_is_a_400(fake_front):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    status, text = _post(f"{fake_front}/v1/chat/completions", body)
    events = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
    assert status == 200 and events[1]["choices"][0]["delta"]["content"] == "Hello"
    error = events[-1]["error"]
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    assert "10.0.0.5" not in text and "[DONE]" not in text
    status, text = _post(f"{fake_front}/v1/chat/completions", dict(body, max_tokens=999))
    assert status == 400 and json.loads(text)["error"]["param"] == "max_tokens"


def test_a_forced_call_streams_its_name_then_its_arguments_as_decoded():
    named = plan(_chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "weather"}}))
    stream = named.stream()
    pieces = ['{"name": "wea', 'ther", "argu', 'ments": {"city": "Pa', 'ris"}', "}"]
    deltas = [d for i, p in enumerate(pieces) for d in stream.feed(p, i == len(pieces) - 1).get("tool_calls", [])]
    assert deltas[0]["function"] == {"name": "weather", "arguments": ""} and deltas[0]["id"].startswith("call_")
    assert len(deltas) > 2 and all(d["index"] == 0 for d in deltas)  # the arguments came in more than one delta
    text = "".join(pieces)
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"city": "Paris"}' \
        == named.parse(text)[0].function.arguments
