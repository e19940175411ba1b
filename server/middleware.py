"""`SteeringMiddleware`: the steering layer over vLLM's OpenAI server, as pure ASGI middleware.

vLLM adds it with `--middleware server.middleware.SteeringMiddleware`. Per request it:

- POST /v1/chat/completions, /v1/completions: reads `steering_profile` / `steering` /
  `capture_routing` (top level or in `vllm_xargs`), applies the operator's policy, checks the
  steering against the served model, rewrites the body so vLLM carries the steering in
  `vllm_xargs`, and marks the response (`x-steermoe-steering` header, `steering` field,
  `routing` when captured); counts it in the metrics and writes the audit line;
- other POST paths: refuses locked endpoint names and steering fields (they do not steer);
- /v1/steering/...: answers itself (`profiles_api`);
- GET /v1/models: marks locked endpoints; GET /metrics: refreshes the profile gauges.
Anything else passes through untouched.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from server import vllm_server_compat as compat
from server.asgi_io import (
    BodyTooLarge,
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    dump_json,
    header_map,
    media_type,
    read_body,
    replay,
    route_path,
    send_json,
    with_body_headers,
)
from server.context import SteeringContext
from server.errors import SteeringHTTPError, error_payload
from server.policy import SteeringDecision
from server.profiles_api import PREFIX, ProfilesAPI
from server.request_body import (
    capture_problem,
    contains_steering,
    parse_json_object,
    take_steering,
    with_steering,
)
from server.request_record import CompletionTrace, record_completion
from server.response_editor import ResponseEditor
from server.routing_field import routing_field
from vllm_patches.request_steering import CAPTURE_KEY, ResolvedSteering

logger = logging.getLogger("steermoe.server")

STEERING_HEADER = "x-steermoe-steering"


def steering_header(decision: SteeringDecision | None,
                    resolved: ResolvedSteering | None) -> str:
    """`profile=NAME; endpoint=E; digest=D`, `inline; endpoint=E; digest=D`, or `none`."""
    if decision is None or not decision.steered:
        return "none"
    parts = [f"profile={decision.profile}" if decision.profile is not None else "inline"]
    if decision.endpoint:
        parts.append(f"endpoint={decision.endpoint}")
    if resolved is not None:
        parts.append(f"digest={resolved.digest}")
    return "; ".join(parts)


def steering_field(decision: SteeringDecision | None,
                   resolved: ResolvedSteering | None) -> dict[str, Any] | None:
    if decision is None or not decision.steered:
        return None
    return {
        "profile": decision.profile,
        "inline": decision.inline is not None,
        "endpoint": decision.endpoint,
        "locked": decision.locked,
        "digest": resolved.digest if resolved is not None else None,
    }


class SteeringMiddleware:
    """Pure ASGI middleware; `context` defaults to the config `steermoe serve` passed."""

    def __init__(self, app: Any, context: SteeringContext | None = None):
        self.app = app
        self.context = context or SteeringContext.from_env()
        self.api = ProfilesAPI(self.context)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = route_path(scope), scope.get("method", "GET")
        headers = header_map(scope.get("headers", []))
        if path == PREFIX or path.startswith(f"{PREFIX}/"):
            await self._steering_api(scope, receive, send, path, method, headers)
        elif not self._client_authorized(scope, path, headers):
            await self.app(scope, receive, send)  # vLLM answers 401
        elif method == "POST" and path in compat.COMPLETION_PATHS:
            await self._completion(scope, receive, send, path, headers)
        elif method == "POST":
            await self._other_post(scope, receive, send, path, headers)
        elif method == "GET" and path == compat.MODELS_PATH:
            await self.app(scope, receive, ResponseEditor(send, None, self._mark_models))
        else:
            if method == "GET" and path == compat.METRICS_PATH:
                self._refresh_gauges()
            await self.app(scope, receive, send)

    # ---- access -----------------------------------------------------------------------------

    def _client_authorized(self, scope: Scope, path: str, headers: dict[str, str]) -> bool:
        keys = compat.api_keys(scope)
        if not keys or not path.startswith(compat.GUARDED_PREFIXES):
            return True
        try:
            self.api.require_client(headers, keys)
        except SteeringHTTPError:
            return False
        return True

    # ---- our own paths ----------------------------------------------------------------------

    async def _steering_api(self, scope: Scope, receive: Receive, send: Send, path: str,
                            method: str, headers: dict[str, str]) -> None:
        try:
            body = b""
            if method in ("PUT", "POST"):
                body = await read_body(receive, self.context.config.max_request_bytes,
                                       headers.get("content-length"))
            response = self.api.handle(method, path, headers, body, compat.api_keys(scope))
        except BodyTooLarge:
            await self._send_error(send, self._too_large())
            return
        except ClientDisconnected:
            return
        except SteeringHTTPError as exc:
            if method != "GET":
                self.context.metrics.admin_operations.labels(method, str(exc.status)).inc()
            await self._send_error(send, exc)
            return
        if method != "GET":
            self.context.metrics.admin_operations.labels(method, str(response.status)).inc()
            logger.info("steermoe: admin %s %s -> %d", method, path, response.status)
        await send_json(send, response.status, response.payload, response.headers)

    # ---- completions ------------------------------------------------------------------------

    async def _completion(self, scope: Scope, receive: Receive, send: Send, path: str,
                          headers: dict[str, str]) -> None:
        if media_type(headers) != "application/json":
            await self.app(scope, receive, send)  # vLLM answers 415
            return
        trace = CompletionTrace(path=path, started=time.monotonic())
        kind = compat.COMPLETION_PATHS[path]
        try:
            raw = await read_body(receive, self.context.config.max_request_bytes,
                                  headers.get("content-length"))
            body = parse_json_object(raw)
            model = body.get("model")
            trace.endpoint = (model if isinstance(model, str) else None) \
                or self.context.config.default_name
            trace.requested, rest = take_steering(body)
            trace.locked = trace.endpoint in self.context.config.endpoints
            decision = self.context.policy.decide(trace.endpoint, trace.requested)
            trace.decision = decision
            if decision.steered:
                self._check_steerable(rest)
            if decision.capture and (problem := capture_problem(kind, rest)):
                raise SteeringHTTPError(400, problem, param=CAPTURE_KEY)
            trace.resolved = self.context.resolve(decision)
        except ClientDisconnected:
            return
        except (BodyTooLarge, SteeringHTTPError) as exc:
            error = exc if isinstance(exc, SteeringHTTPError) else self._too_large()
            await self._send_error(send, error, completion=True)
            trace.error = error.message
            record_completion(self.context, trace, error.status, None)
            return
        trace.stream = bool(rest.get("stream"))
        forwarded = with_steering(rest, decision.profile, decision.inline, decision.capture)
        extra_headers: dict[bytes, bytes] = {}
        if decision.capture:
            # A capture is looked up by request id: make it unique whatever the client sent.
            given = headers.get(compat.REQUEST_ID_HEADER.decode())
            unique = f"{given}-{uuid.uuid4().hex[:12]}" if given else uuid.uuid4().hex
            extra_headers[compat.REQUEST_ID_HEADER] = unique.encode("latin-1", "replace")
        payload = dump_json(forwarded)
        inner_scope = with_body_headers(scope, len(payload), extra_headers)
        resolved = trace.resolved

        async def edit(data: Any) -> Any:
            if not isinstance(data, dict):
                return data
            data["steering"] = steering_field(decision, resolved)
            if decision.capture and isinstance(data.get("id"), str):
                data["routing"] = await routing_field(
                    compat.engine_client(scope), compat.capture_request_id(kind, data["id"])
                )
            return data

        editor = ResponseEditor(send, (STEERING_HEADER, steering_header(decision, resolved)),
                                edit)
        status = 500
        try:
            await self.app(inner_scope, replay(payload, receive), editor)
            status = editor.status or 500
        finally:
            record_completion(self.context, trace, status, editor)

    @staticmethod
    def _check_steerable(body: dict[str, Any]) -> None:
        for name in compat.UNSTEERABLE_FIELDS:
            if body.get(name):
                raise SteeringHTTPError(
                    400, f"steering cannot be applied with {name!r}", param=name
                )

    # ---- other paths ------------------------------------------------------------------------

    async def _other_post(self, scope: Scope, receive: Receive, send: Send, path: str,
                          headers: dict[str, str]) -> None:
        if media_type(headers).startswith("multipart/"):
            await self.app(scope, receive, send)
            return
        try:
            raw = await read_body(receive, self.context.config.max_request_bytes,
                                  headers.get("content-length"))
        except ClientDisconnected:
            return
        except BodyTooLarge:
            await self._send_error(send, self._too_large())
            return
        try:
            body = parse_json_object(raw)
        except SteeringHTTPError:
            body = None
        if body is not None:
            problem = self._other_path_problem(path, body)
            if problem is not None:
                await self._send_error(send, problem)
                return
        await self.app(scope, replay(raw, receive), send)

    def _other_path_problem(self, path: str, body: dict[str, Any]) -> SteeringHTTPError | None:
        completions = " and ".join(compat.COMPLETION_PATHS)
        model = body.get("model")
        if isinstance(model, str) and model in self.context.config.endpoints \
                and path not in compat.TOKENIZATION_PATHS:
            return SteeringHTTPError(
                403, f"endpoint {model!r} serves only {completions}", param="model"
            )
        key = contains_steering(body)
        if key is not None:
            return SteeringHTTPError(
                400, f"{key!r}: steering is available on {completions} only", param=key
            )
        return None

    # ---- GET helpers ------------------------------------------------------------------------

    async def _mark_models(self, data: Any) -> Any:
        """/v1/models: each entry says whether it is a locked endpoint and of which profile."""
        endpoints = self.context.config.endpoints
        for card in data.get("data", []) if isinstance(data, dict) else []:
            if isinstance(card, dict) and isinstance(card.get("id"), str):
                profile = endpoints.get(card["id"])
                card["steering"] = {"locked": profile is not None, "profile": profile}
        return data

    def _refresh_gauges(self) -> None:
        try:
            self.context.scan_profiles()
        except Exception:  # metrics must not fail a scrape
            logger.exception("steermoe: scanning the profile directory failed")

    # ---- errors -----------------------------------------------------------------------------

    def _too_large(self) -> SteeringHTTPError:
        limit = self.context.config.max_request_bytes
        return SteeringHTTPError(413, f"the request body exceeds {limit} bytes")

    @staticmethod
    async def _send_error(send: Send, error: SteeringHTTPError, completion: bool = False) -> None:
        headers = {**error.headers, **({STEERING_HEADER: "none"} if completion else {})}
        await send_json(send, error.status, error_payload(error.status, error.message,
                                                          error.param), headers)
