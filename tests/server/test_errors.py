"""`server.errors`: the error shape of vLLM's OpenAI server."""

from __future__ import annotations

import json

from server.errors import SteeringHTTPError, error_body, error_payload, error_type


def test_error_payload_has_vllms_shape():
    assert error_payload(404, "unknown", "steering_profile") == {
        "error": {"message": "unknown", "type": "NotFoundError", "param": "steering_profile",
                  "code": 404}}


def test_error_types_follow_the_openai_sdk_names():
    assert [error_type(s) for s in (400, 401, 403, 404, 409, 413, 500)] == [
        "BadRequestError", "AuthenticationError", "PermissionDeniedError", "NotFoundError",
        "ConflictError", "RequestTooLargeError", "InternalServerError"]
    assert error_type(418) == "BadRequestError" and error_type(502) == "InternalServerError"


def test_http_error():
    error = SteeringHTTPError(403, "no", param="model", headers={"x": "y"})
    assert error.payload()["error"]["code"] == 403 and error.headers == {"x": "y"}
    assert json.loads(error_body(400, "bad"))["error"]["param"] is None
