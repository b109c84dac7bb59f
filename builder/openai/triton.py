"""One generation request to a Triton text-generation model, over gRPC, as an async stream of pieces.

Each request is its own bidirectional gRPC stream: the request goes out, then the responses come back until the
one with the FINAL flag. Leaving the iteration early (the HTTP client went away) cancels the gRPC call, which
Triton turns into a cancelled request: the engine frees its slot at its next poll.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np

from builder.formats.base import GenerationRequest
from builder.generation.client import grpc_tensors


class GenerationError(Exception):
    """The model refused the request (its first response is an error: a limit, a bad value) or failed later."""

    def __init__(self, message: str, started: bool):
        super().__init__(message)
        self.started = started  # False: refused before any token (the client's input); True: failed mid-way


@dataclass
class Piece:
    text: str
    finish_reason: str | None = None
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    tokens: list = field(default_factory=list)  # (id, logprob, [(id, logprob)]) when logprobs were asked
    final: bool = False


class Reply:
    """A request's responses read into pieces, whatever its backend's conventions (GenerationRequest)."""

    def __init__(self, request: GenerationRequest, tokenizer=None):
        self.request, self.tokenizer = request, tokenizer
        self.text = ""  # the whole text so far
        self.output_tokens = self.input_tokens = 0

    def read(self, result, final: bool) -> Piece:
        req, piece = self.request, Piece("", final=final)
        text = _first(result, "text_output")
        if text is not None:
            text = text.decode("utf-8")
            piece.text = text[len(self.text):] if req.text == "total" else text
            self.text = text if req.text == "total" else self.text + text
        reason = _first(result, "finish_reason")
        reason = reason.decode() if reason is not None else ""
        piece.finish_reason = None if reason in ("", "None") else reason  # str(None) while running (vLLM, llmapi)
        count, prompt = _first(result, "num_output_tokens"), _first(result, "num_input_tokens")
        if req.counts is None and self.tokenizer is not None:
            self.output_tokens = len(self.tokenizer(self.text, add_special_tokens=False)["input_ids"])
            if not self.input_tokens:
                self.input_tokens = len(self.tokenizer(req.inputs["text_input"][0])["input_ids"])
        elif count is not None:
            self.output_tokens = int(count) + (self.output_tokens if req.counts == "delta" else 0)
        if prompt is not None:
            self.input_tokens = int(prompt)
        piece.num_output_tokens, piece.num_input_tokens = self.output_tokens, self.input_tokens
        info = _first(result, "token_info")
        if info is not None:
            piece.tokens = json.loads(info)
        logprobs = _first(result, "logprobs")
        if logprobs is not None:
            piece.tokens = vllm_tokens(json.loads(logprobs), req.logprobs or 0)
        if final and not req.finish_reason and piece.finish_reason is None:
            # no finish_reason output (the engine ensemble): the length limit reached, or an end token / stop word
            limit = req.inputs.get("max_tokens", [None])[0]
            piece.finish_reason = "length" if limit is not None and self.output_tokens >= limit else "stop"
        return piece


def _first(result, name: str):
    """An output's first element (batched or not), or None when the response does not carry it."""
    values = result.as_numpy(name)
    return None if values is None or values.size == 0 else values.reshape(-1)[0]


def vllm_tokens(entries: list, top: int) -> list:
    """The vLLM backend's logprobs output (per token {id: {logprob, rank, decoded_token}}, the sampled token
    first: vLLM builds each dict from [sampled, top-k...]) as our token_info: [[id, logprob, [[id, logprob],
    ...]], ...] with the `top` most likely."""
    out = []
    for entry in entries or []:
        if not entry:
            continue
        ranked = sorted(((int(i), v) for i, v in entry.items()), key=lambda x: x[1]["rank"])
        sampled = next(iter(entry))
        out.append([int(sampled), entry[sampled]["logprob"],
                    [[i, v["logprob"]] for i, v in ranked if v["rank"] <= top][:top]])
    return out


def _message(error) -> str:
    """The model's own words, without the client library's wrapping (no server address)."""
    text = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    return (text or "generation failed").removeprefix("[StatusCode.INVALID_ARGUMENT] ").strip()


class Triton:
    """The gRPC client, made in the serving event loop (grpc.aio channels belong to one loop)."""

    def __init__(self, grpc_url: str):
        import tritonclient.grpc.aio as grpcclient

        self.client = grpcclient.InferenceServerClient(grpc_url)

    async def close(self) -> None:
        await self.client.close()

    async def ready(self) -> bool:
        try:
            return await self.client.is_server_ready()
        except Exception:  # noqa: BLE001 - any failure to answer is "not ready"
            return False

    async def version(self) -> str:
        return (await self.client.get_server_metadata()).version

    async def generate(self, model: str, request: GenerationRequest, tokenizer=None) -> AsyncIterator[Piece]:
        """The pieces of one request (made by the model's format record), read as that backend answers: text as
        new pieces, counts as running totals, finish_reason on the last piece. Without counts from the backend,
        `tokenizer` counts them (the prompt with its special tokens, the text so far without)."""
        done = asyncio.Event()

        async def requests():
            yield {"model_name": model, "inputs": grpc_tensors(request), "parameters": request.parameters or None}
            await done.wait()  # the stream stays open until the last response is in

        call = self.client.stream_infer(requests())
        final = started = False
        reply = Reply(request, tokenizer)
        try:
            async for result, error in call:
                if error is not None:
                    raise GenerationError(_message(error), started)
                final = result.get_response().parameters["triton_final_response"].bool_param
                piece = reply.read(result, final)
                started = True
                yield piece
                if final:
                    return
        finally:
            done.set()
            if not final:
                call.cancel()

    async def embed(self, model: str, texts: list[str], max_batch: int) -> np.ndarray:
        """EMBEDDING rows of a feature-extraction ensemble for `texts` (TEXT [batch, 1]), in batches it takes."""
        from tritonclient.grpc import InferInput

        async def batch(part: list[str]) -> np.ndarray:
            tensor = InferInput("TEXT", [len(part), 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[t.encode("utf-8")] for t in part], dtype=np.object_))
            try:
                result = await self.client.infer(model, [tensor])
            except Exception as exc:  # noqa: BLE001 - the model's refusal, in its own words
                raise GenerationError(_message(exc), started=False) from None
            return result.as_numpy("EMBEDDING")

        size = max(1, max_batch)
        parts = await asyncio.gather(*(batch(texts[i:i + size]) for i in range(0, len(texts), size)))
        return np.concatenate(parts).astype(np.float32)
