"""The OpenAI-compatible front (builder/openai) on the real Triton server, with the real `openai` client:
every route, the parameters it honours and the ones it refuses, errors before the first byte, streaming with
usage, logprobs, n, guided JSON and tool calls, clients that go away, metrics, and `serve --openai-port`."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.request

import pytest

from builder.generation.client import generate
from tiny_llm import build_cli, make_model_dir, spec_text

pytestmark = pytest.mark.server
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    from builder.openai import start_front
    from builder.runtime import start_server

    tmp = tmp_path_factory.mktemp("oa")
    model_dir = make_model_dir(tmp / "m", "llama", chat=True)
    result, repo = build_cli(tmp, spec_text(model_dir, generation="{max_sequences: 2, max_prompt_tokens: 400, "
                                                                  "max_total_tokens: 480, max_tokens: 16, prefill_chunk: 8}"))
    assert result.exit_code == 0, result.output
    with start_server(repo) as server:
        started = start_front(repo, server.grpc_url, 0, metrics_url=server.metrics_url)
        try:
            yield server, started
        finally:
            started.shutdown()


@pytest.fixture(scope="module")
def client(front):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{front[1].server_port}/v1", api_key="none", max_retries=0)


def _url(front, path: str) -> str:
    return f"http://127.0.0.1:{front[1].server_port}{path}"


def _post(front, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(_url(front, path), json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_models_list_and_retrieve_and_unknown_model(client):
    import openai

    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    for call in (lambda: client.models.retrieve("nope"), lambda: client.completions.create(model="nope", prompt="Hi")):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.body["type"] == "invalid_request_error" and caught.value.body["code"] == "model_not_found"


def test_completions_take_a_string_strings_or_token_ids(front, client):
    server, _ = front
    want = generate(server.http_url, "tiny", "Triton serves", max_tokens=8, ignore_eos=True)["text_output"]
    done = client.completions.create(model="tiny", prompt="Triton serves", max_tokens=8, extra_body={"ignore_eos": True})
    assert done.choices[0].text == want and done.usage.completion_tokens == 8
    both = client.completions.create(model="tiny", prompt=["Triton serves", "Hello"], max_tokens=8,
                                     extra_body={"ignore_eos": True})
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].text == want
    ids = _post(front, "/tokenize", {"model": "tiny", "prompt": "Triton serves"})[1]["tokens"]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == want and by_ids.usage.prompt_tokens == len(ids)
    echoed = client.completions.create(model="tiny", prompt="Triton serves", max_tokens=8, echo=True,
                                       extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == "Triton serves" + want


def test_n_logprobs_stop_and_seed(client):
    done = client.completions.create(model="tiny", prompt="Triton serves", max_tokens=6, n=2, logprobs=3,
                                     extra_body={"ignore_eos": True})
    assert len(done.choices) == 2 and done.usage.completion_tokens == 12
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == done.choices[0].text and all(len(t) <= 3 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and all(x <= 0 for x in lp.token_logprobs)
    free = client.completions.create(model="tiny", prompt="Triton serves", max_tokens=12, extra_body={"ignore_eos": True})
    stop = free.choices[0].text[4:6]
    cut = client.completions.create(model="tiny", prompt="Triton serves", max_tokens=12, stop=[stop])
    assert cut.choices[0].text == free.choices[0].text[:free.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model="tiny", prompt="Triton", max_tokens=10, temperature=1.0, seed=7,
                                         extra_body={"ignore_eos": True}).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize("body,param", [
    ({"suffix": "end"}, "suffix"), ({"best_of": 2}, "best_of"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"), ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"min_tokens": 3}, "min_tokens"), ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"made_up": 1}, "made_up"), ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_parameters_that_cannot_be_honoured_are_a_400_naming_them(front, body, param):
    status, answer = _post(front, "/v1/completions", {"model": "tiny", "prompt": "Hi", **body})
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param and answer["error"]["message"].startswith(param)


def test_penalties_at_their_neutral_values_ask_nothing_and_are_served(front):
    plain = _post(front, "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 4})
    neutral = _post(front, "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "presence_penalty": 0,
                                               "frequency_penalty": 0.0, "repetition_penalty": 1, "min_tokens": 0})
    assert plain[0] == neutral[0] == 200
    assert neutral[1]["choices"][0]["text"] == plain[1]["choices"][0]["text"]


def test_chat_content_parts_roles_n_and_logprobs(client):
    parts = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}], max_completion_tokens=8)
    plain = client.chat.completions.create(model="tiny", messages=HELLO, max_completion_tokens=8)
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert plain.usage.completion_tokens <= 8
    talk = client.chat.completions.create(model="tiny", max_tokens=6, n=2, logprobs=True, top_logprobs=2, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])
    assert len(talk.choices) == 2
    content = talk.choices[0].logprobs.content
    assert "".join(c.token for c in content) == talk.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


def test_chat_stream_with_usage_equals_the_answer(client):
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12)
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    running = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, stream=True,
                                                  stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in running]
    assert counts == sorted(counts) and counts[-1] == whole.usage.completion_tokens and counts[0] <= 1
    assert {c.usage.prompt_tokens for c in running} == {whole.usage.prompt_tokens}


def test_errors_come_before_the_first_byte_even_streamed(client):
    import openai

    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5000, stream=stream)
        assert "exceed the cache" in caught.value.body["message"] and caught.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 500}], stream=True)
    assert caught.value.body["param"] == "messages" and caught.value.body["message"].startswith("messages: the prompt has")
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])


def test_response_format_json_schema_and_json_object_are_decoded_to_valid_json(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                               "days": {"type": "integer"}},
              "required": ["city", "days"], "additionalProperties": False}
    done = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "trip", "schema": schema}})
    # strict=False: the tiny model's random bytes may form invalid UTF-8 inside a string, where xgrammar's
    # byte-level matching lets a control byte through; the structure is what the grammar guarantees
    value = json.loads(done.choices[0].message.content, strict=False)
    assert set(value) == {"city", "days"} and isinstance(value["days"], int)
    obj = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=60,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content, strict=False), dict)


WEATHER = {"type": "function", "function": {"name": "weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 10}},
                                                "required": ["city"], "additionalProperties": False}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "weather"}}])
def test_forced_tool_calls_come_back_as_tool_calls_streamed_or_not(client, choice):
    done = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=60, tools=[WEATHER],
                                          tool_choice=choice)
    [call] = done.choices[0].message.tool_calls
    assert done.choices[0].finish_reason == "tool_calls" and call.function.name == "weather"
    assert set(json.loads(call.function.arguments, strict=False)) == {"city"}
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=60, tools=[WEATHER],
                                                 tool_choice=choice, stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "weather" and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments  # greedy: the same call


def test_tokenize_detokenize_health_version(front):
    status, tokens = _post(front, "/tokenize", {"model": "tiny", "prompt": "Triton serves"})
    assert status == 200 and tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 480
    status, text = _post(front, "/detokenize", {"model": "tiny", "tokens": tokens["tokens"]})
    assert text["prompt"].endswith("Triton serves")
    status, chat = _post(front, "/tokenize", {"model": "tiny", "messages": HELLO})
    assert status == 200 and chat["count"] > tokens["count"]
    with urllib.request.urlopen(_url(front, "/health")) as answer:
        assert answer.status == 200
    with urllib.request.urlopen(_url(front, "/version")) as answer:
        assert json.loads(answer.read())["triton"]
    status, missing = _post(front, "/v1/embeddings", {"model": "tiny", "input": "x"})
    assert status == 404 and missing["error"]["type"] == "invalid_request_error"


def _open_request(front, body: dict) -> socket.socket:
    raw = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", front[1].server_port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return sock


def _open_stream(front, body: dict) -> socket.socket:
    """A raw HTTP streaming request whose first event has arrived (so that closing it is a client going away)."""
    raw = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", front[1].server_port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    got = b""
    while b"data:" not in got:
        got += sock.recv(4096)
    assert b" 200 " in got.split(b"\r\n", 1)[0]
    return sock


def test_clients_that_go_away_free_their_slots_quietly(front, client, caplog, capfd):
    """Both slots taken by long requests (one streamed, one not) whose clients then disconnect: a new request is
    served at once (the slots were freed, not held for 450 tokens) and nothing is logged as an error (uvicorn's loggers write to
    stderr themselves, so stderr is read too)."""
    caplog.set_level(logging.INFO)
    capfd.readouterr()
    long = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 450, "stream": True, "ignore_eos": True}
    socks = [_open_stream(front, long), _open_request(front, dict(long, stream=False))]  # streamed, and not
    time.sleep(2)  # both decoding
    for sock in socks:
        sock.close()
    t0 = time.monotonic()
    done = client.completions.create(model="tiny", prompt="Hi", max_tokens=3, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 3 and time.monotonic() - t0 < 20
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    time.sleep(1.0)  # the cancelled streams' last events have been handled by now
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err and "Error" not in err, err[-2000:]


def test_metrics_count_requests_latencies_tokens_and_the_engine(front, client):
    from builder.deploy import llm_metrics as llm
    from builder.openai import metrics as m

    client.completions.create(model="tiny", prompt="Hi", max_tokens=4, stream=False)
    list(client.completions.create(model="tiny", prompt="Hi", max_tokens=4, stream=True))
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert _post(front, "/v1/completions", {"model": "tiny", "prompt": "Hi", "best_of": 3})[0] == 400
    time.sleep(2 * 0.25)  # the engine publishes its metrics every 0.25 s (generator.py METRICS_EVERY_S)
    with urllib.request.urlopen(_url(front, "/metrics")) as answer:
        text = answer.read().decode()
    engine = [name + "_bucket" if name == llm.QUEUE else name for name in llm.ENGINE]
    for name in (llm.TTFT + "_count", llm.ITL + "_bucket", llm.E2E + "_sum", llm.PROMPT_TOKENS,
                 llm.GENERATION_TOKENS, llm.REQUESTS, m.RUNNING, m.WAITING, *engine):
        assert f"\n{name}{{" in text, name
    assert f'{m.REQUESTS}_total{{route="/v1/completions",status="200"}}' in text
    assert f'{m.REQUESTS}_total{{route="/v1/completions",status="400"}}' in text

    def value(series: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series))

    assert value(f'{llm.TTFT}_count{{model="tiny"}}') >= 3
    assert value(f'{llm.REQUESTS}{{finished_reason="length",model="tiny"}}') \
        + value(f'{llm.REQUESTS}{{finished_reason="stop",model="tiny"}}') >= 3
    assert value(f'{llm.QUEUE}_count{{model="tiny"}}') >= 3  # the engine's histogram, copied from Triton's
    assert value(f'{llm.PREFIX_QUERIES}{{model="tiny"}}') > 0
    server, _ = front
    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics") as answer:  # Triton's own has the engine's
        triton = answer.read().decode()
    assert all(name in triton for name in m.ENGINE)


def test_serve_with_openai_port_starts_and_stops_the_front(front, tmp_path):
    from typer.testing import CliRunner

    from builder.cli import app

    repo = front[0].repo
    before = {t.name for t in threading.enumerate()}
    result = CliRunner().invoke(app, ["serve", str(repo), "--once", "--no-check", "--runtime", "local",
                                      "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
                                      "--openai-port", "0"])
    assert result.exit_code == 0, result.output
    assert "OpenAI  http://127.0.0.1:" in result.output
    assert "openai-front" not in {t.name for t in threading.enumerate()} - before


def test_a_cancelled_request_gets_its_final_response(front, tmp_path):
    """The python backend releases a request only after a FINAL response: a request cancelled by its client must
    still get one (a CANCELLED error), or the model never unloads and the server's stop times out."""
    import queue

    import tritonclient.grpc as grpcclient

    from builder.generation.client import grpc_inputs
    from builder.runtime import start_server

    log = tmp_path / "server.log"
    with start_server(front[0].repo, log_path=log) as server:
        events: queue.Queue = queue.Queue()
        stream = grpcclient.InferenceServerClient(server.grpc_url)
        stream.start_stream(callback=lambda result, error: events.put(error))
        stream.async_stream_infer("tiny", grpc_inputs("The quick brown fox", stream=True, max_tokens=450,
                                                      ignore_eos=True))
        assert events.get(timeout=60) is None  # decoding
        stream.stop_stream(cancel_requests=True)
        stream.close()
        assert generate(server.http_url, "tiny", "Hi", max_tokens=2)["num_output_tokens"] == 2
    text = log.read_text(errors="replace")
    assert "Exit timeout expired" not in text and "Found 0 live models" in text


def test_the_guided_mask_cost_script_runs_on_a_served_model(front):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "perf" / "guided_mask.py"), str(front[0].repo / "tiny" / "1")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "mask per step over" in out.stdout, out.stderr[-2000:]
