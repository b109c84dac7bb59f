"""Requests into prompts: the model's tokenizer and chat template, loaded once per model from the repository."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from builder.openai.errors import APIError
from builder.openai.schema import ChatRequest, Message


class Tokenizers:
    def __init__(self, repo: Path, entries: dict | None = None):
        self.repo = Path(repo)
        self.entries = entries or {}
        self._loaded: dict[str, object] = {}
        self._lock = threading.Lock()

    def get(self, model: str):
        with self._lock:
            if model not in self._loaded:
                from transformers import AutoTokenizer

                self._loaded[model] = AutoTokenizer.from_pretrained(self.source(model))
            return self._loaded[model]

    def source(self, model: str) -> str:
        """Where the model's tokenizer is: beside our endpoint's weights (1/), a rendered target's saved Hugging
        Face folder (hf/ or 1/hf/), or the folder or hub id its engine arguments name."""
        for folder in (self.repo / model / "1", self.repo / model / "hf", self.repo / model / "1" / "hf"):
            if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
                return str(folder)
        settings = self.entries.get(model, {}).get("settings", {})
        args = settings.get("engine_args") or settings.get("llm_args") or {}
        named = args.get("tokenizer") or args.get("model")
        if named and named.startswith("/models/"):  # the repository's path in the serving container
            return str(self.repo / named.removeprefix("/models/"))
        return named or str(self.repo / model / "1")


def _content(message: Message, i: int) -> str | None:
    """A message's text: a string, or its text parts joined (other kinds of part are refused)."""
    if message.content is None or isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        kind = getattr(part, "type", None) or (part.get("type") if isinstance(part, dict) else None)
        if kind != "text":
            raise APIError(400, f"messages[{i}].content[{j}]: content parts of type {kind!r} are not supported by "
                           "this text model; give text parts", param=f"messages.{i}.content.{j}")
        texts.append(part.text if hasattr(part, "text") else str(part.get("text", "")))
    return "".join(texts)


def template_messages(messages: list[Message]) -> list[dict]:
    """Messages as chat templates expect them: text content, tool calls with their arguments as objects."""
    out = []
    for i, m in enumerate(messages):
        entry: dict = {"role": "system" if m.role == "developer" else m.role, "content": _content(m, i) or ""}
        if m.name:
            entry["name"] = m.name
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                try:
                    arguments = json.loads(call.function.arguments or "{}")
                except json.JSONDecodeError:
                    arguments = call.function.arguments
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            entry["tool_calls"] = calls
        if m.tool_call_id:
            entry["tool_call_id"] = m.tool_call_id
        out.append(entry)
    return out


TOOLS_NOTE = ("You can call these functions:\n{tools}\nTo call one, answer with only a JSON object "
              '{{"name": <function name>, "arguments": <an object of its parameters>}}.')


def _tools_in_system_message(messages: list[dict], tools: list[dict]) -> list[dict]:
    note = TOOLS_NOTE.format(tools="\n".join(json.dumps(t["function"]) for t in tools))
    if messages and messages[0]["role"] == "system":
        return [dict(messages[0], content=f"{messages[0]['content']}\n\n{note}")] + messages[1:]
    return [{"role": "system", "content": note}] + messages


def chat_prompt(tokenizer, body: ChatRequest, tools: list[dict] | None) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"model {body.model!r} has no chat template; use /v1/completions with a prompt",
                       param="messages")
    messages = template_messages(body.messages)
    if tools and "tools" not in str(tokenizer.chat_template):  # a template that cannot show tools: say it in words
        messages = _tools_in_system_message(messages, tools)
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - the template rejected what the client sent
        raise APIError(400, f"messages: the model's chat template failed: {exc}", param="messages") from None


def completion_prompts(tokenizer, prompt) -> list[tuple[str, list[int] | None]]:
    """(text, token ids or None) per prompt of a completions request: a string, strings, ids, lists of ids."""
    if isinstance(prompt, str):
        return [(prompt, None)]
    if not prompt:
        raise APIError(400, "prompt: give a string, a list of strings, or token ids", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [(tokenizer.decode(prompt), list(prompt))]
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.append((p, None))
        elif isinstance(p, list) and p and all(isinstance(t, int) for t in p):
            out.append((tokenizer.decode(p), list(p)))
        else:
            raise APIError(400, f"prompt[{i}]: give a string or a non-empty list of token ids", param="prompt")
    return out
