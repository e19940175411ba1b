"""Prometheus metrics of the steering layer, served beside vLLM's own on `/metrics`.

They live in prometheus_client's default registry, which vLLM's `/metrics` serves when one API
server runs; with several API server processes vLLM sets `PROMETHEUS_MULTIPROC_DIR` before they
start, so these metrics are written to that directory and its collector merges them.

The steered share is `sum(steermoe:requests_total{profile!="none"}) / sum(steermoe:requests_total)`.
"""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)

# The `operation` label values of `steermoe:admin_operations_total`: a fixed set, so that no
# client can create new series (`ProfilesAPI.operation_of` maps a method and path onto it).
ADMIN_OPERATIONS = ("list", "get", "put", "delete", "reload", "endpoints", "other")
OTHER = "other"


def status_label(status: object) -> str:
    """An HTTP status as a metric label: "100".."599", anything else "other"."""
    if isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599:
        return str(status)
    return OTHER


def operation_label(operation: object) -> str:
    """`operation` if it is one of ADMIN_OPERATIONS, else "other"."""
    if isinstance(operation, str) and operation in ADMIN_OPERATIONS:
        return str(operation)
    return OTHER


class SteeringMetrics:
    """The `steermoe:` metrics (one set per process)."""

    def __init__(self) -> None:
        # `path`: the steerable API (its path, `run-batch:/v1/chat/completions` or `other`).
        labels = ["path", "endpoint", "profile"]
        self.requests = Counter(
            "steermoe:requests", "Generation requests by API path, endpoint, steering profile "
            "and status (profile 'none' = unsteered, 'inline' = inline steering, 'composed' = "
            "several profiles).",
            [*labels, "status"],
        )
        self.prompt_tokens = Counter(
            "steermoe:prompt_tokens", "Prompt tokens of completed requests.", labels,
        )
        self.generated_tokens = Counter(
            "steermoe:generated_tokens", "Generated tokens of completed requests.", labels,
        )
        self.latency = Histogram(
            "steermoe:request_latency_seconds", "Time from request to last response byte.",
            labels, buckets=LATENCY_BUCKETS,
        )
        self.profiles_loaded = Gauge(
            "steermoe:profiles_loaded", "Valid profiles in the profile directory at last scan.",
            multiprocess_mode="max",
        )
        self.profile_load_errors = Gauge(
            "steermoe:profile_load_errors",
            "Profile files that failed to load or do not fit the served model at last scan.",
            multiprocess_mode="max",
        )
        self.guard_decisions = Counter(
            "steermoe:guard_decisions", "Guarded requests served, by guard and whether it fired.",
            ["guard", "fired"],
        )
        self.admin_operations = Counter(
            "steermoe:admin_operations", "Profile administration requests by operation and status.",
            ["operation", "status"],
        )

    def observe_request(self, path: str, endpoint: str, profile: str, status: int,
                        seconds: float, prompt_tokens: int | None,
                        completion_tokens: int | None) -> None:
        self.requests.labels(path, endpoint, profile, status_label(status)).inc()
        self.latency.labels(path, endpoint, profile).observe(seconds)
        if prompt_tokens:
            self.prompt_tokens.labels(path, endpoint, profile).inc(prompt_tokens)
        if completion_tokens:
            self.generated_tokens.labels(path, endpoint, profile).inc(completion_tokens)

    def observe_guard(self, guard: str, fired: bool | None) -> None:
        """Count one guard decision (`fired` "true", "false", or "unknown": none was kept).
        Guard names come from the operator's guard files: a client cannot mint one."""
        label = "unknown" if fired is None else ("true" if fired else "false")
        self.guard_decisions.labels(guard, label).inc()

    def observe_admin_operation(self, operation: str, status: int) -> None:
        """Count one `/v1/steering` request; both labels come from bounded sets."""
        self.admin_operations.labels(operation_label(operation), status_label(status)).inc()

    def set_profile_counts(self, loaded: int, errors: int) -> None:
        self.profiles_loaded.set(loaded)
        self.profile_load_errors.set(errors)


_METRICS: SteeringMetrics | None = None
_LOCK = threading.Lock()


def steering_metrics() -> SteeringMetrics:
    """The process's metrics, registered on first use."""
    global _METRICS
    with _LOCK:
        if _METRICS is None:
            _METRICS = SteeringMetrics()
        return _METRICS
