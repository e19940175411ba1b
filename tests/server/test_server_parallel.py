"""`steermoe serve` on a tensor-parallel engine (TP=2, two CPU ranks) with two API server
processes: steered HTTP requests, and the same policy and profiles in every API process.

Each connection is served by one API process (the kernel spreads connections over the
processes listening on the port); the test finds which process holds each of its connections,
so it can show that every process refuses what the policy refuses, steers what it allows, and
sees a profile added through the admin API of either process (hot reload).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from profile_tools.checkpoint_factory import model_shape
from tests.server.routing_checks import assert_follows
from tests.server.server_process import steermoe_server, write_profile

pytestmark = pytest.mark.engine

ADMIN_TOKEN = "parallel-admin-token"
STEER = ({0: [1], 3: [6]}, {1: [0, 2], 2: [7]})  # layers 0-3, all MoE (Mixtral, 8 experts)
HIDDEN = ({2: [4]}, {})
ADDED = ({1: [5], 2: [3]}, {0: [6]})
INLINE = ({3: [2]}, {3: [4]})


@pytest.fixture(scope="module")
def setup(build_tiny, tmp_path_factory) -> dict[str, Any]:
    checkpoint = build_tiny("mixtral")
    shape = model_shape(checkpoint)
    model = {key: shape[key] for key in ("architecture", "num_layers", "num_experts", "top_k")}
    root = tmp_path_factory.mktemp("parallel_server")
    profiles = root / "profiles"
    profiles.mkdir()
    write_profile(profiles, "steer", model, *STEER)
    write_profile(profiles, "hidden", model, *HIDDEN)
    return {"checkpoint": checkpoint, "model": model, "root": root, "profiles": profiles,
            "moe_layers": shape["moe_layers"]}


@pytest.fixture(scope="module")
def server(setup):
    root = setup["root"]
    args = ["--profiles", str(setup["profiles"]), "--client-profiles", "steer,added",
            "--allow-inline-steering", "--allow-routing-capture",
            "--tensor-parallel-size", "2", "--api-server-count", "2"]
    env = {"STEERMOE_ADMIN_TOKEN": ADMIN_TOKEN, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    with steermoe_server(setup["checkpoint"], args, root / "server.log", env=env) as running:
        running.model = str(setup["checkpoint"])
        running.port = int(running.base_url.rsplit(":", 1)[1])
        yield running


def _owner(server, client_port: int) -> int | None:
    """The pid of the server process that holds the connection from `client_port`."""
    for process in psutil.Process(server.process.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            for conn in process.net_connections(kind="tcp"):
                if conn.laddr and conn.laddr.port == server.port and conn.raddr \
                        and conn.raddr.port == client_port:
                    return process.pid
    return None


@contextlib.contextmanager
def connection(server) -> Iterator[tuple[http.client.HTTPConnection, int]]:
    """A kept-alive connection and the pid of the API process serving it."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.connect()
    port = conn.sock.getsockname()[1]
    owner = None
    for _ in range(50):
        owner = _owner(server, port)
        if owner is not None:
            break
        time.sleep(0.1)
    try:
        yield conn, owner
    finally:
        conn.close()


def call(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None,
         token: str | None = None) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    response = conn.getresponse()
    data = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(data)


def chat(server, conn, **extra) -> tuple[int, dict[str, str], Any]:
    body = {"model": server.model, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me a story about a robot"}], **extra}
    return call(conn, "POST", "/v1/chat/completions", body)


def test_a_steered_request_runs_on_the_tensor_parallel_engine(server, setup):
    with connection(server) as (conn, _):
        status, headers, body = chat(server, conn, steering_profile="steer",
                                     capture_routing=True)
    assert status == 200, body
    assert headers["x-steermoe-steering"].startswith("profile=steer;")
    assert body["routing"]["moe_layers"] == setup["moe_layers"]
    assert_follows(body["routing"], *STEER)


def test_inline_steering_of_the_last_layer_only(server):
    activate, deactivate = INLINE
    steering = {"activate": {str(k): v for k, v in activate.items()},
                "deactivate": {str(k): v for k, v in deactivate.items()}}
    with connection(server) as (conn, _):
        status, _, body = chat(server, conn, steering=steering, capture_routing=True)
    assert status == 200, body
    assert_follows(body["routing"], *INLINE)


def test_every_api_process_enforces_the_same_policy_and_sees_new_profiles(server, setup):
    seen: dict[int, bool] = {}
    added = False
    for _ in range(40):
        with connection(server) as (conn, owner):
            assert owner is not None, "no server process holds the connection"
            status, _, body = chat(server, conn, steering_profile="hidden")
            assert status == 403, body
            status, headers, body = chat(server, conn, steering_profile="steer",
                                         capture_routing=True)
            assert status == 200, body
            assert_follows(body["routing"], *STEER)
            if not added:  # added through this process's admin API, on the shared directory
                profile = {"format": "steermoe-profile/1", "name": "added",
                           "model": setup["model"],
                           "activate": {str(k): v for k, v in ADDED[0].items()},
                           "deactivate": {str(k): v for k, v in ADDED[1].items()}}
                status, _, body = call(conn, "PUT", "/v1/steering/profiles/added", profile,
                                       token=ADMIN_TOKEN)
                assert status == 201, body
                added = True
            status, headers, body = chat(server, conn, steering_profile="added",
                                         capture_routing=True)
            assert status == 200, body
            assert headers["x-steermoe-steering"].startswith("profile=added;")
            assert_follows(body["routing"], *ADDED)
            seen[owner] = True
        if len(seen) >= 2:
            break
    assert len(seen) == 2, f"connections reached only API processes {sorted(seen)}"
