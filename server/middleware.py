"""`SteeringMiddleware`: the steering layer over vLLM's OpenAI server, as pure ASGI middleware.

vLLM adds it with `--middleware server.middleware.SteeringMiddleware`. Per request it:

- every request: a second Content-Type, Authorization, Content-Length or Transfer-Encoding
  header is refused (400); with vLLM's `--api-key`, a client without a valid key gets 401
  here, so nothing unauthorised is forwarded;
- POST /v1/chat/completions, /v1/completions: only `application/json` (else 415); reads
  `steering_profile` / `steering` / `capture_routing` (top level or in `vllm_xargs`), applies
  the operator's policy, checks the steering against the served model, rewrites the body so
  vLLM carries the steering in `vllm_xargs` with this server's mark (the engine front end
  refuses unmarked steering), turns a locked endpoint's name into the base model's (vLLM does
  not serve locked names, so a request that slips past gets 404, never an unsteered answer),
  and marks the response (`x-steermoe-steering` header, `steering` field, `routing` when
  captured, `model` = the requested locked name); counts it in the metrics and writes the
  audit line;
- other POST paths: a body is checked as JSON (415/400 otherwise, multipart audio uploads
  excepted), locked endpoint names and steering fields are refused (they do not steer);
- /v1/steering/...: answers itself (`profiles_api`);
- GET /v1/models: adds the locked endpoints; GET /metrics: refreshes the profile gauges.
Anything else passes through untouched.
"""

from __future__ import annotations

import logging
import re
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
    duplicated_header,
    header_map,
    media_type,
    read_body,
    replay,
    route_path,
    send_json,
    with_body_headers,
)
from server.context import SteeringContext
from server.errors import SteeringHTTPError, clip, error_payload
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
from server.response_editor import MAX_ERROR_MESSAGE, ResponseEditor
from server.routing_field import routing_field
from vllm_patches.request_steering import CAPTURE_KEY, ResolvedSteering, server_key

logger = logging.getLogger("steermoe.server")

STEERING_HEADER = "x-steermoe-steering"
JSON_TYPE = "application/json"
# A client's X-Request-Id is kept (as a prefix) only in this form.
REQUEST_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def steering_header(decision: SteeringDecision | None, resolved: ResolvedSteering | None,
                    served_names: tuple[str, ...] = ()) -> str:
    """`profile=NAME; endpoint=E; digest=D`, `inline; endpoint=E; digest=D`, or `none`.

    The endpoint appears only if it is a served name (never the client's text as sent)."""
    if decision is None or not decision.steered:
        return "none"
    parts = [f"profile={decision.profile}" if decision.profile is not None else "inline"]
    if decision.endpoint and decision.endpoint in served_names:
        parts.append(f"endpoint={clip(decision.endpoint)}")
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
        raw_headers = scope.get("headers", [])
        duplicate = duplicated_header(raw_headers)
        if duplicate is not None:
            await self._send_error(send, SteeringHTTPError(
                400, f"the request has more than one {duplicate} header"))
            return
        headers = header_map(raw_headers)
        if path == PREFIX or path.startswith(f"{PREFIX}/"):
            await self._steering_api(scope, receive, send, path, method, headers)
        elif method != "OPTIONS" and not self._client_authorized(scope, path, headers):
            await self._send_error(send, SteeringHTTPError(
                401, "Unauthorized", headers={"www-authenticate": "Bearer"}))
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
                self._count_admin(method, path, exc.status)
            await self._send_error(send, exc)
            return
        if method != "GET":
            self._count_admin(method, path, response.status)
            logger.info("steermoe: admin %s %s -> %d", clip(method), clip(path), response.status)
        await send_json(send, response.status, response.payload, response.headers)

    def _count_admin(self, method: str, path: str, status: int) -> None:
        """Count an admin call under labels from fixed sets (no client-chosen label value)."""
        self.context.metrics.observe_admin_operation(self.api.operation_of(method, path), status)

    # ---- completions ------------------------------------------------------------------------

    async def _completion(self, scope: Scope, receive: Receive, send: Send, path: str,
                          headers: dict[str, str]) -> None:
        trace = CompletionTrace(path=path, started=time.monotonic())
        kind = compat.COMPLETION_PATHS[path]
        config = self.context.config
        try:
            if media_type(headers) != JSON_TYPE:
                raise SteeringHTTPError(415, f"Unsupported Media Type: only {JSON_TYPE!r} is "
                                        "accepted")
            raw = await read_body(receive, config.max_request_bytes,
                                  headers.get("content-length"))
            body = parse_json_object(raw)
            model = body.get("model")
            trace.endpoint = (model if isinstance(model, str) else None) or config.default_name
            trace.requested, rest = take_steering(body)
            trace.locked = trace.endpoint in config.endpoints
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
        if trace.locked:
            rest["model"] = config.default_name
        forwarded = with_steering(rest, decision.profile, decision.inline, decision.capture,
                                  server_key(), trace.resolved)
        extra_headers: dict[bytes, bytes] = {}
        capture_id = None
        if decision.capture:
            unique = self._unique_request_id(headers.get(compat.REQUEST_ID_HEADER.decode()))
            extra_headers[compat.REQUEST_ID_HEADER] = unique.encode("ascii")
            capture_id = compat.capture_request_id(kind, compat.response_id(kind, unique))
        payload = dump_json(forwarded)
        inner_scope = with_body_headers(scope, len(payload), extra_headers)
        resolved = trace.resolved
        shown = trace.endpoint if trace.locked else None
        taken = False

        async def edit(data: Any) -> Any:
            nonlocal taken
            if not isinstance(data, dict):
                return data
            if shown is not None and data.get("model") == config.default_name:
                data["model"] = shown
            data["steering"] = steering_field(decision, resolved)
            if capture_id is not None:
                taken = True
                data["routing"] = await routing_field(compat.engine_client(scope), capture_id)
            return data

        header = steering_header(decision, resolved, config.served_names)
        rename = (config.default_name, shown) if shown is not None else None
        editor = ResponseEditor(send, (STEERING_HEADER, header), edit, rename)
        status = 500
        try:
            await self.app(inner_scope, replay(payload, receive), editor)
            status = editor.status or 500
        finally:
            record_completion(self.context, trace, status, editor)
            if capture_id is not None and not taken:
                await compat.discard_routing(scope, capture_id)

    @staticmethod
    def _unique_request_id(given: str | None) -> str:
        """A request id no other request has: the client's (sanitised, short) plus a random
        part. A captured request's routing is looked up by it."""
        prefix = REQUEST_ID_CHARS.sub("", given or "")[:48]
        random_part = uuid.uuid4().hex
        return f"{prefix}-{random_part}" if prefix else random_part

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
        send = ResponseEditor(send, None, None)  # bounds vLLM's own error messages
        if path in compat.MULTIPART_PATHS and media_type(headers).startswith("multipart/"):
            # Audio uploads: vLLM reads the form itself. Locked names are not served there
            # (404) and unmarked steering is refused by the engine front end.
            await self.app(scope, receive, send)
            return
        try:
            raw = await read_body(receive, self.context.config.max_request_bytes,
                                  headers.get("content-length"))
            if not raw:
                await self.app(scope, replay(raw, receive), send)
                return
            if media_type(headers) != JSON_TYPE:
                raise SteeringHTTPError(415, f"Unsupported Media Type: only {JSON_TYPE!r} is "
                                        "accepted")
            body = parse_json_object(raw)
            body = self._checked_other_body(path, body)
        except ClientDisconnected:
            return
        except BodyTooLarge:
            await self._send_error(send, self._too_large())
            return
        except SteeringHTTPError as exc:
            await self._send_error(send, exc)
            return
        if body is None:
            await self.app(scope, replay(raw, receive), send)
            return
        payload = dump_json(body)
        await self.app(with_body_headers(scope, len(payload)), replay(payload, receive), send)

    def _checked_other_body(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Raises for locked names and steering fields; returns a rewritten body (a locked name
        on a tokenizer path becomes the base model's) or None to forward the bytes as sent."""
        completions = " and ".join(compat.COMPLETION_PATHS)
        config = self.context.config
        model = body.get("model")
        locked = isinstance(model, str) and model in config.endpoints
        if locked and path not in compat.TOKENIZATION_PATHS:
            raise SteeringHTTPError(
                403, f"endpoint '{clip(model)}' serves only {completions}", param="model"
            )
        key = contains_steering(body)
        if key is not None:
            raise SteeringHTTPError(
                400, f"'{clip(key)}': steering is available on {completions} only", param=key
            )
        if locked:
            return {**body, "model": config.default_name}
        return None

    # ---- GET helpers ------------------------------------------------------------------------

    async def _mark_models(self, data: Any) -> Any:
        """/v1/models: each entry says whether it is a locked endpoint and of which profile;
        the locked endpoints (not served by vLLM under their own names) are added."""
        endpoints = self.context.config.endpoints
        cards = data.get("data") if isinstance(data, dict) else None
        if not isinstance(cards, list):
            return data
        base = next((card for card in cards if isinstance(card, dict)
                     and card.get("id") == self.context.config.default_name), None)
        for card in cards:
            if isinstance(card, dict):
                card["steering"] = {"locked": False, "profile": None}
        if base is not None:
            for alias, profile in endpoints.items():
                cards.append({**base, "id": alias, "root": base.get("root"),
                              "steering": {"locked": True, "profile": profile}})
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
        message = error.message
        if len(message) > MAX_ERROR_MESSAGE:
            message = message[:MAX_ERROR_MESSAGE] + "..."
        param = clip(error.param) if error.param is not None else None
        await send_json(send, error.status, error_payload(error.status, message, param), headers)
