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

from builder.generation.client import grpc_inputs


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

    async def generate(self, model: str, text: str, stop: list[str], inputs: dict,
                       parameters: dict) -> AsyncIterator[Piece]:
        done = asyncio.Event()

        async def requests():
            yield {"model_name": model, "inputs": grpc_inputs(text, tuple(stop), **inputs), "parameters": parameters or None}
            await done.wait()  # the stream stays open until the last response is in

        call = self.client.stream_infer(requests())
        final = started = False
        try:
            async for result, error in call:
                if error is not None:
                    raise GenerationError(_message(error), started)
                response = result.get_response()
                final = response.parameters["triton_final_response"].bool_param
                piece = Piece("", final=final)
                if result.as_numpy("text_output") is not None:
                    piece.text = result.as_numpy("text_output").reshape(-1)[0].decode("utf-8")
                    reason = result.as_numpy("finish_reason").reshape(-1)[0].decode()
                    piece.finish_reason = reason or None
                    piece.num_input_tokens = int(result.as_numpy("num_input_tokens").reshape(-1)[0])
                    piece.num_output_tokens = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
                    info = result.as_numpy("token_info")
                    if info is not None:
                        piece.tokens = json.loads(info.reshape(-1)[0])
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
