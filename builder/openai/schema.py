"""The OpenAI request and response bodies this front takes and gives, as pydantic models.

Requests forbid fields the front does not know (a 400 names the field: nothing is silently ignored); fields
it knows but cannot honour with the given value are refused by `unsupported` with a 400 naming them too.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class Sampling(Strict):
    """Fields common to completions and chat."""

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**64)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # extensions that vLLM and TGI clients send (AIPerf, guidellm)
    top_k: Optional[int] = Field(None, ge=0)
    ignore_eos: Optional[bool] = None
    min_tokens: Optional[int] = Field(None, ge=0)
    repetition_penalty: Optional[float] = Field(None, gt=0)


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Union[TextPart, dict[str, Any]]], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None
    refusal: Optional[str] = None


class FunctionSpec(Strict):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(Strict):
    name: str


class ToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchema(Strict):
    name: str = "response"
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchema] = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], ToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None


class TokenizeRequest(Strict):
    model: str
    prompt: Optional[str] = None
    messages: Optional[list[Message]] = None
    add_special_tokens: bool = True


class DetokenizeRequest(Strict):
    model: str
    tokens: list[int]


class EmbeddingRequest(Strict):
    model: str
    input: Union[str, list[str]] = Field(description="text only: token ids are refused (the ensemble tokenizes)")
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[str] = None
    dimensions: Optional[int] = None


# -- responses --
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "triton-builder"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[str]
    logprobs: Optional[dict[str, Any]] = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Optional[str]
    logprobs: Optional[dict[str, Any]] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def unsupported(body: Sampling) -> list[tuple[str, str]]:
    """(field, why) for each given value this server cannot honour."""
    out = []
    if body.logit_bias:
        out.append(("logit_bias", "not implemented by this engine"))
    if body.stream_options is not None and not body.stream:
        out.append(("stream_options", "only with stream: true"))
    if isinstance(body, CompletionRequest):
        if body.suffix:
            out.append(("suffix", "insertion (suffix) is not supported by this model"))
        if body.best_of not in (None, 1):
            out.append(("best_of", "not implemented; ask for n completions instead"))
        if body.echo and body.logprobs is not None:
            out.append(("echo", "echo with logprobs needs the prompt's log-probabilities, which the engine does not give"))
    return out
