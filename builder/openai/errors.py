"""One error shape for every failure: {"error": {"message", "type", "param", "code"}} (OpenAI's)."""

from __future__ import annotations

import re

TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
         422: "invalid_request_error", 500: "server_error", 503: "server_error"}
ADDRESS = re.compile(r"\b(?:https?://)?(?:\d{1,3}(?:\.\d{1,3}){3}|localhost|\[[0-9a-f:]+\])(?::\d+)?(?:/\S*)?", re.I)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": without_addresses(message), "type": kind, "param": param, "code": code}}


def without_addresses(text: str) -> str:
    """No internal server address reaches a client (Triton's URL, a socket)."""
    return ADDRESS.sub("<server>", text)
