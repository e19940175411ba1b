"""Errors in the shape vLLM's OpenAI server gives its own: {"error": {message, type, param, code}}.

`code` is the HTTP status as an integer and `type` the OpenAI SDK's name for it, as in vLLM's
`ErrorResponse` (the same in vLLM 0.26 and 0.32). On the Anthropic Messages API
(`/v1/messages...`) vLLM answers `{"type": "error", "error": {"type", "message"}}` with the same
type names (`entrypoints/anthropic/api_router.py`, `translate_error_response`); so does the
steering layer there.
"""

from __future__ import annotations

import json
from typing import Any

from expert_profiles.echo import MAX_ECHO, clip  # noqa: F401  (re-exported)

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class SteeringHTTPError(Exception):
    """A request the steering layer answers itself, with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        return error_payload(self.status, self.message, self.param)


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "InternalServerError" if status >= 500 else "BadRequestError"


def error_payload(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param,
                      "code": status}}


def anthropic_error_payload(status: int, message: str) -> dict[str, Any]:
    """An error in the shape of vLLM's Anthropic Messages API."""
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    return json.dumps(error_payload(status, message, param)).encode()

