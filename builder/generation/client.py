"""Clients of a text-generation endpoint (ours, TensorRT-LLM's or vLLM's: the same tensor names).

    generate("127.0.0.1:8000", "smollm", "Hello", max_tokens=16)          # HTTP generate extension
    for event in stream("127.0.0.1:8000", "smollm", "Hello"): ...          # /generate_stream (SSE)
    grpc_stream("127.0.0.1:8001", "smollm", "Hello", on_piece=print)       # gRPC bidirectional stream
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Callable, Iterator

import numpy as np

from builder.errors import RunError

TIMEOUT_S = 300.0
TYPES = {"max_tokens": ("INT32", np.int32), "stream": ("BOOL", np.bool_), "temperature": ("FP32", np.float32),
         "top_p": ("FP32", np.float32), "top_k": ("INT32", np.int32), "seed": ("UINT64", np.uint64),
         "ignore_eos": ("BOOL", np.bool_), "add_special_tokens": ("BOOL", np.bool_)}


def _post(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except json.JSONDecodeError:
            pass
        raise RunError(f"{url}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise RunError(f"{url}: no answer ({exc}); is the server running?") from None


def generate(http_url: str, model: str, text: str, **params) -> dict:
    """One request through Triton's HTTP generate extension; the JSON answer."""
    with _post(f"http://{http_url}/v2/models/{model}/generate", {"text_input": text, **params}) as answer:
        return json.loads(answer.read())


def stream(http_url: str, model: str, text: str, **params) -> Iterator[dict]:
    """Server-sent events of /generate_stream, one dict per response (an error event raises RunError)."""
    with _post(f"http://{http_url}/v2/models/{model}/generate_stream", {"text_input": text, "stream": True, **params}) as answer:
        for raw in answer:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RunError(f"{model}: {event['error']}")
            yield event


def grpc_inputs(text: str, stop: tuple[str, ...] = (), **params) -> list:
    from tritonclient.grpc import InferInput

    tensors = []
    value = np.array([text.encode("utf-8")], dtype=np.object_)
    tensor = InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(value)
    tensors.append(tensor)
    for name, given in params.items():
        kind, dtype = TYPES[name]
        tensor = InferInput(name, [1], kind)
        tensor.set_data_from_numpy(np.array([given], dtype=dtype))
        tensors.append(tensor)
    if stop:
        tensor = InferInput("stop", [len(stop)], "BYTES")
        tensor.set_data_from_numpy(np.array([s.encode() for s in stop], dtype=np.object_))
        tensors.append(tensor)
    return tensors


def grpc_tensors(request) -> list:
    """A GenerationRequest's tensors for tritonclient.grpc (a leading batch dimension of 1 where the model batches)."""
    from tritonclient.grpc import InferInput
    from tritonclient.utils import triton_to_np_dtype

    tensors = []
    for name, values in request.inputs.items():
        kind = request.types[name]
        if kind == "BYTES":
            array = np.array([v.encode("utf-8") for v in values], dtype=np.object_)
        else:
            array = np.array(values, dtype=triton_to_np_dtype(kind))
        if request.batched:
            array = array.reshape(1, -1)
        tensor = InferInput(name, list(array.shape), kind)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def grpc_stream(grpc_url: str, model: str, text: str, on_piece: Callable[[str], None] | None = None,
                **params) -> dict:
    """Stream one request over gRPC; calls on_piece with each new text; returns the final response's fields
    with `text_output` holding the whole text."""
    import queue

    import tritonclient.grpc as grpcclient

    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    pieces, final = [], {}
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(model, grpc_inputs(text, stream=True, **params), enable_empty_final_response=True)
        while True:
            result, error = answers.get(timeout=TIMEOUT_S)
            if error is not None:
                raise RunError(f"{model}: {error}")
            response = result.get_response()
            if result.as_numpy("text_output") is not None:
                piece = result.as_numpy("text_output").reshape(-1)[0].decode("utf-8")
                pieces.append(piece)
                if on_piece and piece:
                    on_piece(piece)
                final = {k: result.as_numpy(k).reshape(-1)[0] for k in ("finish_reason", "num_input_tokens", "num_output_tokens")}
            if response.parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    final["finish_reason"] = final.get("finish_reason", b"").decode() if isinstance(final.get("finish_reason"), bytes) else final.get("finish_reason", "")
    return {**final, "text_output": "".join(pieces)}
