"""The Kubernetes example in docker/k8s: valid manifests, a profile valid for the model they
serve, the admin token only from a mounted Secret file, /health and /metrics wired."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from expert_profiles.model_shape import shape_from_hf_config  # noqa: E402
from expert_profiles.schema import SteeringProfile  # noqa: E402
from profile_tools.checkpoint_factory import checkpoint_config  # noqa: E402

K8S = Path(__file__).resolve().parents[2] / "docker" / "k8s"


def manifests() -> dict[str, list[dict]]:
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
            for path in sorted(K8S.glob("*.yaml"))}


def pod_specs():
    for docs in manifests().values():
        for doc in docs:
            if doc["kind"] == "Deployment":
                yield doc["spec"]["template"]["spec"]
            elif doc["kind"] == "LeaderWorkerSet":
                template = doc["spec"]["leaderWorkerTemplate"]
                yield template["leaderTemplate"]["spec"]
                yield template["workerTemplate"]["spec"]


def test_the_profiles_are_valid_for_the_served_model():
    (configmap,) = manifests()["profiles-configmap.yaml"]
    shape = shape_from_hf_config(checkpoint_config("qwen3_moe", size="real"))
    for name, text in configmap["data"].items():
        profile = SteeringProfile.model_validate(json.loads(text))
        assert f"{profile.name}.json" == name
        profile.check_model(shape)
    for spec in pod_specs():
        for container in spec["containers"]:
            text = " ".join(container.get("args", []))
            assert "Qwen/Qwen3-30B-A3B" in text or "ray start" in text


def test_servers_read_the_token_from_a_secret_file_and_expose_health_and_metrics():
    servers = 0
    for spec in pod_specs():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            text = " ".join(container.get("args", []))
            assert "--admin-token " not in text and "--admin-token=" not in text
            if "steermoe serve" not in text and container["args"][0] != "Qwen/Qwen3-30B-A3B":
                continue
            servers += 1
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["httpGet"]["path"] == "/health"
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "configMap" in volumes[mounts["/profiles"]]
            if "--admin-token-file" in text:
                secret = volumes[mounts["/run/secrets/steermoe"]]["secret"]
                assert secret["secretName"] == "steermoe-admin"
    assert servers == 2
    annotated = [doc for docs in manifests().values() for doc in docs
                 if doc["kind"] == "ServiceMonitor"]
    assert annotated[0]["spec"]["endpoints"][0]["path"] == "/metrics"
