"""`SteeringMiddleware`: the steering layer over vLLM's OpenAI server, as pure ASGI middleware.

vLLM adds it with `--middleware server.middleware.SteeringMiddleware`. Per request it:

- every request: a second Content-Type, Authorization, Content-Length or Transfer-Encoding
  header is refused (400); with vLLM's `--api-key`, a client without a valid key gets 401
  here, so nothing unauthorised is forwarded;
- POST to a steerable API (`vllm_server_compat.STEERABLE_PATHS`: /v1/chat/completions,
  /v1/completions, /v1/responses, /v1/messages, /v1/chat/completions/batch, /invocations):
  only `application/json` (else 415); one path for all (`steering_plan.plan_request`): reads
  `steering_profile` / `steering` / `capture_routing` (top level or in `vllm_xargs`), applies
  the operator's policy, checks the steering against the served model, rewrites the body so
  vLLM carries the steering in `vllm_xargs` with this server's mark (the engine front end
  refuses unmarked steering), turns a locked endpoint's name into the base model's (vLLM does
  not serve locked names, so a request that slips past gets 404, never an unsteered answer),
  and marks the response (`x-steermoe-steering` header, `steering` field, `routing` when
  captured, `model` = the requested locked name, streamed events too); counts it in the
  metrics and writes the audit line. Errors have the API's own shape (Anthropic's on
  /v1/messages). Responses continuing a stored response (`previous_response_id`) keep its
  steering and cannot leave its locked endpoint (`responses_state`);
- GET /v1/responses/{id}, POST /v1/responses/{id}/cancel: the stored response's steering
  (header and field) and its locked name in `model`;
- other POST paths: a body is checked as JSON (415/400 otherwise, multipart audio uploads
  excepted), locked endpoint names (except on tokenizer paths, where they become the base
  model's) and steering fields are refused (they do not steer; /inference/v1/generate, which
  takes raw sampling parameters, included);
- /v1/steering/...: answers itself (`profiles_api`);
- GET /v1/models: adds the locked endpoints; GET /metrics: refreshes the profile gauges.
Anything else passes through untouched.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from expert_profiles.echo import clip
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
from server.config import locked_card
from server.context import SteeringContext
from server.errors import SteeringHTTPError, anthropic_error_payload, error_payload
from server.guard_field import guard_decision
from server.profiles_api import PREFIX, ProfilesAPI
from server.request_body import parse_json_object
from server.request_record import CompletionTrace, record_completion
from server.response_editor import MAX_ERROR_MESSAGE, ResponseEditor
from server.responses_state import check_new_id, previous_response
from server.routing_field import routing_field
from server.steering_plan import (
    check_other_body,
    plan_request,
    steering_field,
    steering_header,
    stored_steering,
)

logger = logging.getLogger("steermoe.server")

STEERING_HEADER = "x-steermoe-steering"
JSON_TYPE = "application/json"


def require_json(headers: dict[str, str]) -> None:
    """415 unless the body is declared `application/json` (vLLM's own rule on JSON routes)."""
    if media_type(headers) != JSON_TYPE:
        raise SteeringHTTPError(415, f"Unsupported Media Type: only {JSON_TYPE!r} is accepted")
RESPONSES_PREFIX = f"{compat.RESPONSES_PATH}/"
CANCEL_SUFFIX = "/cancel"


def stored_response_id(method: str, path: str) -> str | None:
    """The id in `GET /v1/responses/{id}` or `POST /v1/responses/{id}/cancel`, else None."""
    if not path.startswith(RESPONSES_PREFIX):
        return None
    rest = path[len(RESPONSES_PREFIX):]
    if method == "POST" and rest.endswith(CANCEL_SUFFIX):
        rest = rest[:-len(CANCEL_SUFFIX)]
    elif method != "GET":
        return None
    return rest if rest and "/" not in rest else None


class SteeringMiddleware:
    """Pure ASGI middleware; `context` defaults to the config `steermoe serve` passed."""

    def __init__(self, app: Any, context: SteeringContext | None = None):
        self.app = app
        self.context = context or SteeringContext.from_env()
        self.api = ProfilesAPI(self.context)
        # The APIs whose requests carry `vllm_xargs` to the engine in this vLLM.
        self.steerable = compat.steerable_paths()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = route_path(scope), scope.get("method", "GET")
        raw_headers = scope.get("headers", [])
        duplicate = duplicated_header(raw_headers)
        if duplicate is not None:
            await self._send_error(send, SteeringHTTPError(
                400, f"the request has more than one {duplicate} header"), path)
            return
        headers = header_map(raw_headers)
        if path == PREFIX or path.startswith(f"{PREFIX}/"):
            await self._steering_api(scope, receive, send, path, method, headers)
        elif method != "OPTIONS" and not self._client_authorized(scope, path, headers):
            await self._send_error(send, SteeringHTTPError(
                401, "Unauthorized", headers={"www-authenticate": "Bearer"}), path)
        elif method == "POST" and path in self.steerable:
            await self._steered(scope, receive, send, path, headers)
        elif method == "POST":
            await self._other_post(scope, receive, send, path, headers)
        elif method == "GET" and path == compat.MODELS_PATH:
            await self.app(scope, receive, ResponseEditor(send, None, self._mark_models))
        elif method == "GET" and (response_id := stored_response_id(method, path)) is not None:
            await self.app(scope, receive, self._stored_response_editor(send, response_id))
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
            await self._send_error(send, self._too_large(), path)
            return
        except ClientDisconnected:
            return
        except SteeringHTTPError as exc:
            if method != "GET":
                self._count_admin(method, path, exc.status)
            await self._send_error(send, exc, path)
            return
        if method != "GET":
            self._count_admin(method, path, response.status)
            logger.info("steermoe: admin %s %s -> %d", clip(method), clip(path), response.status)
        await send_json(send, response.status, response.payload, response.headers)

    def _count_admin(self, method: str, path: str, status: int) -> None:
        """Count an admin call under labels from fixed sets (no client-chosen label value)."""
        self.context.metrics.observe_admin_operation(self.api.operation_of(method, path), status)

    # ---- steerable APIs ---------------------------------------------------------------------

    async def _steered(self, scope: Scope, receive: Receive, send: Send, path: str,
                       headers: dict[str, str]) -> None:
        """A request to one of the steerable APIs: every one takes this path (`plan_request`)."""
        trace = CompletionTrace(path=path, started=time.monotonic())
        kind = compat.STEERABLE_PATHS[path]
        config = self.context.config
        try:
            require_json(headers)
            raw = await read_body(receive, config.max_request_bytes,
                                  headers.get("content-length"))
            body = parse_json_object(raw)
            previous = None
            if kind == "responses":
                check_new_id(self.context.responses, body)
                previous_id, record = previous_response(self.context.responses, body)
                previous = (previous_id, record) if previous_id is not None else None
            plan = plan_request(self.context, kind, body, trace,
                                headers.get(compat.REQUEST_ID_HEADER.decode()), previous)
        except ClientDisconnected:
            return
        except (BodyTooLarge, SteeringHTTPError) as exc:
            error = exc if isinstance(exc, SteeringHTTPError) else self._too_large()
            await self._send_error(send, error, path, steered=True)
            trace.error = error.message
            record_completion(self.context, trace, error.status, None)
            return
        decision, resolved = trace.decision, trace.resolved
        extra_headers: dict[bytes, bytes] = {}
        if plan.request_id_header is not None:
            extra_headers[compat.REQUEST_ID_HEADER] = plan.request_id_header.encode("ascii")
        payload = dump_json(plan.body)
        inner_scope = with_body_headers(scope, len(payload), extra_headers)
        shown = trace.endpoint if trace.locked else None
        taken = False

        async def edit(data: Any) -> Any:
            nonlocal taken
            if not isinstance(data, dict):
                return data
            if shown is not None and data.get("model") == config.default_name:
                data["model"] = shown
            data["steering"] = steering_field(decision, resolved)
            if plan.guard_ids and data["steering"] is not None:
                trace.guard_decision = await guard_decision(compat.engine_client(scope),
                                                            plan.guard_ids)
                data["steering"]["guard_decision"] = trace.guard_decision
            if plan.capture_ids:
                taken = True
                capture_id = compat.capture_id_of(kind, plan.capture_ids, data)
                data["routing"] = await routing_field(compat.engine_client(scope), capture_id)
            return data

        def stored(status: int) -> None:
            """A Responses answer has begun: record its steering before the client can see
            its id (vLLM stores the response itself no earlier)."""
            if status == 200 and plan.response_id is not None:
                self.context.responses.put(
                    plan.response_id, stored_steering(trace, config.served_names))

        header = steering_header(decision, resolved, config.served_names)
        rename = (config.default_name, shown) if shown is not None else None
        remember = kind == "responses" and compat.responses_store_enabled()
        editor = ResponseEditor(send, (STEERING_HEADER, header), edit, rename,
                                stored if remember else None)
        status = 500
        try:
            await self.app(inner_scope, replay(payload, receive), editor)
            status = editor.status or 500
        finally:
            if plan.guard_ids and trace.guard_decision is None:  # streams: for the audit line
                trace.guard_decision = await guard_decision(compat.engine_client(scope),
                                                            plan.guard_ids)
            record_completion(self.context, trace, status, editor)
            if plan.capture_ids and not taken:
                for capture_id in plan.capture_ids:
                    await compat.discard_routing(scope, capture_id)

    def _stored_response_editor(self, send: Send, response_id: str | None) -> ResponseEditor:
        """A `send` for GET /v1/responses/{id} and its cancel: the steering the stored response
        ran with (header and field), its locked endpoint's name in `model`; vLLM's own error
        messages bounded."""
        record = self.context.responses.get(response_id) if response_id is not None else None
        if record is None:
            return ResponseEditor(send, None, None)
        base = self.context.config.default_name
        rename = (base, record.endpoint) if record.locked and base is not None else None

        async def edit(data: Any) -> Any:
            if isinstance(data, dict):
                if rename is not None and data.get("model") == base:
                    data["model"] = record.endpoint
                data["steering"] = record.field
            return data

        return ResponseEditor(send, (STEERING_HEADER, record.header), edit, rename)

    # ---- other paths ------------------------------------------------------------------------

    async def _other_post(self, scope: Scope, receive: Receive, send: Send, path: str,
                          headers: dict[str, str]) -> None:
        # Bounds vLLM's own error messages (and marks a cancelled stored response).
        send = self._stored_response_editor(send, stored_response_id("POST", path))
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
            require_json(headers)
            body = parse_json_object(raw)
            body = self._checked_other_body(path, body)
        except ClientDisconnected:
            return
        except BodyTooLarge:
            await self._send_error(send, self._too_large(), path)
            return
        except SteeringHTTPError as exc:
            await self._send_error(send, exc, path)
            return
        if body is None:
            await self.app(scope, replay(raw, receive), send)
            return
        payload = dump_json(body)
        await self.app(with_body_headers(scope, len(payload)), replay(payload, receive), send)

    def _checked_other_body(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        return check_other_body(self.context.config, path, body)

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
                              "steering": locked_card(profile)})
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
    async def _send_error(send: Send, error: SteeringHTTPError, path: str,
                          steered: bool = False) -> None:
        """`error` in the shape of the API at `path` (Anthropic's on /v1/messages, else
        OpenAI's); a refused request to a steerable API says `x-steermoe-steering: none`."""
        headers = {**error.headers, **({STEERING_HEADER: "none"} if steered else {})}
        message = error.message
        if len(message) > MAX_ERROR_MESSAGE:
            message = message[:MAX_ERROR_MESSAGE] + "..."
        if path in compat.ANTHROPIC_PATHS:
            payload = anthropic_error_payload(error.status, message)
        else:
            param = clip(error.param) if error.param is not None else None
            payload = error_payload(error.status, message, param)
        await send_json(send, error.status, payload, headers)
