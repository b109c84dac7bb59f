"""The OpenAI front over vLLM and TensorRT-LLM models (rendered, not run here: no GPU, vLLM or TensorRT-LLM).
Validated by the exact requests: the real app and the real gRPC request code (builder/openai/triton.py) against a
fake Triton client that records each request as it would go on the wire (the ModelInferRequest proto) and
answers with responses shaped as each backend sends them (vllm_backend src/utils/request.py; TensorRT-LLM
triton_backend/all_models/llmapi/tensorrt_llm/1/model.py; our engine-flow ensemble's outputs)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from tiny_llm import make_tokenizer

GEN = {"max_sequences": 4, "max_prompt_tokens": 96, "max_total_tokens": 128, "max_tokens": 32}
MODELS = {
    "vl": {"status": "rendered", "role": "llm", "format": "vllm", "flow": None, "generation": GEN},
    "trt": {"status": "rendered", "role": "llm", "format": "tensorrt-llm", "flow": "llmapi", "generation": GEN},
    "eng": {"status": "rendered", "role": "ensemble", "format": "tensorrt-llm", "flow": "engine", "generation": GEN},
    "tensorrt_llm": {"status": "rendered", "role": "llm-part", "format": "tensorrt-llm", "flow": "engine",
                     "generation": GEN},  # a step of eng's model set: not a front model
}
HELLO = [{"role": "user", "content": "hi"}]


def _response(outputs: dict[str, tuple[str, object]], final: bool):
    """An InferResult as tritonclient builds it from a ModelStreamInfer response: outputs name -> (type, value)."""
    from tritonclient.grpc import InferResult, service_pb2
    from tritonclient.utils import serialize_byte_tensor, triton_to_np_dtype

    response = service_pb2.ModelInferResponse()
    for name, (kind, value) in outputs.items():
        if kind == "BYTES":
            array = np.array([v.encode() if isinstance(v, str) else v for v in np.ravel(value)], dtype=np.object_)
            array = array.reshape(np.shape(value))
            raw = serialize_byte_tensor(array).item()
        else:
            array = np.asarray(value, dtype=triton_to_np_dtype(kind))
            raw = array.tobytes()
        out = response.outputs.add(name=name, datatype=kind, shape=list(array.shape))
        assert out.name == name
        response.raw_output_contents.append(raw)
    response.parameters["triton_final_response"].bool_param = final
    return InferResult(response)


class FakeClient:
    """tritonclient.grpc.aio's InferenceServerClient for stream_infer: each request is turned into the protobuf
    the real client sends, recorded, and answered by `answer(model, inputs) -> [InferResult, ...]`."""

    def __init__(self):
        self.sent: list[tuple[str, dict, dict]] = []  # (model, inputs name -> (type, shape, values), parameters)
        self.answer = None

    def stream_infer(self, requests):
        from tritonclient.grpc._utils import _get_inference_request
        from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

        client = self

        class Call:
            def __aiter__(self):
                return self._run()

            async def _run(self):
                first = await anext(requests)
                proto = _get_inference_request(model_name=first["model_name"], inputs=first["inputs"], model_version="",
                                               request_id="", outputs=None, sequence_id=0, sequence_start=False,
                                               sequence_end=False, priority=0, timeout=None,
                                               parameters=first["parameters"])
                inputs = {}
                for tensor, raw in zip(proto.inputs, proto.raw_input_contents):
                    values = deserialize_bytes_tensor(raw) if tensor.datatype == "BYTES" else \
                        np.frombuffer(raw, dtype=triton_to_np_dtype(tensor.datatype))
                    values = [v.decode() if isinstance(v, bytes) else v.item() for v in values]
                    inputs[tensor.name] = (tensor.datatype, list(tensor.shape), values)
                params = {k: v.string_value or v.int64_param for k, v in proto.parameters.items()}
                client.sent.append((proto.model_name, inputs, params))
                for result in client.answer(proto.model_name, inputs):
                    yield result, None

            def cancel(self):
                pass

        return Call()

    async def close(self):
        pass


@pytest.fixture
def served(tmp_path):
    from builder.openai import start_front

    for name in ("vl", "trt", "eng"):
        (tmp_path / name / "hf").mkdir(parents=True)
        make_tokenizer(tmp_path / name / "hf", chat=True)
    (tmp_path / "triton-builder.json").write_text(json.dumps({"schema": 1, "models": MODELS}))
    front = start_front(tmp_path, "127.0.0.1:1", 0)
    state = front.server.config.app.state.front
    fake = state.triton.client = FakeClient()
    yield f"http://127.0.0.1:{front.server_port}", fake, state.tokenizers.get("vl")
    front.shutdown()


def _post(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _events(text: str) -> list:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and "[DONE]" not in line]


def _vllm(*pieces, reason="stop", prompt=3):
    """vLLM's responses: new text each, finish_reason str(None) until the last, UINT32 counts per response."""
    return [_response({"text_output": ("BYTES", [text]), "finish_reason": ("BYTES", [reason if i == len(pieces) - 1
                                                                                      else "None"]),
                       "num_input_tokens": ("UINT32", prompt), "num_output_tokens": ("UINT32", [count])},
                      final=i == len(pieces) - 1) for i, (text, count) in enumerate(pieces)]


def test_rendered_backend_models_are_listed_but_not_the_parts_of_a_model_set(served):
    url, _, _ = served
    with urllib.request.urlopen(f"{url}/v1/models") as answer:
        assert [m["id"] for m in json.loads(answer.read())["data"]] == ["vl", "trt", "eng"]


def test_vllm_completions_n_seed_stop_and_sampling_in_its_own_tensors(served):
    url, fake, _ = served
    fake.answer = lambda model, inputs: _vllm(("Hi there", 2))
    status, text = _post(f"{url}/v1/completions", {"model": "vl", "prompt": "Hello", "max_tokens": 5, "n": 2,
                                                   "temperature": 0.5, "top_p": 0.9, "top_k": 3, "seed": 7,
                                                   "stop": ["."], "ignore_eos": True, "presence_penalty": 0.5,
                                                   "frequency_penalty": 0.25, "repetition_penalty": 1.1,
                                                   "min_tokens": 2})
    assert status == 200, text
    assert [s[0] for s in fake.sent] == ["vl", "vl"]
    for j, (_, inputs, params) in enumerate(fake.sent):
        sampling = json.loads(inputs.pop("sampling_parameters")[2][0])
        assert sampling == {"max_tokens": 5, "ignore_eos": True, "temperature": 0.5, "top_p": 0.9, "top_k": 3,
                            "seed": 7 + j, "stop": ["."], "presence_penalty": 0.5, "frequency_penalty": 0.25,
                            "repetition_penalty": 1.1, "min_tokens": 2}
        assert inputs == {"text_input": ("BYTES", [1], ["Hello"]), "stream": ("BOOL", [1], [False]),
                          "exclude_input_in_output": ("BOOL", [1], [True]),
                          "return_finish_reason": ("BOOL", [1], [True]),
                          "return_num_input_tokens": ("BOOL", [1], [True]),
                          "return_num_output_tokens": ("BOOL", [1], [True])}
        assert params == {}
    done = json.loads(text)
    assert [(c["index"], c["text"], c["finish_reason"]) for c in done["choices"]] == [(0, "Hi there", "stop"),
                                                                                      (1, "Hi there", "stop")]
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_vllm_chat_streams_with_usage_and_greedy_by_default(served):
    url, fake, tokenizer = served
    fake.answer = lambda model, inputs: _vllm(("Hi", 1), (" there", 1), ("", 0), reason="length", prompt=5)
    status, text = _post(f"{url}/v1/chat/completions", {"model": "vl", "messages": HELLO, "stream": True,
                                                        "stream_options": {"include_usage": True}})
    assert status == 200, text
    [(_, inputs, _)] = fake.sent
    prompt = tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    assert inputs["text_input"] == ("BYTES", [1], [prompt]) and inputs["stream"] == ("BOOL", [1], [True])
    # no max_tokens: the spec's default output (vLLM's own is 16); no temperature: greedy, as on our endpoint
    assert json.loads(inputs["sampling_parameters"][2][0]) == {"max_tokens": 32, "temperature": 0.0}
    events = _events(text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == "Hi there"
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_vllm_logprobs_and_structured_output(served):
    url, fake, tokenizer = served
    a, b, c = 40, 41, 42
    # per token {id: {logprob, rank, decoded_token}}, the sampled token first (here ranked 2nd)
    logprobs = [{str(b): {"logprob": -0.9, "rank": 2, "decoded_token": "x"},
                 str(a): {"logprob": -0.5, "rank": 1, "decoded_token": "y"},
                 str(c): {"logprob": -2.0, "rank": 3, "decoded_token": "z"}}]
    text = tokenizer.decode([b])
    fake.answer = lambda model, inputs: [_response({
        "text_output": ("BYTES", [text]), "finish_reason": ("BYTES", ["stop"]), "num_input_tokens": ("UINT32", 4),
        "num_output_tokens": ("UINT32", [1]), "logprobs": ("BYTES", [json.dumps(logprobs)])}, final=True)]
    status, answer = _post(f"{url}/v1/chat/completions", {"model": "vl", "messages": HELLO, "logprobs": True,
                                                          "top_logprobs": 2, "max_tokens": 4})
    assert status == 200, answer
    [(_, inputs, _)] = fake.sent
    assert json.loads(inputs["sampling_parameters"][2][0])["logprobs"] == 2
    assert inputs["return_logprobs"] == ("BOOL", [1], [True])
    [token] = json.loads(answer)["choices"][0]["logprobs"]["content"]
    assert token["token"] == text and token["logprob"] == -0.9
    assert [t["logprob"] for t in token["top_logprobs"]] == [-0.5, -0.9]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fake.sent.clear()
    fake.answer = lambda model, inputs: _vllm(('{"a": 1}', 5))
    status, answer = _post(f"{url}/v1/chat/completions", {"model": "vl", "messages": HELLO, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert status == 200 and json.loads(json.loads(answer)["choices"][0]["message"]["content"]) == {"a": 1}
    sampling = json.loads(fake.sent[0][1]["sampling_parameters"][2][0])
    assert json.loads(sampling["structured_outputs"]) == {"json": schema}


def test_tensorrt_llm_llmapi_streams_whole_text_so_far_and_usage_is_counted_by_the_tokenizer(served):
    url, fake, tokenizer = served

    def answer(model, inputs):  # the llmapi model sends RequestOutput.outputs[0].text: all of it so far
        texts = ["Hi", "Hi there", "Hi there!"]
        return [_response({"text_output": ("BYTES", [t]), "finish_reason": ("BYTES", ["stop" if i == 2 else "None"])},
                          final=i == 2) for i, t in enumerate(texts)]

    fake.answer = answer
    status, text = _post(f"{url}/v1/completions", {"model": "trt", "prompt": "Hello", "max_tokens": 6, "stream": True,
                                                   "temperature": 0.7, "top_p": 0.5, "top_k": 4, "seed": 3,
                                                   "stop": ["!", "?"], "stream_options": {"include_usage": True}})
    assert status == 200, text
    [(_, inputs, params)] = fake.sent
    assert inputs == {"text_input": ("BYTES", [1], ["Hello"]), "streaming": ("BOOL", [1], [True]),
                      "sampling_param_max_tokens": ("INT32", [1], [6]),
                      "sampling_param_temperature": ("FP32", [1], [pytest.approx(0.7)]),
                      "sampling_param_top_p": ("FP32", [1], [0.5]), "sampling_param_top_k": ("INT32", [1], [4]),
                      "sampling_param_seed": ("UINT64", [1], [3]),
                      "sampling_param_exclude_input_from_output": ("BOOL", [1], [True]),
                      "return_finish_reason": ("BOOL", [1], [True]),
                      "sampling_param_stop": ("BYTES", [2], ["!", "?"])}
    events = _events(text)
    assert [e["choices"][0]["text"] for e in events if e["choices"]] == ["Hi", " there", "!"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]] == [None, None, "stop"]
    counted = len(tokenizer("Hi there!", add_special_tokens=False)["input_ids"])
    assert events[-1]["usage"] == {"prompt_tokens": len(tokenizer("Hello")["input_ids"]),
                                   "completion_tokens": counted, "total_tokens": counted + len(tokenizer("Hello")["input_ids"])}


def test_tensorrt_llm_engine_ensemble_is_batched_and_finish_reason_comes_from_the_counts(served):
    url, fake, _ = served

    def answer(model, inputs):  # the ensemble's outputs: batched, INT32 counts, no finish_reason
        limit = inputs["max_tokens"][2][0]
        return [_response({"text_output": ("BYTES", [["one two"]]), "num_input_tokens": ("INT32", [[2]]),
                           "num_output_tokens": ("INT32", [[limit]])}, final=True)]

    fake.answer = answer
    status, text = _post(f"{url}/v1/completions", {"model": "eng", "prompt": "Hello", "max_tokens": 2, "seed": 1,
                                                   "stop": "end"})
    assert status == 200, text
    [(_, inputs, _)] = fake.sent
    assert inputs == {"text_input": ("BYTES", [1, 1], ["Hello"]), "max_tokens": ("INT32", [1, 1], [2]),
                      "seed": ("UINT64", [1, 1], [1]), "stream": ("BOOL", [1, 1], [False]),
                      "exclude_input_in_output": ("BOOL", [1, 1], [True]),
                      "return_num_input_tokens": ("BOOL", [1, 1], [True]),
                      "return_num_output_tokens": ("BOOL", [1, 1], [True]), "stop": ("BYTES", [1, 1], ["end"])}
    done = json.loads(text)
    assert done["choices"][0]["text"] == "one two" and done["choices"][0]["finish_reason"] == "length"
    assert done["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    fake.sent.clear()
    status, text = _post(f"{url}/v1/chat/completions", {"model": "eng", "messages": HELLO})
    assert status == 200 and fake.sent[0][1]["max_tokens"] == ("INT32", [1, 1], [32])  # required: the spec's default


@pytest.mark.parametrize("model,route,body,param", [
    ("trt", "completions", {"prompt": "Hi", "logprobs": 2}, "logprobs"),
    ("trt", "chat/completions", {"messages": HELLO, "logprobs": True, "top_logprobs": 2}, "top_logprobs"),
    ("trt", "chat/completions", {"messages": HELLO, "response_format": {"type": "json_object"}}, "response_format"),
    ("eng", "chat/completions", {"messages": HELLO, "tool_choice": "required", "tools": [{"type": "function",
                                 "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tool_choice"),
    ("eng", "completions", {"prompt": "Hi", "ignore_eos": True}, "ignore_eos"),
    ("trt", "completions", {"prompt": "Hi", "ignore_eos": True}, "ignore_eos"),
    ("trt", "chat/completions", {"messages": HELLO, "frequency_penalty": 0.5}, "frequency_penalty"),
    ("eng", "completions", {"prompt": "Hi", "min_tokens": 4}, "min_tokens"),
    ("vl", "completions", {"prompt": [5, 6, 7]}, "prompt"),
    ("eng", "completions", {"prompt": [5, 6, 7]}, "prompt"),
])
def test_what_a_backend_cannot_honour_is_a_400_naming_it_before_anything_is_sent(served, model, route, body, param):
    url, fake, _ = served
    for stream in (False, True):
        status, text = _post(f"{url}/v1/{route}", {"model": model, "stream": stream, **body})
        error = json.loads(text)["error"]
        assert status == 400 and error["param"] == param and error["message"].startswith(f"{param}: "), text
        assert "has no input for" in error["message"]
    assert fake.sent == []


def test_a_template_bos_is_dropped_for_a_backend_that_adds_its_own():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from builder.openai.app import _without_bos

    plain = make_tokenizer_in_memory()
    assert _without_bos(plain, "<s>user: hi") == "<s>user: hi"  # adds none: the template's stays
    adding = PreTrainedTokenizerFast(tokenizer_object=plain.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    adding.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", adding.bos_token_id)])
    assert _without_bos(adding, "<s>user: hi") == "user: hi" and _without_bos(adding, "user: hi") == "user: hi"


def make_tokenizer_in_memory():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        return make_tokenizer(Path(folder))
