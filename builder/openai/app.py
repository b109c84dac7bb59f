"""The routes of the OpenAI-compatible front (FastAPI): models, completions, chat, embeddings, tokenize, health,
version, metrics.

Every check that can be made is made before the first byte: the body's schema (pydantic), the model, values
this server cannot honour, and the model's own limits (the first response of every sequence is awaited before
the HTTP status is sent, so a prompt that is too long is a 400, streamed or not). A stream that fails later
ends with an error event; a client that goes away cancels its sequences (their slots are freed).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from builder.openai import schema as s
from builder.openai.errors import APIError, error_body
from builder.openai.metrics import Metrics
from builder.openai.prompts import Tokenizers, chat_prompt, completion_prompts, template_messages
from builder.formats.base import GenerationRequest
from builder.openai.triton import GenerationError, Piece, Triton

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize",
          "/health", "/version", "/metrics")


@dataclass
class Sequence:
    """One generated sequence (a choice): where it goes in the answer and what came back."""

    index: int
    prompt: int  # which prompt of the request
    text: str
    ids: list[int] | None
    fields: dict  # the request in our endpoint's names (builder.formats.base.FIELDS)
    pieces: list[Piece] = field(default_factory=list)
    stream: AsyncIterator[Piece] | None = None


class Front:
    def __init__(self, repo: Path, grpc_url: str, metrics_url: str | None):
        from builder.manifest import read_manifest

        self.repo, self.grpc_url, self.metrics_url = Path(repo), grpc_url, metrics_url
        entries = read_manifest(repo)["models"]
        # our endpoint, built and verified here; and the vLLM / TensorRT-LLM models rendered for a server that runs
        # them (the client-facing one of a model set), each sent requests in its own tensors (its format's `request`)
        self.models = {n: e for n, e in entries.items() if "generation" in e and (
            e.get("status") == "passed" or e.get("status") == "rendered" and e.get("role") in ("llm", "ensemble"))}
        # feature-extraction ensembles (text in, sentence embedding out) for /v1/embeddings
        self.embedders = {n: e for n, e in entries.items() if e.get("role") == "ensemble" and e.get("status") == "passed"
                          and e.get("task") == "feature-extraction"
                          and [t["name"] for t in e["signature"]["outputs"]] == ["EMBEDDING"]}
        self.counters: dict[str, object] = {}  # embedder -> its pre-processing tokenizer (usage counts)
        self.tokenizers = Tokenizers(repo, self.models)
        self.metrics = Metrics()
        self.triton: Triton | None = None
        self.created = int(time.time())

    def model(self, name: str, among: dict | None = None) -> dict:
        among = self.models if among is None else among
        if name not in among:
            raise APIError(404, f"The model '{name}' does not exist; available: {', '.join(among) or 'none'}",
                           param="model", code="model_not_found")
        return among[name]

    def max_batch(self, name: str) -> int:
        import re

        found = re.search(r"max_batch_size:\s*(\d+)", (self.repo / name / "config.pbtxt").read_text())
        return int(found.group(1)) if found else 1

    def count_tokens(self, name: str, texts: list[str]) -> int:
        """Tokens the ensemble's pre-processing step makes of `texts` (its own tokenizer.json)."""
        if name not in self.counters:
            from tokenizers import Tokenizer

            path = self.repo / self.embedders[name]["steps"][0] / "1" / "tokenizer.json"
            self.counters[name] = Tokenizer.from_file(str(path)) if path.is_file() else None
        tokenizer = self.counters[name]
        # attention masks, not ids: a tokenizer.json may pad a batch to its longest text
        return sum(sum(e.attention_mask) for e in tokenizer.encode_batch(texts)) if tokenizer is not None else 0

    # -- sequences --
    def request(self, model: str, fields: dict, params: dict[str, str]) -> GenerationRequest:
        """The model's own request for `fields` (its format record's mapping). What its backend has no input for
        is a 400 naming the client's parameter (`params`: field -> parameter, where the names differ)."""
        from builder import formats
        from builder.formats.base import Unhonoured

        entry = self.models[model]
        fmt, flow = formats.get(entry.get("format", "torch"), "generation"), entry.get("flow") or "llmapi"
        fields = dict(fields)
        if fmt.name != "torch":
            # a backend's own default output length is not the spec's (vLLM's: 16; the engine ensemble needs one)
            fields.setdefault("max_tokens", entry["generation"]["max_tokens"])
        if fields.get("add_special_tokens") is False and "add_special_tokens" not in fmt.honours(flow):
            # a backend that always adds special tokens: the template's own BOS goes, or the prompt would hold two
            del fields["add_special_tokens"]
            fields["text_input"] = _without_bos(self.tokenizers.get(model), fields["text_input"])
        try:
            return fmt.request(fields, flow)
        except Unhonoured as exc:
            param = params.get(exc.field, exc.field)
            raise APIError(400, f"{param}: {exc.why}", param=param) from None

    async def start(self, model: str, seqs: list[Sequence], t0: float, chat: bool = False,
                    params: dict[str, str] | None = None) -> None:
        """Open every sequence and wait for its first response: a refusal is the client's 400 (or 500)."""
        requests = [self.request(model, seq.fields, params or {}) for seq in seqs]
        tokenizer = self.tokenizers.get(model)
        waiting = self.metrics.waiting.labels(model)
        waiting.inc(len(seqs))
        try:
            for seq, request in zip(seqs, requests):
                seq.stream = self.triton.generate(model, request, tokenizer)
            firsts = await asyncio.gather(*(anext(seq.stream) for seq in seqs), return_exceptions=True)
        except asyncio.CancelledError:  # the client left before the first token
            for _ in seqs:
                self.finished(model, "abort")
            raise
        finally:
            waiting.dec(len(seqs))
        failed = [f for f in firsts if isinstance(f, BaseException)]
        if failed:
            await asyncio.gather(*(seq.stream.aclose() for seq in seqs), return_exceptions=True)
            exc = failed[0]
            if isinstance(exc, GenerationError) and not exc.started and not exc.args[0].startswith("generation failed"):
                message, param = exc.args[0], None
                if message.startswith("text_input: "):  # the model's input is the client's prompt or messages
                    param = "messages" if chat else "prompt"
                    message = f"{param}: {message.removeprefix('text_input: ')}"
                elif message.split(":", 1)[0] in ("max_tokens", "temperature", "top_p", "top_k", "logprobs", "guide"):
                    param = message.split(":", 1)[0]
                raise APIError(400, message, param=param)
            if isinstance(exc, (GenerationError, APIError)):
                raise APIError(500, str(exc), kind="server_error")
            raise exc
        now = time.perf_counter()
        for seq, first in zip(seqs, firsts):
            self.metrics.ttft.labels(model).observe(now - t0)
            seq.pieces.append(first)

    async def follow(self, model: str, seq: Sequence, t0: float) -> AsyncIterator[Piece]:
        """The sequence's pieces from the first on, timed for the metrics."""
        running = self.metrics.running.labels(model)
        running.inc()
        last = time.perf_counter()
        try:
            first = seq.pieces[0]
            yield first
            if not first.final:
                async for piece in seq.stream:
                    now = time.perf_counter()
                    n = max(1, len(piece.tokens) or 1)
                    if piece.text or piece.tokens:
                        for _ in range(n):
                            self.metrics.itl.labels(model).observe((now - last) / n)
                        last = now
                    seq.pieces.append(piece)
                    yield piece
            final = seq.pieces[-1]
            self.metrics.e2e.labels(model).observe(time.perf_counter() - t0)
            self.metrics.generation_tokens.labels(model).inc(final.num_output_tokens)
        finally:
            running.dec()
            if not (seq.pieces and seq.pieces[-1].final):  # the client left, or generation failed
                self.finished(model, "abort")
            await seq.stream.aclose()

    def finished(self, model: str, reason: str) -> None:
        """A sequence (choice) ended with `reason` as the client sees it (stop, length, tool_calls, abort)."""
        self.metrics.finished.labels(model, reason).inc()


class CountRequests:
    """Requests by route and status code, as a plain ASGI middleware: Starlette's BaseHTTPMiddleware wraps
    `receive`, and a client's disconnect then no longer reaches the handler (its sequences would run on)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"].rstrip("/")
        route = route if route in ROUTES else "/v1/models/{id}" if route.startswith("/v1/models/") else "other"
        status = [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()


def _stop(body) -> list[str]:
    stop = body.stop
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > 4:
        raise APIError(400, "stop: give at most 4 strings", param="stop")
    return [x for x in stop if x]


def _refuse_unsupported(body) -> None:
    for name, why in s.unsupported(body):
        raise APIError(400, f"{name}: {why}", param=name)


def _fields(body, max_tokens: int | None, stream: bool) -> dict:
    """The request's settings in our endpoint's names (builder.formats.base.FIELDS)."""
    fields = {"stream": stream}
    for name in ("temperature", "top_p", "top_k", "ignore_eos"):
        if getattr(body, name) is not None:
            fields[name] = getattr(body, name)
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    stop = _stop(body)
    if stop:
        fields["stop"] = stop
    # penalties and min_tokens at their neutral values ask nothing: only the others go to the backend (which may
    # refuse them: builder.formats)
    neutral = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "min_tokens": 0}
    for name, value in neutral.items():
        if getattr(body, name) not in (None, value):
            fields[name] = getattr(body, name)
    return fields


def _sequences(body, prompts: list[tuple[str, list[int] | None]], fields: dict) -> list[Sequence]:
    seqs = []
    for p, (text, ids) in enumerate(prompts):
        for j in range(body.n):
            own = dict(fields)
            if body.seed is not None:
                own["seed"] = (body.seed + j) % 2**64  # n choices of one seed still differ when sampled
            if ids is not None:
                own["prompt_ids"] = list(ids)
                text = text or " "
            own["text_input"] = text
            seqs.append(Sequence(len(seqs), p, text, ids, own))
    return seqs


def _without_bos(tokenizer, text: str) -> str:
    """`text` less a leading BOS token that the tokenizer adds itself anyway."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or not text.startswith(bos):
        return text
    adds = tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    return text[len(bos):] if adds else text


def _usage(seqs: list[Sequence], prompts: int) -> s.Usage:
    finals = [seq.pieces[-1] for seq in seqs]
    prompt = sum(next(f.num_input_tokens for seq, f in zip(seqs, finals) if seq.prompt == p) for p in range(prompts))
    completion = sum(f.num_output_tokens for f in finals)
    return s.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, tokens: list, offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, logprob, top in tokens:
        text = _token(tokenizer, token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append({_token(tokenizer, t): lp for t, lp in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(tokenizer, tokens: list) -> dict:
    def entry(token_id, logprob):
        text = _token(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(entry(t, lp), top_logprobs=[entry(i, v) for i, v in top]) for t, lp, top in tokens]}


def create_app(repo: Path, grpc_url: str, metrics_url: str | None = None) -> FastAPI:
    front = Front(repo, grpc_url, metrics_url)

    @asynccontextmanager
    async def lifespan(app):
        front.triton = Triton(grpc_url)
        for name, entry in front.models.items():  # loaded before the first request, not during it
            try:
                await asyncio.to_thread(front.tokenizers.get, name)
            except Exception:  # noqa: BLE001 - a rendered model's hub tokenizer may be out of reach here
                if entry.get("status") == "passed":
                    raise
        yield
        await front.triton.close()

    app = FastAPI(title="triton-builder OpenAI-compatible API", lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None)
    app.state.front = front

    app.add_middleware(CountRequests, metrics=front.metrics)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = [str(x) for x in first.get("loc", ()) if x != "body" and not _type_name(x)]
        param = ".".join(where) or None
        if first.get("type") == "extra_forbidden":
            message = f"{param}: this parameter is not supported by this server"
        elif first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
        else:
            message = f"{param}: {first['msg']}" if param else first["msg"]
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(error_body(message, "invalid_request_error"), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    # -- routes --
    def card(name: str) -> s.ModelCard:
        return s.ModelCard(id=name, created=front.created)

    @app.get("/v1/models")
    async def models() -> s.ModelList:
        return s.ModelList(data=[card(n) for n in [*front.models, *front.embedders]])

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> s.ModelCard:
        front.model(name, {**front.models, **front.embedders})
        return card(name)

    @app.post("/v1/embeddings")
    async def embeddings(body: s.EmbeddingRequest):
        import base64

        front.model(body.model, front.embedders)
        if body.dimensions is not None:
            raise APIError(400, "dimensions: this model's embeddings have one size; leave it out", param="dimensions")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts or any(not t for t in texts):
            raise APIError(400, "input: give a non-empty string or list of non-empty strings", param="input")
        try:
            vectors = await front.triton.embed(body.model, texts, front.max_batch(body.model))
        except GenerationError as exc:
            raise APIError(400, str(exc), param="input") from None
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                 else v.tolist()} for i, v in enumerate(vectors)]
        tokens = await asyncio.to_thread(front.count_tokens, body.model, texts)
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.get("/health")
    async def health():
        if await front.triton.ready():
            return Response(status_code=200)
        return JSONResponse(error_body("the inference server is not ready", "server_error"), status_code=503)

    @app.get("/version")
    async def version():
        from importlib.metadata import version as package_version

        try:
            triton = await front.triton.version()
        except Exception:  # noqa: BLE001 - the front's version still answers
            triton = None
        return {"version": package_version("triton-builder"), "triton": triton}

    @app.get("/metrics")
    async def metrics():
        text = await asyncio.to_thread(front.metrics.text, front.metrics_url)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(body: s.TokenizeRequest):
        entry = front.model(body.model)
        tokenizer = front.tokenizers.get(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        if body.messages is not None:
            text = chat_prompt(tokenizer, s.ChatRequest(model=body.model, messages=body.messages), None)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        return {"tokens": ids, "count": len(ids), "max_model_len": entry["generation"]["max_total_tokens"]}

    @app.post("/detokenize")
    async def detokenize(body: s.DetokenizeRequest):
        front.model(body.model)
        tokenizer = front.tokenizers.get(body.model)
        if any(not 0 <= t < len(tokenizer) for t in body.tokens):
            raise APIError(400, f"tokens: ids must be from 0 to {len(tokenizer) - 1}", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: s.CompletionRequest, request: Request):
        t0 = time.perf_counter()
        front.model(body.model)
        _refuse_unsupported(body)
        tokenizer = front.tokenizers.get(body.model)
        prompts = completion_prompts(tokenizer, body.prompt)
        fields = _fields(body, body.max_tokens, body.stream)
        if body.logprobs is not None:
            fields["logprobs"] = body.logprobs
        seqs = _sequences(body, prompts, fields)
        await _watched(request, front.start(body.model, seqs, t0, params={"prompt_ids": "prompt"}))
        rid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
        echo = [text if ids is None else tokenizer.decode(ids) for text, ids in prompts] if body.echo else None

        if not body.stream:
            await _drain(front, body.model, seqs, t0, request)
            choices = []
            for seq in seqs:
                text = "".join(p.text for p in seq.pieces)
                tokens = [t for p in seq.pieces for t in p.tokens]
                lead = echo[seq.prompt] if echo else ""
                reason = seq.pieces[-1].finish_reason or "stop"
                front.finished(body.model, reason)
                choices.append(s.CompletionChoice(
                    index=seq.index, text=lead + text, finish_reason=reason,
                    logprobs=completion_logprobs(tokenizer, tokens, len(lead)) if body.logprobs is not None else None))
            _count_prompt(front, body.model, seqs, len(prompts))
            return s.Completion(id=rid, created=created, model=body.model, choices=choices,
                                usage=_usage(seqs, len(prompts)))

        offsets = {seq.index: 0 for seq in seqs}

        def chunk(seq: Sequence, piece: Piece | None, first: bool) -> dict:
            text = (echo[seq.prompt] if echo and first else "") + (piece.text if piece else "")
            logprobs = None
            if body.logprobs is not None and piece is not None:
                logprobs = completion_logprobs(tokenizer, piece.tokens, offsets[seq.index])
                offsets[seq.index] += sum(len(x) for x in logprobs["tokens"])
            reason = (piece.finish_reason or "stop") if piece is not None and piece.final else None
            if reason:
                front.finished(body.model, reason)
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": seq.index, "text": text, "finish_reason": reason, "logprobs": logprobs}]}

        return _sse(front, body, seqs, len(prompts), t0, chunk, lambda usage: {
            "id": rid, "object": "text_completion", "created": created, "model": body.model, "choices": [],
            "usage": usage})

    @app.post("/v1/chat/completions")
    async def chat(body: s.ChatRequest, request: Request):
        t0 = time.perf_counter()
        front.model(body.model)
        _refuse_unsupported(body)
        from builder.openai import guided

        plan = guided.plan(body)  # response_format / tools: a grammar for the engine, a parser for the text
        tokenizer = front.tokenizers.get(body.model)
        text = chat_prompt(tokenizer, body, plan.template_tools)
        fields = _fields(body, body.max_completion_tokens or body.max_tokens, body.stream)
        if body.logprobs:
            fields["logprobs"] = body.top_logprobs or 0
        elif body.top_logprobs is not None:
            raise APIError(400, "top_logprobs: only with logprobs: true", param="top_logprobs")
        if plan.guide is not None:
            fields["guide"] = plan.guide
        fields["add_special_tokens"] = False  # the template wrote them
        seqs = _sequences(body, [(text, None)], fields)
        params = {"guide": "response_format" if body.response_format is not None else "tool_choice",
                  "logprobs": "top_logprobs" if body.top_logprobs else "logprobs"}
        await _watched(request, front.start(body.model, seqs, t0, chat=True, params=params))
        rid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())

        if not body.stream:
            await _drain(front, body.model, seqs, t0, request)
            choices = []
            for seq in seqs:
                content = "".join(p.text for p in seq.pieces)
                reason = seq.pieces[-1].finish_reason or "stop"
                calls = plan.parse(content) if plan.parses else None
                message = s.ChatMessage(content=content)
                if calls:
                    message = s.ChatMessage(content=None, tool_calls=calls)
                    reason = "tool_calls"
                front.finished(body.model, reason)
                tokens = [t for p in seq.pieces for t in p.tokens]
                choices.append(s.ChatChoice(index=seq.index, message=message, finish_reason=reason,
                                            logprobs=chat_logprobs(tokenizer, tokens) if body.logprobs else None))
            _count_prompt(front, body.model, seqs, 1)
            return s.ChatCompletion(id=rid, created=created, model=body.model, choices=choices,
                                    usage=_usage(seqs, 1))

        usage_field = body.stream_options is not None and body.stream_options.include_usage
        streams = {seq.index: plan.stream() for seq in seqs}

        def chunk(seq: Sequence, piece: Piece | None, first: bool) -> dict:
            delta: dict = {"role": "assistant", "content": ""} if first else {}
            reason = None
            if piece is not None:
                delta.update(streams[seq.index].feed(piece.text, piece.final))
                if piece.final:
                    reason = piece.finish_reason or "stop"  # a call cut by max_tokens stays "length"
                    reason = "tool_calls" if streams[seq.index].called and reason != "length" else reason
                    front.finished(body.model, reason)
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                   "choices": [{"index": seq.index, "delta": delta, "finish_reason": reason,
                                "logprobs": chat_logprobs(tokenizer, piece.tokens) if body.logprobs and piece else None}]}
            if usage_field:
                out["usage"] = None
            return out

        return _sse(front, body, seqs, 1, t0, chunk, lambda usage: {
            "id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model, "choices": [],
            "usage": usage})

    return app


def _type_name(part) -> bool:
    """A union member's name in a validation error's location (list[int], str, ...), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict") or "[" in part
                                      or part.startswith(("function-", "literal", "union")))


def _count_prompt(front: Front, model: str, seqs: list[Sequence], prompts: int) -> None:
    front.metrics.prompt_tokens.labels(model).inc(_usage(seqs, prompts).prompt_tokens)


DISCONNECT_POLL_S = 0.5


async def _watched(request: Request, coro) -> object:
    """Await `coro` unless the client goes away first: then it is cancelled (its sequences' gRPC calls with it,
    which frees their slots) and the answer is a 499 nobody reads. Polled: Starlette says so only when asked."""
    work = asyncio.ensure_future(coro)
    while not work.done():
        await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
        if not work.done() and await request.is_disconnected():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise APIError(499, "the client went away")
    return work.result()


async def _drain(front: Front, model: str, seqs: list[Sequence], t0: float, request: Request) -> None:
    """Every sequence to its end (a client that goes away meanwhile cancels them)."""
    async def one(seq):
        async for _ in front.follow(model, seq, t0):
            pass

    try:
        await _watched(request, asyncio.gather(*(one(seq) for seq in seqs)))
    except GenerationError as exc:
        raise APIError(500, str(exc), kind="server_error") from None


def _sse(front: Front, body, seqs: list[Sequence], prompts: int, t0: float, chunk, usage_chunk) -> EventSourceResponse:
    """The sequences' pieces as server-sent events (merged as they come), then usage if asked, then [DONE]."""
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    continuous = body.stream_options is not None and body.stream_options.continuous_usage_stats

    def data(out: dict) -> dict:
        if continuous:  # the usage so far on every chunk (vLLM's continuous_usage_stats; AIPerf --per-chunk-usage)
            out["usage"] = _usage(seqs, prompts).model_dump()
        return {"data": json.dumps(out)}

    async def events():
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(seq: Sequence):
            try:
                async for piece in front.follow(body.model, seq, t0):
                    await queue.put((seq, piece))
            except GenerationError as exc:
                await queue.put((seq, exc))
            finally:
                await queue.put((seq, None))

        for seq in seqs:  # the role chunk first, as OpenAI's streams begin
            if hasattr(body, "messages"):
                yield data(chunk(seq, None, True))
        tasks = [asyncio.create_task(pump(seq)) for seq in seqs]
        open_ = len(seqs)
        first = {seq.index: not hasattr(body, "messages") for seq in seqs}
        try:
            while open_:
                seq, item = await queue.get()
                if item is None:
                    open_ -= 1
                elif isinstance(item, GenerationError):
                    yield {"data": json.dumps(error_body(str(item), "server_error"))}
                    return
                else:
                    yield data(chunk(seq, item, first[seq.index]))
                    first[seq.index] = False
            _count_prompt(front, body.model, seqs, prompts)
            if include_usage:
                yield {"data": json.dumps(usage_chunk(_usage(seqs, prompts).model_dump()))}
            yield {"data": "[DONE]"}
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return EventSourceResponse(events(), sep="\n", ping=15)
