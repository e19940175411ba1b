"""The steering of stored Responses-API responses, for `previous_response_id` and retrieval.

vLLM keeps stored responses (`VLLM_ENABLE_RESPONSES_API_STORE=1`) in the memory of the API
server process that served them. The steering layer of that process keeps, beside them, the
steering each one ran with, keyed by a hash of the response id (so a long client-chosen id
costs no memory). The map is bounded (`MAX_RESPONSES` entries, least recently used dropped):
a continuation of a response the map no longer knows is refused (404), never run with
steering it did not ask for. As with vLLM's own store, a continuation that reaches another
API server process (`--api-server-count` > 1) or a restarted server finds nothing there.

Rules (`continued`):
- a response created on a locked endpoint can be continued only on that endpoint (403 on any
  other name; a request without `model` continues on it), so it always runs the locked profile;
- a response created on an unlocked name is continued with its steering (the same profile, or
  the same inline expert sets) unless the request says otherwise (`steering_profile`, also
  `null` for none, or `steering`) or names a locked endpoint, which imposes its own profile.
  The policy decides again: a profile clients may no longer select is refused.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

from expert_profiles.request_steering import RequestedSteering
from server.config import ServerConfig, locked_steering
from server.errors import SteeringHTTPError, clip

MAX_RESPONSES = 65536
PREVIOUS_KEY = "previous_response_id"


@dataclass(frozen=True)
class StoredSteering:
    """What one stored response ran with."""

    endpoint: str
    locked: bool
    # What a continuation on an unlocked name inherits (a profile name or inline expert sets).
    requested: RequestedSteering
    # The response's `steering` field and `x-steermoe-steering` header.
    field: dict[str, Any] | None
    header: str


class ResponseSteeringStore:
    """Response id -> StoredSteering, bounded, least recently used dropped first."""

    def __init__(self, max_entries: int = MAX_RESPONSES):
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, StoredSteering] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(response_id: str) -> bytes:
        return hashlib.sha256(response_id.encode("utf-8", "surrogatepass")).digest()

    def get(self, response_id: str) -> StoredSteering | None:
        key = self._key(response_id)
        with self._lock:
            record = self._entries.get(key)
            if record is not None:
                self._entries.move_to_end(key)
            return record

    def __contains__(self, response_id: str) -> bool:
        with self._lock:
            return self._key(response_id) in self._entries

    def put(self, response_id: str, record: StoredSteering) -> None:
        key = self._key(response_id)
        with self._lock:
            self._entries[key] = record
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def previous_response(store: ResponseSteeringStore, body: dict[str, Any]
                      ) -> tuple[str | None, StoredSteering | None]:
    """(previous_response_id, its record) of a Responses request; (None, None) if it continues
    nothing. 400 for an id that is not a string, 404 for an id this process does not know."""
    previous_id = body.get(PREVIOUS_KEY)
    if previous_id is None:
        return None, None
    if not isinstance(previous_id, str):
        raise SteeringHTTPError(400, f"{PREVIOUS_KEY!r} must be a string", param=PREVIOUS_KEY)
    record = store.get(previous_id)
    if record is None:
        raise SteeringHTTPError(404, f"Response with id '{clip(previous_id)}' not found.",
                                param=PREVIOUS_KEY)
    return previous_id, record


def check_new_id(store: ResponseSteeringStore, body: dict[str, Any]) -> None:
    """A client-chosen `request_id` (the response id) must not name a stored response: vLLM
    would overwrite it, and the steering recorded for it with it."""
    given = body.get("request_id")
    if isinstance(given, str) and given in store:
        raise SteeringHTTPError(
            409, f"a stored response has the id '{clip(given)}'; choose another request_id",
            param="request_id",
        )


def continued(config: ServerConfig, previous_id: str, previous: StoredSteering,
              model: Any, requested: RequestedSteering, body: dict[str, Any]
              ) -> tuple[str | None, RequestedSteering]:
    """(served name, requested steering) of a request continuing `previous`; may set `model`
    in `body` (a continuation of a locked response without `model`). 403 for a locked
    response continued under another name."""
    if previous.locked:
        if not requested.mentions_steering:  # the profiles a client added there stay
            requested = replace(previous.requested, capture=requested.capture)
        if model is None:
            body["model"] = previous.endpoint
            return previous.endpoint, requested
        if model != previous.endpoint:
            raise SteeringHTTPError(
                403, f"response '{clip(previous_id)}' was created on endpoint "
                f"'{clip(previous.endpoint)}', which always runs "
                f"{locked_steering(config.endpoints.get(previous.endpoint, ''))}; continue it "
                f"on '{clip(previous.endpoint)}'", param="model",
            )
        return model, requested
    endpoint = model if isinstance(model, str) else None
    if (endpoint is not None and endpoint in config.endpoints) or requested.mentions_steering:
        return endpoint, requested
    return endpoint, replace(previous.requested, capture=requested.capture)
