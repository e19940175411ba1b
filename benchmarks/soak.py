"""Soak test of a steered server: mixed traffic while profiles change on disk.

Sends N requests (default 10,000) at a fixed concurrency to `steermoe serve`: unsteered, two
client profiles (`alpha`, `beta`), a locked endpoint (`soak-safe`, bound to `guarded`) and a
small share naming `churn`, a profile that keeps appearing and disappearing; as chat, streamed
chat and text completions. Meanwhile a background task rewrites `alpha.json` and `beta.json`
(atomically, alternating between two versions with different expert sets) and adds and deletes
`churn.json`. Every response's steering is checked against what was asked; a sample of the
non-streaming requests captures its routing, which must follow the profile version that the
response's digest names. Exit status 1 on any error or leak, 3 if the time limit stopped the
run before all requests were sent.

    python -m benchmarks.soak --requests 10000 --concurrency 16 --out soak.json
    python -m benchmarks.soak --url http://127.0.0.1:8000 --profiles DIR --checkpoint MODEL_DIR

By default it builds a tiny random-weight Qwen3-MoE into `--work-dir` (`.cache/soak`) and
starts its own server on 127.0.0.1; with `--url` it targets a server already running, which
must serve `--profiles DIR` with `--endpoint soak-safe=guarded --allow-routing-capture`.
Traffic goes to loopback addresses only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.http_load import WORDS, is_loopback, parse_weighted
from benchmarks.local_server import ENGINE_OPTIONS, steermoe_serve

# ---- what is sent --------------------------------------------------------------------------

LOCKED_ENDPOINT = "soak-safe"
LOCKED_PROFILE = "guarded"
CHURN = "churn"
# Request kinds: steering asked for. "locked" = model LOCKED_ENDPOINT, no steering field.
KINDS = ("none", "alpha", "beta", "locked", CHURN)
DEFAULT_MIX = "none:30,alpha:25,beta:25,locked:15,churn:5"
APIS = ("chat", "chat_stream", "completions")
STEERING_HEADER = "x-steermoe-steering"
# Written into every profile this tool writes; an existing file without it is not overwritten.
MARKER = "written by benchmarks.soak"
ERROR_FIELDS = {"message", "type", "param", "code"}

START_TIMEOUT_S = 420
MAX_FAILURES_KEPT = 100
BODY_EXCERPT = 20000


# ---- profile versions ----------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """One version of a profile: expert sets per MoE layer, and the digest the server gives it."""

    profile: str
    label: str  # "v0", "v1"
    activate: dict[int, list[int]]
    deactivate: dict[int, list[int]]

    def document(self, model: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": "steermoe-profile/1",
            "name": self.profile,
            "model": model,
            "activate": {str(k): v for k, v in self.activate.items()},
            "deactivate": {str(k): v for k, v in self.deactivate.items()},
            "tags": [],
            "description": f"{MARKER} ({self.label})",
        }


# (activated, deactivated) experts of each version, shifted by the layer index, so that no
# two versions force the same pattern and a layer mix-up shows. Versions of one profile exclude
# each other: v0 activates what v1 deactivates.
PATTERNS: dict[str, list[tuple[list[int], list[int]]]] = {
    "alpha": [([5], [0, 1]), ([0], [4, 5])],
    "beta": [([2], [6, 7]), ([6], [2, 3])],
    LOCKED_PROFILE: [([7], [3, 4])],
    CHURN: [([1], [5, 6])],
}


def make_versions(shape: dict[str, Any]) -> dict[str, list[Version]]:
    """Every profile's versions for a model of `shape` (needs 8+ experts and top-k 1..6)."""
    experts, top_k = int(shape["num_experts"]), int(shape["top_k"])
    if experts < 8 or not 1 <= top_k <= experts - 2:
        raise ValueError(f"the soak needs 8 or more experts and top-k <= experts - 2; the "
                         f"model has {experts} experts, top-k {top_k}")
    layers = [int(layer) for layer in shape["moe_layers"]]
    out: dict[str, list[Version]] = {}
    for name, patterns in PATTERNS.items():
        out[name] = [
            Version(name, f"v{i}",
                    {layer: [(e + layer) % experts for e in act] for layer in layers},
                    {layer: sorted((e + layer) % experts for e in deact) for layer in layers})
            for i, (act, deact) in enumerate(patterns)
        ]
    return out


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to `path` through a temporary file and os.replace (readers see old or new)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{random.getrandbits(32):08x}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def check_writable(directory: Path, names: list[str], force: bool) -> None:
    """Refuse to overwrite a profile file this tool did not write (unless `force`)."""
    for name in names:
        path = directory / f"{name}.json"
        if not path.exists() or force:
            continue
        try:
            mine = MARKER in json.loads(path.read_text(encoding="utf-8")).get("description", "")
        except (OSError, ValueError, AttributeError):
            mine = False
        if not mine:
            raise SystemExit(f"{path} exists and was not written by the soak; pass --force to "
                             "overwrite it")


def normalise_sets(value: Any) -> dict[int, list[int]]:
    return {int(k): sorted(int(e) for e in v) for k, v in (value or {}).items() if v}


def same_sets(version: Version, profile: dict[str, Any]) -> bool:
    return (normalise_sets(profile.get("activate")) == normalise_sets(version.activate)
            and normalise_sets(profile.get("deactivate")) == normalise_sets(version.deactivate))


# ---- routing checks --------------------------------------------------------------------------


def computed_rows(routing: dict[str, Any]) -> list[list[list[int]]]:
    """Positions the engine computed (rows of prefix-cache hits hold -1)."""
    return [row for row in routing["expert_ids"]
            if all(e >= 0 for layer in row for e in layer)]


def follows(routing: dict[str, Any], version: Version) -> bool:
    """Every computed row holds each activated expert and no deactivated one."""
    layers = routing["moe_layers"]
    for row in computed_rows(routing):
        for column, layer in enumerate(layers):
            chosen = set(row[column])
            if not set(version.activate.get(layer, [])) <= chosen:
                return False
            if chosen & set(version.deactivate.get(layer, [])):
                return False
    return True


def routing_problem(routing: Any) -> str | None:
    """Why `routing` is not a well-formed routing record, or None."""
    if not isinstance(routing, dict):
        return "no routing in the response"
    layers, ids = routing.get("moe_layers"), routing.get("expert_ids")
    if not isinstance(layers, list) or not isinstance(ids, list) or not ids:
        return "routing without moe_layers / expert_ids"
    for row in ids:
        if not isinstance(row, list) or len(row) != len(layers):
            return "a routing row does not have one entry per MoE layer"
        for entry in row:
            if not isinstance(entry, list) or not all(isinstance(e, int) for e in entry):
                return "a routing entry is not a list of expert ids"
    return None


# ---- results ---------------------------------------------------------------------------------


@dataclass
class Planned:
    index: int
    kind: str
    api: str
    max_tokens: int
    capture: bool
    via_xargs: bool


@dataclass
class Outcome:
    plan: Planned
    start: float
    end: float
    status: int | None = None
    header: str | None = None
    digest_version: str | None = None
    routing_checked: bool = False
    routing_skipped: bool = False
    failure: dict[str, Any] | None = None  # {"class": "error"|"leak", "reason": ...}

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class ChangeLog:
    """What the background task did to the profile files, with times (perf_counter)."""

    events: dict[str, list[tuple[float, str | None]]] = field(default_factory=dict)
    rewrites: int = 0
    adds: int = 0
    deletes: int = 0

    def record(self, name: str, label: str | None, when: float) -> None:
        self.events.setdefault(name, []).append((when, label))

    def timeline(self, name: str, start: float,
                 end: float) -> tuple[str | None, list[tuple[float, str | None]]]:
        """(version at `start`, [(time, version)] of the changes in (start, end])."""
        at_start = None
        changes = []
        for when, label in self.events.get(name, []):
            if when <= start:
                at_start = label
            elif when <= end:
                changes.append((when, label))
        return at_start, changes

    def labels_during(self, name: str, start: float, end: float) -> set[str | None]:
        """The versions (None: absent) that NAME.json had at some moment of [start, end]."""
        events = self.events.get(name, [])
        seen: set[str | None] = set()
        current: str | None = None
        known = False
        for when, label in events:
            if when <= start:
                current, known = label, True
                continue
            if when > end:
                break
            if known:
                seen.add(current)
            current, known = label, True
        if known:
            seen.add(current)
        return seen


# ---- the soak ------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, base_url: str, profiles_dir: Path,
                 shape: dict[str, Any]):
        self.args = args
        self.base_url = base_url.rstrip("/")
        self.profiles_dir = profiles_dir
        self.model_doc = {key: shape[key]
                          for key in ("architecture", "num_layers", "num_experts", "top_k")}
        self.versions = make_versions(shape)
        self.by_digest: dict[str, Version] = {}
        self.changes = ChangeLog()
        self.outcomes: list[Outcome] = []
        self.model: str = ""
        self.server_version: str | None = None
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.failures: list[dict[str, Any]] = []

    # -- files --

    def write_version(self, version: Version) -> None:
        write_atomic(self.profiles_dir / f"{version.profile}.json",
                     version.document(self.model_doc))
        self.changes.record(version.profile, version.label, time.perf_counter())

    def delete_profile(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.profiles_dir / f"{name}.json").unlink()
        self.changes.record(name, None, time.perf_counter())

    # -- set-up: which digest names which version --

    async def calibrate(self, session: Any) -> None:
        """Write each version, read its digest back from GET /v1/steering/profiles/NAME."""
        for versions in self.versions.values():
            for version in versions:
                self.write_version(version)
                digest = await self._served_digest(session, version)
                if digest in self.by_digest:
                    raise RuntimeError(f"two profile versions share the digest {digest}")
                self.by_digest[digest] = version
        for versions in self.versions.values():
            self.write_version(versions[0])  # every profile present, at v0, to start

    async def _served_digest(self, session: Any, version: Version) -> str:
        url = f"{self.base_url}/v1/steering/profiles/{version.profile}"
        deadline = time.monotonic() + 30
        last = ""
        while time.monotonic() < deadline:
            async with session.get(url, headers=self.headers) as resp:
                text = await resp.text()
                if resp.status == 200:
                    data = json.loads(text)
                    if same_sets(version, data.get("profile") or {}) and data.get("digest"):
                        return str(data["digest"])
                last = f"HTTP {resp.status}: {text[:300]}"
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the server did not show {version.profile} {version.label} "
                           f"(GET {url}): {last}")

    async def _server_info(self, session: Any) -> None:
        async with session.get(f"{self.base_url}/v1/models", headers=self.headers) as resp:
            resp.raise_for_status()
            cards = (await resp.json())["data"]
        ids = [card["id"] for card in cards]
        if LOCKED_ENDPOINT not in ids:
            raise RuntimeError(f"the server does not serve {LOCKED_ENDPOINT!r} (start it with "
                               f"--endpoint {LOCKED_ENDPOINT}={LOCKED_PROFILE}); it serves {ids}")
        base = [card["id"] for card in cards if card["id"] != LOCKED_ENDPOINT
                and not (card.get("steering") or {}).get("locked")]
        if not base:
            raise RuntimeError(f"the server serves no unlocked model: {ids}")
        self.model = self.args.model or base[0]
        with contextlib.suppress(Exception):
            async with session.get(f"{self.base_url}/version") as resp:
                if resp.status == 200:
                    self.server_version = (await resp.json()).get("version")

    # -- background changes --

    async def change_profiles(self, stop: asyncio.Event) -> None:
        """Rewrite alpha and beta every --rewrite-interval, add/delete churn every
        --churn-interval, until `stop` is set."""
        current = {"alpha": 0, "beta": 0}
        churn_present = True
        interval, churn_interval = self.args.rewrite_interval, self.args.churn_interval
        next_rewrite = time.perf_counter() + interval
        next_churn = time.perf_counter() + churn_interval
        while not stop.is_set():
            now = time.perf_counter()
            if now >= next_rewrite:
                for name in ("alpha", "beta"):
                    current[name] = 1 - current[name]
                    self.write_version(self.versions[name][current[name]])
                    self.changes.rewrites += 1
                next_rewrite = now + interval
            if now >= next_churn:
                if churn_present:
                    self.delete_profile(CHURN)
                    self.changes.deletes += 1
                else:
                    self.write_version(self.versions[CHURN][0])
                    self.changes.adds += 1
                churn_present = not churn_present
                next_churn = now + churn_interval
            wait = max(0.0, min(next_rewrite, next_churn) - time.perf_counter())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)

    # -- requests --

    def plan(self) -> list[Planned]:
        rng = random.Random(self.args.seed)
        names = [name for name, _ in self.args.kind_mix]
        weights = [weight for _, weight in self.args.kind_mix]
        plans = []
        for index in range(self.args.requests):
            kind = rng.choices(names, weights)[0]
            api = rng.choice(APIS)
            capture = (api != "chat_stream" and self.args.capture_every > 0
                       and rng.randrange(self.args.capture_every) == 0)
            plans.append(Planned(index, kind, api, rng.randint(1, self.args.max_tokens),
                                 capture, via_xargs=rng.random() < 0.25))
        return plans

    def payload(self, plan: Planned) -> tuple[str, dict[str, Any]]:
        rng = random.Random(self.args.seed * 1_000_003 + plan.index)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        text = f"soak {plan.index} {words}"
        body: dict[str, Any] = {
            "model": LOCKED_ENDPOINT if plan.kind == "locked" else self.model,
            "max_tokens": plan.max_tokens,
            "temperature": 0,
        }
        if plan.api == "completions":
            path = "/v1/completions"
            body["prompt"] = text
        else:
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": text}]
        if plan.api == "chat_stream":
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        steering: dict[str, Any] = {}
        if plan.kind not in ("none", "locked"):
            steering["steering_profile"] = plan.kind
        if plan.capture:
            steering["capture_routing"] = True
        if plan.via_xargs and steering:
            if "capture_routing" in steering:
                steering["capture_routing"] = 1  # vllm_xargs carry strings and numbers
            body["vllm_xargs"] = steering
        else:
            body.update(steering)
        return path, body

    async def send(self, session: Any, plan: Planned) -> Outcome:
        path, body = self.payload(plan)
        outcome = Outcome(plan, start=time.perf_counter(), end=0.0)
        response: dict[str, Any] = {}

        def fail(klass: str, reason: str) -> None:
            if outcome.failure is None:
                outcome.failure = {"class": klass, "reason": reason}

        try:
            async with session.post(self.base_url + path, json=body,
                                    headers=self.headers) as resp:
                outcome.status = resp.status
                headers = resp.headers.getall(STEERING_HEADER, [])
                response = {"status": resp.status, "headers": {STEERING_HEADER: headers}}
                if plan.api == "chat_stream" and resp.status == 200:
                    text = await self._read_stream(resp, fail)
                else:
                    text = await resp.text()
                response["body"] = text[:BODY_EXCERPT]
                outcome.end = time.perf_counter()
                self.check(outcome, headers, text, fail)
        except (asyncio.TimeoutError, TimeoutError):
            fail("error", "timeout")
        except Exception as exc:  # connection refused or reset, a broken stream, ...
            fail("error", f"transport: {type(exc).__name__}: {exc}"[:300])
        if not outcome.end:
            outcome.end = time.perf_counter()
        if outcome.failure is not None:
            self.failures.append({
                **outcome.failure,
                "index": plan.index, "kind": plan.kind, "api": plan.api,
                "request": {"method": "POST", "path": path, "body": body},
                "response": response,
                "sent_at_s": round(outcome.start - self.t0, 4),
                "latency_s": round(outcome.latency, 4),
                "profile_file": self._files_during(plan.kind, outcome),
            })
        return outcome

    def _files_during(self, kind: str, outcome: Outcome) -> Any:
        """NAME.json at the request's start and its changes until the response (seconds
        after the traffic began; null: absent)."""
        name = LOCKED_PROFILE if kind == "locked" else kind
        if name not in self.versions:
            return None
        at_start, changes = self.changes.timeline(name, outcome.start, outcome.end)
        return {"profile": name, "at_start": at_start,
                "changes": [[round(when - self.t0, 4), label] for when, label in changes]}

    async def _read_stream(self, resp: Any, fail: Any) -> str:
        lines: list[str] = []
        done = chunks = 0
        async for raw in resp.content:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            lines.append(line)
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done += 1
                continue
            try:
                chunk = json.loads(data)
            except ValueError:
                fail("error", "malformed stream: a chunk is not JSON")
                continue
            if not isinstance(chunk, dict) or "error" in chunk:
                fail("error", "stream error chunk")
                continue
            chunks += 1
        if done != 1 or chunks == 0:
            fail("error", f"malformed stream: {chunks} chunks, {done} [DONE]")
        return "\n".join(lines)

    # -- the checks --

    def check(self, outcome: Outcome, headers: list[str], text: str, fail: Any) -> None:
        plan = outcome.plan
        status = outcome.status
        if plan.kind == CHURN and status == 404:
            self._check_error_body(text, fail)
            if not any(label is None for label in
                       self.changes.labels_during(CHURN, outcome.start, outcome.end)):
                fail("leak", "stale: 404 for churn, which was on disk during the whole request")
            return
        if status != 200:
            fail("error", f"HTTP {status}")
            return
        if len(headers) != 1:
            fail("error", f"{len(headers)} {STEERING_HEADER} headers")
            return
        header = outcome.header = headers[0]
        expected_profile = {"none": None, "locked": LOCKED_PROFILE}.get(plan.kind, plan.kind)
        endpoint = LOCKED_ENDPOINT if plan.kind == "locked" else self.model
        version = None
        if expected_profile is None:
            if header != "none":
                fail("leak", f"unsteered request got steering: {header}")
                return
        else:
            match = re.fullmatch(r"profile=([^;]+); endpoint=([^;]+); digest=(\w+)", header)
            if match is None:
                fail("leak" if header == "none" or not header.startswith("profile=") else "error",
                     f"header {header!r} for profile {expected_profile}")
                return
            profile, got_endpoint, digest = match.groups()
            if profile != expected_profile:
                fail("leak", f"asked {expected_profile}, header names {profile}")
                return
            if got_endpoint != endpoint:
                fail("leak", f"header endpoint {got_endpoint!r}, asked {endpoint!r}")
                return
            version = self.by_digest.get(digest)
            if version is None or version.profile != expected_profile:
                fail("leak", f"digest {digest} is not a version of {expected_profile}"
                     + (f" (it is {version.profile} {version.label})" if version else ""))
                return
            outcome.digest_version = version.label
            present = self.changes.labels_during(version.profile, outcome.start, outcome.end)
            if version.label not in present:
                fail("leak", f"stale: {version.profile} {version.label} was not on disk at any "
                     f"time during the request (on disk: {sorted(map(str, present))})")
        if plan.api == "chat_stream":
            return
        try:
            body = json.loads(text)
        except ValueError:
            fail("error", "malformed body: not JSON")
            return
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list) \
                or not body["choices"]:
            fail("error", "malformed body: no choices")
            return
        if "steering" not in body:
            fail("error", "malformed body: no steering field")
            return
        field_ = body["steering"]
        if expected_profile is None:
            if field_ is not None:
                fail("leak", f"unsteered request has steering {field_}")
                return
        else:
            if not isinstance(field_, dict):
                fail("leak", f"steered request has steering {field_!r}")
                return
            wanted = {"profile": expected_profile, "inline": False, "endpoint": endpoint,
                      "locked": plan.kind == "locked", "digest": header.rsplit("=", 1)[1]}
            wrong = {k: field_.get(k) for k, v in wanted.items() if field_.get(k) != v}
            if wrong:
                fail("leak", f"steering field {wrong} differs from {wanted}")
                return
        if body.get("model") != (LOCKED_ENDPOINT if plan.kind == "locked" else self.model):
            fail("leak", f"response model {body.get('model')!r}")
            return
        if not plan.capture:
            if "routing" in body:
                fail("error", "routing in a response that did not ask for it")
            return
        problem = routing_problem(body.get("routing"))
        if problem is not None:
            fail("error", problem)
            return
        routing = body["routing"]
        rows = computed_rows(routing)
        if version is not None:
            if not rows:
                outcome.routing_skipped = True
                return
            outcome.routing_checked = True
            if not follows(routing, version):
                fail("leak", f"routing does not follow {version.profile} {version.label}, "
                     "the version its digest names")
            return
        # Unsteered: must not show any profile's forced pattern (only with enough rows).
        if len(rows) < self.args.min_unsteered_rows:
            outcome.routing_skipped = True
            return
        outcome.routing_checked = True
        forced = [f"{v.profile} {v.label}" for vs in self.versions.values() for v in vs
                  if follows(routing, v)]
        if forced:
            fail("leak", f"unsteered routing follows {forced}")

    @staticmethod
    def _check_error_body(text: str, fail: Any) -> None:
        try:
            body = json.loads(text)
        except ValueError:
            fail("error", "404 body is not JSON")
            return
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or not set(error) >= ERROR_FIELDS:
            fail("error", "404 body is not an OpenAI error {error: {message, type, param, code}}")

    # -- the run --

    async def run(self) -> dict[str, Any]:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.args.timeout)
        connector = aiohttp.TCPConnector(limit=self.args.concurrency)
        plans = self.plan()
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await self._server_info(session)
            await self.calibrate(session)
            stop = asyncio.Event()
            self.changes = ChangeLog(events=self.changes.events)  # count the run's changes only
            changer = asyncio.create_task(self.change_profiles(stop))
            self.t0 = time.perf_counter()
            deadline = self.t0 + self.args.max_seconds
            queue = iter(plans)
            last_report = [self.t0]

            async def worker() -> None:
                while time.perf_counter() < deadline:
                    plan = next(queue, None)
                    if plan is None:
                        return
                    self.outcomes.append(await self.send(session, plan))
                    self._progress(last_report)

            try:
                await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))
            finally:
                stop.set()
                await changer
            wall = time.perf_counter() - self.t0
        return self.summary(wall, len(plans))

    def _progress(self, last: list[float]) -> None:
        now = time.perf_counter()
        if self.args.quiet or now - last[0] < self.args.progress_every:
            return
        last[0] = now
        done = len(self.outcomes)
        bad = sum(o.failure is not None for o in self.outcomes)
        print(f"[soak] {done}/{self.args.requests} requests, {now - self.t0:.0f} s, "
              f"{done / (now - self.t0):.1f} req/s, {bad} failed, {self.changes.rewrites} "
              "rewrites", file=sys.stderr, flush=True)

    def summary(self, wall: float, planned: int) -> dict[str, Any]:
        import numpy as np

        outcomes = self.outcomes
        errors = [o for o in outcomes if o.failure and o.failure["class"] == "error"]
        leaks = [o for o in outcomes if o.failure and o.failure["class"] == "leak"]
        ok_latency = [o.latency for o in outcomes if o.failure is None]
        statuses: dict[str, Counter] = {}
        for o in outcomes:
            statuses.setdefault(o.plan.kind, Counter())[str(o.status)] += 1
        versions_seen: dict[str, Counter] = {}
        for o in outcomes:
            if o.digest_version is not None:
                name = LOCKED_PROFILE if o.plan.kind == "locked" else o.plan.kind
                versions_seen.setdefault(name, Counter())[o.digest_version] += 1

        def pct(values: list[float], p: float) -> float | None:
            return float(np.percentile(np.asarray(values) * 1000, p)) if values else None

        try:
            from importlib.metadata import version as package_version
            steermoe_version = package_version("steermoe-server")
        except Exception:
            steermoe_version = None
        settings = {k: v for k, v in vars(self.args).items()
                    if k not in ("api_key", "kind_mix")}
        return {
            "requests": len(outcomes),
            "planned": planned,
            "complete": len(outcomes) == planned,
            "by_kind": dict(Counter(o.plan.kind for o in outcomes)),
            "by_api": dict(Counter(o.plan.api for o in outcomes)),
            "status_by_kind": {k: dict(v) for k, v in sorted(statuses.items())},
            "errors": len(errors),
            "leaks": len(leaks),
            "failure_reasons": dict(Counter(
                f"{o.failure['class']}: {re.sub(r'[0-9a-f]{16}', 'D', o.failure['reason'])}"
                for o in outcomes if o.failure).most_common(20)),
            "routing_checked": sum(o.routing_checked for o in outcomes),
            "routing_checked_by_kind": dict(Counter(o.plan.kind for o in outcomes
                                                    if o.routing_checked)),
            "routing_skipped": sum(o.routing_skipped for o in outcomes),
            "versions_seen": {k: dict(v) for k, v in sorted(versions_seen.items())},
            "profile_changes": {"rewrites": self.changes.rewrites, "adds": self.changes.adds,
                                "deletes": self.changes.deletes},
            "throughput_rps": len(outcomes) / wall if wall > 0 else 0.0,
            "latency_ms": {"p50": pct(ok_latency, 50), "p99": pct(ok_latency, 99),
                           "max": pct(ok_latency, 100)},
            "wall_s": wall,
            "server": {"url": self.base_url, "model": self.model,
                       "vllm_version": self.server_version,
                       "steermoe_version": steermoe_version},
            "digests": {d: f"{v.profile} {v.label}" for d, v in self.by_digest.items()},
            "settings": settings,
            "failures": self.failures[:MAX_FAILURES_KEPT],
        }


# ---- a server of our own -----------------------------------------------------------------------


@contextlib.contextmanager
def own_server(checkpoint: Path, profiles: Path, log_path: Path,
               extra: list[str]) -> Iterator[str]:
    """`steermoe serve` on 127.0.0.1 (a free port) until the block ends; yields its URL."""
    args = [*ENGINE_OPTIONS, "--profiles", str(profiles),
            "--endpoint", f"{LOCKED_ENDPOINT}={LOCKED_PROFILE}", "--allow-routing-capture",
            *extra]
    print(f"[soak] starting steermoe serve {checkpoint} {' '.join(args)}", file=sys.stderr,
          flush=True)
    with steermoe_serve(checkpoint, args, log_path, start_timeout_s=START_TIMEOUT_S) as server:
        yield server.base_url


# ---- command line ----------------------------------------------------------------------------


def parse_mix(text: str) -> list[tuple[str, float]]:
    """'plain:2,locked:1' -> [('plain', 2.0), ('locked', 1.0)] over the request KINDS."""
    return parse_weighted(text, "kind", KINDS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=3600,
                        help="no request starts after this many seconds of traffic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", default=DEFAULT_MIX,
                        help=f"weighted kinds ({', '.join(KINDS)}); default {DEFAULT_MIX}")
    parser.add_argument("--max-tokens", type=int, default=4, help="each request: 1..N tokens")
    parser.add_argument("--capture-every", type=int, default=5,
                        help="capture the routing of 1 in N non-streaming requests (0: never)")
    parser.add_argument("--min-unsteered-rows", type=int, default=3,
                        help="computed rows an unsteered routing needs to be checked")
    parser.add_argument("--rewrite-interval", type=float, default=0.5,
                        help="seconds between rewrites of alpha.json and beta.json")
    parser.add_argument("--churn-interval", type=float, default=0.7,
                        help="seconds between adding and deleting churn.json")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per request")
    parser.add_argument("--out", default=None, help="write the summary JSON here")
    parser.add_argument("--url", default=None,
                        help="a running server (loopback only); needs --profiles and "
                             "--checkpoint")
    parser.add_argument("--profiles", default=None,
                        help="with --url: the server's profile directory (the soak writes "
                             "alpha, beta, guarded and churn there)")
    parser.add_argument("--checkpoint", default=None,
                        help="the served model's directory (its config.json gives the shape); "
                             "default: build a tiny qwen3_moe into --work-dir")
    parser.add_argument("--model", default=None, help="model name to send (default: the "
                        "first unlocked one of GET /v1/models)")
    parser.add_argument("--work-dir", default=".cache/soak",
                        help="checkpoint, profiles and server log of a server this tool starts")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra option for the server this tool starts (repeatable)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--force", action="store_true",
                        help="overwrite profile files the soak did not write")
    parser.add_argument("--progress-every", type=float, default=30.0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.url is not None:
        if not is_loopback(args.url):
            parser.error(f"{args.url} is not a loopback address")
        if not args.profiles or not args.checkpoint:
            parser.error("--url needs --profiles DIR and --checkpoint MODEL_DIR")
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        parser.error("--requests, --concurrency and --max-tokens must be positive")
    try:
        args.kind_mix = parse_mix(args.mix)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def format_summary(s: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} ms"

    lines = [
        f"soak: {s['requests']}/{s['planned']} requests in {s['wall_s']:.1f} s "
        f"({s['throughput_rps']:.1f} req/s), latency p50 {ms(s['latency_ms']['p50'])}, "
        f"p99 {ms(s['latency_ms']['p99'])}",
        f"  errors {s['errors']}, leaks {s['leaks']}, routing checked {s['routing_checked']} "
        f"(skipped {s['routing_skipped']})",
        f"  kinds {s['by_kind']}",
        f"  apis {s['by_api']}",
        f"  status by kind {s['status_by_kind']}",
        f"  versions seen {s['versions_seen']}",
        f"  profile changes during the run {s['profile_changes']}",
        f"  server {s['server']}",
    ]
    if s["failure_reasons"]:
        lines.append(f"  failures {s['failure_reasons']}")
    if not s["complete"]:
        lines.append(f"  INCOMPLETE: --max-seconds {s['settings']['max_seconds']} stopped the run")
    return "\n".join(lines)


async def _soak(args: argparse.Namespace, url: str, profiles: Path,
                shape: dict[str, Any]) -> dict[str, Any]:
    return await Soak(args, url, profiles, shape).run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from profile_tools.checkpoint_factory import model_shape

    if args.url is not None:
        profiles = Path(args.profiles)
        shape = model_shape(args.checkpoint)
        check_writable(profiles, list(PATTERNS), args.force)
        summary = asyncio.run(_soak(args, args.url, profiles, shape))
    else:
        work = Path(args.work_dir).resolve()  # the server runs in the repository root
        work.mkdir(parents=True, exist_ok=True)
        if args.checkpoint:
            checkpoint = Path(args.checkpoint).resolve()
        else:
            from profile_tools.checkpoint_factory import build_checkpoint

            checkpoint = build_checkpoint("qwen3_moe", work / "qwen3_moe", size="tiny",
                                          dtype="float32")
        shape = model_shape(checkpoint)
        profiles = work / "profiles"
        profiles.mkdir(exist_ok=True)
        check_writable(profiles, list(PATTERNS), args.force)
        # The locked endpoint's profile must exist when the server starts.
        soak_versions = make_versions(shape)
        model_doc = {k: shape[k] for k in ("architecture", "num_layers", "num_experts", "top_k")}
        for name, versions in soak_versions.items():
            write_atomic(profiles / f"{name}.json", versions[0].document(model_doc))
        with own_server(checkpoint, profiles, work / "server.log", args.server_arg) as url:
            summary = asyncio.run(_soak(args, url, profiles, shape))
        summary["server"]["log"] = str(work / "server.log")
    print(format_summary(summary))
    for failure in summary["failures"][:5]:
        print(json.dumps(failure)[:3000])
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2), encoding="utf-8")
        print(f"wrote {args.out}")
    if summary["errors"] or summary["leaks"]:
        return 1
    return 0 if summary["complete"] else 3


__all__ = ["ChangeLog", "Soak", "follows", "main", "make_versions", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
