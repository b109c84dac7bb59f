"""response_format and tools: the grammar the engine decodes under, and tool calls read back from the text.

- response_format json_object / json_schema: the engine's guide (a token mask per step, builder/generation/guide.py).
- tools with tool_choice "required" or a named function: the output is forced to a call as JSON,
  {"name": ..., "arguments": {...}} (the tools' own parameter schemas), whatever the model's own format.
- tools with tool_choice "auto" (the default): the tools go to the model's chat template and the text is read
  in the model's own format: Hermes / Qwen `<tool_call>{...}</tool_call>`, Llama 3 JSON (`{"name": ...,
  "parameters": ...}`, optionally after `<|python_tag|>`), Mistral `[TOOL_CALLS][{...}]`; text that is not a
  call stays content. "none": the tools are left out of the prompt.
Streamed, a forced call goes out as it is decoded (its name, then its arguments in pieces); with "auto", text
that may start a call is held back until it is known, and calls go out as tool_calls deltas at the end.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from builder.openai.errors import APIError
from builder.openai.schema import ChatRequest, FunctionCall, ToolCall

FORCED = re.compile(r'\{"name": "([^"\\]+)", "arguments": ')  # the start of a forced call (compact JSON)
HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
STARTS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "{")


def _call(name: str, arguments) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall(id="call_" + uuid.uuid4().hex[:24], function=FunctionCall(name=name, arguments=text))


def _objects(text: str) -> list[dict]:
    """The JSON object, or list of objects, at the start of text (after a marker); [] if it is not JSON."""
    text = text.strip()
    for marker in ("[TOOL_CALLS]", "<|python_tag|>"):
        text = text.removeprefix(marker).strip()
    try:
        value, _ = json.JSONDecoder(strict=False).raw_decode(text)
    except json.JSONDecodeError:
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, dict)]


def parse_calls(text: str, names: set[str]) -> list[ToolCall]:
    """Tool calls in the model's own format (see the module's docstring); [] when the text is not a call."""
    found = [o for m in HERMES.finditer(text) for o in _objects(m.group(1))] if "<tool_call>" in text else _objects(text)
    calls = []
    for obj in found:
        name = obj.get("name")
        args = obj.get("arguments", obj.get("parameters", {}))
        if name in names and isinstance(args, (dict, str)):
            calls.append(_call(name, args))
    return calls


@dataclass
class Plan:
    guide: dict | None = None  # for the engine: {"json_schema": ...} or {"json_object": true}
    template_tools: list[dict] | None = None  # for the chat template
    names: set[str] = field(default_factory=set)  # the functions a call may name
    parses: bool = False  # read tool calls back from the text
    forced: bool = False  # the output is a call as JSON (required / named)

    def parse(self, text: str) -> list[ToolCall]:
        if self.forced:
            head = FORCED.match(text)
            if head and text.endswith("}"):  # the arguments as the model wrote them (what a stream sent)
                return [_call(head.group(1), text[head.end():-1])]
        return parse_calls(text, self.names)

    def stream(self) -> "CallStream":
        return CallStream(self)


class CallStream:
    """Streamed chat deltas: content as it comes, unless it may be a call; calls as tool_calls deltas at the end."""

    def __init__(self, plan: Plan):
        self.plan, self.held, self.holding, self.called = plan, "", plan.forced, False
        self.decided = plan.forced

    def feed(self, text: str, final: bool) -> dict:
        if self.plan.forced:
            return self._forced(text, final)
        if not self.plan.parses:
            return {"content": text} if text else {}
        if self.decided and not self.holding:
            return {"content": text} if text else {}
        self.held += text
        if not self.decided:  # at the start: is it a call? held while the text may still begin a marker
            head = self.held.lstrip()
            if head.startswith(STARTS):
                self.decided = self.holding = True
            elif not head or any(m.startswith(head) for m in STARTS):
                if not final:
                    return {}
            else:
                self.decided = True
        if not self.holding or not final:
            if not self.holding:
                out, self.held = self.held, ""
                return {"content": out} if out else {}
            return {}
        calls = self.plan.parse(self.held)
        if not calls:
            return {"content": self.held}
        self.called = True
        return {"tool_calls": [dict(c.model_dump(), index=i) for i, c in enumerate(calls)]}

    def _forced(self, text: str, final: bool) -> dict:
        """A forced call streams as it is decoded: once `{"name": "f", "arguments": ` is out, a delta with the
        call's id and name, then the arguments' text as it comes (the last character held back: it may be the
        closing brace of the wrapper, which is not part of the arguments)."""
        self.held += text
        deltas = []
        if not self.called:
            head = FORCED.match(self.held)
            if head is None:
                return {"content": self.held} if final and self.held else {}
            self.called, self.sent = True, head.end()
            call = _call(head.group(1), "")
            deltas.append({"index": 0, "id": call.id, "type": "function",
                           "function": {"name": call.function.name, "arguments": ""}})
        end = len(self.held) - 1 if not final or self.held.endswith("}") else len(self.held)
        if end > self.sent:
            deltas.append({"index": 0, "function": {"arguments": self.held[self.sent:end]}})
            self.sent = end
        return {"tool_calls": deltas} if deltas else {}


def _function_schema(tool) -> dict:
    return {"type": "object", "properties": {"name": {"const": tool.function.name},
                                             "arguments": tool.function.parameters or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def plan(body: ChatRequest) -> Plan:
    """What response_format and tools ask of the engine and of the answer; a 400 for what cannot be done."""
    fmt, tools, choice = body.response_format, body.tools or [], body.tool_choice
    if choice not in (None, "none") and not tools:
        raise APIError(400, "tool_choice: give tools to choose from", param="tool_choice")
    if tools and fmt is not None and fmt.type != "text" and choice not in (None, "none"):
        raise APIError(400, "response_format: give either a JSON response_format or tools, not both",
                       param="response_format")
    out = Plan()
    if fmt is not None and fmt.type == "json_object":
        out.guide = {"json_object": True}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format.json_schema.schema: give the JSON schema",
                           param="response_format.json_schema")
        out.guide = {"json_schema": fmt.json_schema.schema_}
    if not tools or choice == "none":
        return out
    out.names = {t.function.name for t in tools}
    if choice == "required" or not isinstance(choice, (str, type(None))):
        chosen = tools
        if not isinstance(choice, str):
            chosen = [t for t in tools if t.function.name == choice.function.name]
            if not chosen:
                raise APIError(400, f"tool_choice: no tool named {choice.function.name!r} in tools",
                               param="tool_choice")
        schemas = [_function_schema(t) for t in chosen]
        out.guide = {"json_schema": schemas[0] if len(schemas) == 1 else {"anyOf": schemas}}
        out.forced = out.parses = True
        out.template_tools = [t.model_dump(exclude_none=True) for t in chosen]  # the model sees what it calls
        return out
    out.template_tools = [t.model_dump(exclude_none=True) for t in tools]
    out.parses = True
    return out
