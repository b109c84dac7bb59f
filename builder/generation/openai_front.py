"""An OpenAI-compatible front on top of a Triton text-generation endpoint (`serve --openai-port P`).

    /v1/models              the repository's generation models
    /v1/completions         prompt -> text (stream: true gives server-sent events)
    /v1/chat/completions    messages -> the model's chat template -> text (stream: true likewise)

Each request becomes one request to Triton's HTTP generate extension (`/generate`, `/generate_stream`),
so everything the endpoint checks (prompt and cache limits) is checked the same way here; its errors come
back as OpenAI-style 400 answers. Threads: one per connection (the standard library's server).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from builder.errors import RunError

SAMPLING = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int, "ignore_eos": bool}


class BadRequest(ValueError):
    pass


class Front:
    def __init__(self, repo: Path, http_url: str):
        from builder.manifest import read_manifest

        self.http_url = http_url
        self.repo = Path(repo)
        self.models = {n: e for n, e in read_manifest(repo)["models"].items()
                       if "generation" in e and e.get("status") == "passed"}
        self._templates: dict[str, object] = {}
        self._lock = threading.Lock()

    def tokenizer(self, model: str):
        """The model's own tokenizer files (chat template included), loaded once."""
        with self._lock:
            if model not in self._templates:
                from transformers import AutoTokenizer

                self._templates[model] = AutoTokenizer.from_pretrained(str(self.repo / model / "1"))
            return self._templates[model]

    def request(self, path: str, body: dict) -> tuple[str, dict]:
        """(model, parameters of the Triton request) for a completions or chat body."""
        model = body.get("model")
        if model not in self.models:
            raise LookupError(f"model {model!r} not found; available: {', '.join(self.models) or 'none'}")
        params = {}
        for key, kind in SAMPLING.items():
            if body.get(key) is not None:
                try:
                    params[key] = kind(body[key])
                except (TypeError, ValueError):
                    raise BadRequest(f"{key}: {body[key]!r} is not a {kind.__name__}") from None
        if body.get("max_completion_tokens") is not None and "max_tokens" not in params:
            params["max_tokens"] = int(body["max_completion_tokens"])
        stop = body.get("stop")
        if stop:
            params["stop"] = [stop] if isinstance(stop, str) else list(stop)
        if path.endswith("/chat/completions"):
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("messages: give a non-empty list of {role, content}")
            try:
                text = self.tokenizer(model).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001 - a template error is the client's input problem
                raise BadRequest(f"messages: the chat template failed: {exc}") from None
            params["add_special_tokens"] = False  # the template wrote them
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise BadRequest("prompt: give one string")
            text = prompt
        params["text_input"] = text
        return model, params


def make_handler(front: Front):
    from builder.generation.client import generate, stream

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: the serve command prints what matters
            pass

        def _json(self, status: int, data: dict) -> None:
            raw = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

        def do_GET(self):  # noqa: N802 - the standard library's name
            if self.path.rstrip("/") == "/v1/models":
                now = int(time.time())
                self._json(200, {"object": "list", "data": [
                    {"id": name, "object": "model", "created": now, "owned_by": "triton-builder"} for name in front.models]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):  # noqa: N802
            path = self.path.rstrip("/")
            if path not in ("/v1/completions", "/v1/chat/completions"):
                return self._error(404, f"no route {self.path}")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                model, params = front.request(path, body)
            except json.JSONDecodeError as exc:
                return self._error(400, f"the body is not JSON: {exc}")
            except LookupError as exc:
                return self._error(404, str(exc).strip("'\""), "not_found_error")
            except BadRequest as exc:
                return self._error(400, str(exc))
            chat = path.endswith("chat/completions")
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            created = int(time.time())
            text = params.pop("text_input")
            try:
                if body.get("stream"):
                    return self._stream(chat, rid, created, model, stream(front.http_url, model, text, **params))
                answer = generate(front.http_url, model, text, **params)
            except RunError as exc:
                return self._error(400, str(exc).split(": ", 2)[-1])
            usage = {"prompt_tokens": answer["num_input_tokens"], "completion_tokens": answer["num_output_tokens"],
                     "total_tokens": answer["num_input_tokens"] + answer["num_output_tokens"]}
            reason = answer["finish_reason"] or "stop"
            choice = ({"index": 0, "message": {"role": "assistant", "content": answer["text_output"]},
                       "finish_reason": reason, "logprobs": None} if chat else
                      {"index": 0, "text": answer["text_output"], "finish_reason": reason, "logprobs": None})
            self._json(200, {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                             "model": model, "choices": [choice], "usage": usage})

        def _stream(self, chat: bool, rid: str, created: int, model: str, events) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            kind = "chat.completion.chunk" if chat else "text_completion"

            def send(data) -> None:
                raw = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
                self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
                self.wfile.flush()

            first = True
            try:
                for event in events:
                    reason = event.get("finish_reason") or None
                    piece = event.get("text_output", "")
                    if chat:
                        delta = {"content": piece}
                        if first:
                            delta["role"] = "assistant"
                        choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
                    else:
                        choice = {"index": 0, "text": piece, "finish_reason": reason, "logprobs": None}
                    send({"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]})
                    first = False
            except RunError as exc:
                send({"error": {"message": str(exc), "type": "server_error"}})
            send("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    return Handler


def start_front(repo: Path, http_url: str, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve the front in a daemon thread; `.shutdown()` stops it. Port 0 picks a free one (`.server_port`)."""
    server = ThreadingHTTPServer((host, port), make_handler(Front(repo, http_url)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="openai-front", daemon=True).start()
    return server
