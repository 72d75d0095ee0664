"""infra/deploy/k8s validated offline: every resource against the Kubernetes schemas (kubernetes-validate,
strict: an unknown field fails), and against the code it deploys (CLI flags, routes, settings, policies).

`python -m tests.infra.integrations.test_k8s_manifests` rewrites k8s/policies.yaml from infra/policies.yaml.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from activities.sidecar_worker import GRACEFUL_SHUTDOWN_S
from api.policy_file import load_policies
from api.settings import ApiSettings, parse_sidecar_urls
from infra.cli import build_parser
from infra.paths import PROJECT_ROOT

K8S_DIR = PROJECT_ROOT / "infra" / "deploy" / "k8s"
DOCKERFILE = PROJECT_ROOT / "infra" / "deploy" / "Dockerfile"
POLICIES = PROJECT_ROOT / "infra" / "policies.yaml"
KUBERNETES_VERSION = "1.33.0"
POLICIES_HEADER = """\
# infra/policies.yaml as a ConfigMap, mounted at /etc/lipsync/policies.yaml (LIPSYNC_POLICIES).
# Edit the policy here for this deployment; tests/infra/integrations/test_k8s_manifests.py checks that it
# loads, and that it matches infra/policies.yaml until a deployment means it to differ.
apiVersion: v1
kind: ConfigMap
metadata:
  name: lipsync-policies
data:
  policies.yaml: |
"""


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def resources() -> list[dict[str, Any]]:
    found = []
    for path in manifest_files():
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def named(kind: str, name: str) -> dict[str, Any]:
    matches = [r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def render_policies_configmap() -> str:
    lines = POLICIES.read_text().splitlines(keepends=True)
    return POLICIES_HEADER + "".join(("    " + line) if line.strip() else "\n" for line in lines)


def test_every_resource_is_valid_for_kubernetes() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifest_files())
    docs = resources()
    assert {r["kind"] for r in docs} >= {
        "Namespace", "ConfigMap", "Secret", "Deployment", "StatefulSet", "Service", "PodDisruptionBudget"
    }  # fmt: skip
    for resource in docs:
        try:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{resource['kind']}/{resource['metadata']['name']}: {path}: {exc.message}")


def test_the_schema_check_catches_a_wrong_field() -> None:
    broken = named("Deployment", "lipsync-api")
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_each_tier_runs_a_real_command_with_probes_that_exist() -> None:
    parser = build_parser()
    api, worker, sidecar = (
        named("Deployment", "lipsync-api"),
        named("Deployment", "lipsync-worker"),
        named("StatefulSet", "lipsync-sidecar"),
    )
    for workload, command in ((api, "api"), (worker, "worker"), (sidecar, "sidecar")):
        args = container(workload)["args"]
        assert args[0] == command
        parser.parse_args(args)  # an unknown or malformed flag exits 2 here, not in the cluster
    from api.app import create_app

    routes = create_app(ApiSettings(api_keys=("k",), livekit_api_secret="s")).openapi()["paths"]
    assert container(api)["readinessProbe"]["httpGet"]["path"] == "/readyz" and "/readyz" in routes
    assert container(api)["livenessProbe"]["httpGet"]["path"] in routes
    sidecar_server = (PROJECT_ROOT / "realtime" / "sidecar" / "server.py").read_text()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert f'@app.get("{container(sidecar)[probe]["httpGet"]["path"]}")' in sidecar_server


def test_sidecars_one_per_gpu_with_stable_addresses_the_api_knows() -> None:
    sidecar = named("StatefulSet", "lipsync-sidecar")
    resources_ = container(sidecar)["resources"]
    assert resources_["requests"]["nvidia.com/gpu"] == resources_["limits"]["nvidia.com/gpu"] == 1
    service = named("Service", sidecar["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS name per pod
    namespace = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["namespace"]
    port = container(sidecar)["ports"][0]["containerPort"]
    urls = parse_sidecar_urls(named("ConfigMap", "lipsync-config")["data"]["LIPSYNC_SIDECAR_URLS"])
    name = sidecar["metadata"]["name"]
    expected = {
        f"{name}-{i}": f"http://{name}-{i}.{service['metadata']['name']}.{namespace}.svc.cluster.local:{port}"
        for i in range(sidecar["spec"]["replicas"])
    }
    assert urls == expected
    assert "--host=0.0.0.0" in container(sidecar)["args"]


def test_graceful_stops_fit_their_grace_periods_and_disruption_budgets_cover_every_tier() -> None:
    workloads = [named("Deployment", "lipsync-api"), named("Deployment", "lipsync-worker")]
    workloads.append(named("StatefulSet", "lipsync-sidecar"))
    budgets = [r for r in resources() if r["kind"] == "PodDisruptionBudget"]
    for workload in workloads:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, workload["metadata"]["name"]
        budget = covering[0]["spec"]
        replicas = workload["spec"]["replicas"]
        assert (
            budget.get("minAvailable", replicas - budget.get("maxUnavailable", 0)) < replicas
        )  # drains can proceed
        grace = pod_spec(workload)["terminationGracePeriodSeconds"]
        pre_stop = (
            container(workload).get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        )
        pre_stop_s = float(pre_stop[-1]) if pre_stop[:1] == ["sleep"] else 0.0
        assert grace >= pre_stop_s + 20, workload["metadata"]["name"]
    sidecar_grace = pod_spec(workloads[2])["terminationGracePeriodSeconds"]
    assert sidecar_grace >= 10 * GRACEFUL_SHUTDOWN_S  # hand-over, then every session's teardown


def test_config_secret_and_policies_are_what_the_code_reads(tmp_path: Path) -> None:
    config = named("ConfigMap", "lipsync-config")["data"]
    sources = "".join(
        p.read_text() for p in [*(PROJECT_ROOT / "api").glob("*.py"), *(PROJECT_ROOT / "infra").rglob("*.py")]
    )
    for key in config:
        assert re.search(rf"[\"']{key}[\"']", sources), f"{key} is read by no code"
    secret = named("Secret", "lipsync-secrets")["stringData"]
    assert set(secret) == {
        "LIPSYNC_API_KEYS",
        "LIVEKIT_API_KEY",
        "LIVEKIT_API_SECRET",
        "LIPSYNC_SIDECAR_SECRET",
    }
    sidecar_env = {e["name"] for e in container(named("StatefulSet", "lipsync-sidecar"))["env"]}
    assert "LIPSYNC_SIDECAR_SECRET" in sidecar_env  # the sidecar refuses to start without it
    assert all(value == "" for value in secret.values()), "never ship credentials"
    api = named("Deployment", "lipsync-api")
    mounts = {m["name"]: m["mountPath"] for m in container(api)["volumeMounts"]}
    assert config["LIPSYNC_POLICIES"] == f"{mounts['policies']}/policies.yaml"
    embedded = named("ConfigMap", "lipsync-policies")["data"]["policies.yaml"]
    assert embedded == POLICIES.read_text(), (
        "k8s/policies.yaml differs from infra/policies.yaml: run python -m "
        "tests.infra.integrations.test_k8s_manifests"
    )
    policy_file = tmp_path / "policies.yaml"
    policy_file.write_text(embedded)
    load_policies(policy_file)  # what the API does at start: a bad key is refused with its name
    images = {i["name"] for i in yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["images"]}
    for workload in (api, named("Deployment", "lipsync-worker"), named("StatefulSet", "lipsync-sidecar")):
        assert container(workload)["image"] in images


def test_the_dockerfile_copies_paths_that_exist() -> None:
    text = DOCKERFILE.read_text()
    sources = [
        part
        for line in text.splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for part in line.split()[1:-1]  # the last word is the destination
    ]
    assert "infra/integrations/lipsync-client/" in sources
    for source in sources:
        assert (PROJECT_ROOT / source).exists(), source
    assert re.search(r"ENTRYPOINT \[\"lipsync\"\]", text)


if __name__ == "__main__":
    (K8S_DIR / "policies.yaml").write_text(render_policies_configmap())
    sys.stdout.write(f"rewrote {K8S_DIR / 'policies.yaml'}\n")
