"""Kubernetes manifests validated offline by kubernetes-validate (strict: unknown fields fail), and the
KServe runtime checked structurally; both checked to agree with the image and the server's settings.
No live cluster is involved."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
K8S_VERSION = "1.30"  # gRPC probes are GA since 1.27, the preStop `sleep` action since 1.30


def _documents(folder: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    return _documents(K8S)


@pytest.fixture(scope="module")
def deployment(k8s: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(k8s, "Deployment")


@pytest.fixture(scope="module")
def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


@pytest.fixture(scope="module")
def settings(container: dict[str, Any], settings_from_env: Any) -> Any:
    return settings_from_env({e["name"]: e["value"] for e in container["env"]})


def _validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_manifest_validates_against_the_kubernetes_schema(k8s: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in k8s)
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "Service"]
    for doc in k8s:
        _validate(doc)


def test_the_validator_rejects_unknown_fields_and_wrong_types(deployment: dict[str, Any]) -> None:
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 8001}}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(misspelt)
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(wrong)


def test_container_matches_the_image_and_the_server_settings(
    container: dict[str, Any], settings: Any, dockerfile: Any, compose: dict[str, Any], served_ports: Any
) -> None:
    # compose names it `${CONVSERVE_IMAGE:-<default>}`: the default is the image both deploy.
    assert f"${{CONVSERVE_IMAGE:-{container['image']}}}" == compose["services"]["convserve"]["image"]
    assert "command" not in container and "args" not in container  # the image's `convserve serve`
    assert "CONVSERVE_HTTP_PORT" in {e["name"] for e in container["env"]}  # named, as in the image
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == served_ports(settings)  # http (v2 REST), grpc, metrics
    (expose,) = dockerfile.stages["cpu"].args_of("EXPOSE")
    assert sorted(ports.values()) == sorted(int(p) for p in expose.split())
    assert settings.host == "0.0.0.0"
    image_env = {k: v for k, v in dockerfile.stages["cpu"].env().items() if k.startswith("CONVSERVE_")}
    assert settings.model_repository == image_env["CONVSERVE_MODEL_REPOSITORY"]


@pytest.mark.parametrize(
    ("probe", "route"), [("startupProbe", "ready"), ("readinessProbe", "ready"), ("livenessProbe", "live")]
)
def test_probes_ask_the_v2_rest_health_endpoints(
    container: dict[str, Any], settings: Any, rest_route: Any, probe: str, route: str
) -> None:
    (kind,) = set(container[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"}
    assert kind == "httpGet"
    get = container[probe]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports.get(get["port"], get["port"]) == settings.http_port  # a named port resolves to the REST one
    # The route the server serves there: answered without a token (probes carry none, whatever the token
    # settings) and while draining (readiness then says 400, so endpoints drop the pod).
    assert rest_route(get["path"]) == (route, True, True)
    # The REST port speaks HTTPS exactly when the server has a certificate.
    assert get.get("scheme", "HTTP") == ("HTTPS" if settings.tls_enabled else "HTTP")


def test_liveness_outlasts_the_drain(container: dict[str, Any], settings: Any) -> None:
    liveness = container["livenessProbe"]
    # Liveness must not kill a draining pod before the drain ends.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > settings.drain_grace_seconds


def test_workers_follow_the_cpu_limit(container: dict[str, Any], settings: Any) -> None:
    # 0 = one worker per usable core, which in a pod is its CPU limit (the cgroup quota, processes/cores.py).
    assert settings.workers == 0
    assert float(container["resources"]["limits"]["cpu"]) >= 2  # so the default runs more than one worker


def test_shutdown_gives_the_server_its_whole_drain(
    deployment: dict[str, Any], container: dict[str, Any], settings: Any
) -> None:
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop + settings.drain_grace_seconds


def test_runs_non_root_on_a_read_only_root_filesystem(
    deployment: dict[str, Any], container: dict[str, Any], dockerfile: Any
) -> None:
    pod = deployment["spec"]["template"]["spec"]
    (user,) = dockerfile.stages["cpu"].args_of("USER")
    uid, gid = (int(x) for x in user.split(":"))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])


def test_prometheus_scrape_annotations_point_at_the_metrics_port(
    deployment: dict[str, Any], settings: Any
) -> None:
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j.get("dns_sd_configs")]
    assert annotations["prometheus.io/path"] == job.get("metrics_path", "/metrics")


def test_services_hpa_and_pdb_select_the_deployment(
    k8s: list[dict[str, Any]], deployment: dict[str, Any], container: dict[str, Any]
) -> None:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    named_ports = {p["name"] for p in container["ports"]}
    for service in (d for d in k8s if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named_ports
    service_ports = {p["name"]: p for p in _one(k8s, "Service", "convserve")["spec"]["ports"]}
    assert service_ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    # The REST port is on the Service under its container port number, like gRPC and metrics.
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {n: (p["targetPort"], p["port"]) for n, p in service_ports.items()} == {
        n: (n, port) for n, port in container_ports.items()
    }
    assert service_ports["http"]["appProtocol"] == "http"
    assert _one(k8s, "Service", "convserve-headless")["spec"]["clusterIP"] == "None"
    hpa = _one(k8s, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 1 <= hpa["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["maxReplicas"]
    pdb = _one(k8s, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] < hpa["minReplicas"]  # a node drain can always proceed


# ---- KServe ---------------------------------------------------------------------------------------------

# Field names of KServe's ServingRuntimeSpec (serving.kserve.io/v1alpha1, with its inlined pod spec).
SERVING_RUNTIME_FIELDS = {
    "supportedModelFormats",
    "multiModel",
    "disabled",
    "protocolVersions",
    "workerSpec",
    "containers",
    "volumes",
    "nodeSelector",
    "affinity",
    "tolerations",
    "labels",
    "annotations",
    "imagePullSecrets",
    "hostIPC",
    "grpcEndpoint",
    "grpcDataEndpoint",
    "httpDataEndpoint",
    "replicas",
    "storageHelper",
    "builtInAdapter",
}
PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}


@pytest.fixture(scope="module")
def kserve() -> list[dict[str, Any]]:
    return _documents(KSERVE)


def test_serving_runtime_structure(kserve: list[dict[str, Any]]) -> None:
    runtime = _one(kserve, "ServingRuntime")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert set(spec) <= SERVING_RUNTIME_FIELDS, set(spec) - SERVING_RUNTIME_FIELDS
    assert set(spec["protocolVersions"]) <= PROTOCOLS and "grpc-v2" in spec["protocolVersions"]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the name KServe injects the model mount into
    # The pod parts are core Kubernetes types: validate them as a Pod would be.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "convserve"},
        "spec": {"containers": spec["containers"], "volumes": spec.get("volumes", [])},
    }
    _validate(pod)


def test_serving_runtime_arguments_are_real_serve_flags(
    kserve: list[dict[str, Any]], settings_from_env: Any, dockerfile: Any, rest_route: Any
) -> None:
    from convserve.server.settings import from_args

    spec = _one(kserve, "ServingRuntime")["spec"]
    (container,) = spec["containers"]
    assert dockerfile.stages["cpu"].exec_form("ENTRYPOINT") == ["convserve", "serve"]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    settings_from_env(env)  # only names the server reads
    settings = from_args(container["args"], env=env)  # what `convserve serve ARGS` resolves to
    assert settings.model_repository == "/mnt/models"  # where KServe's storage initializer puts storageUri
    # The one port Knative routes is the REST port: `http1` is how KServe/Knative name HTTP/1.1 (h2c = gRPC).
    (port,) = container["ports"]
    assert port["name"] == "http1" and port["containerPort"] == settings.http_port
    assert settings.grpc_port > 0  # gRPC listens in the pod too; an InferenceService may declare it
    probe = container["readinessProbe"]["httpGet"]
    assert probe["port"] == settings.http_port and probe.get("scheme", "HTTP") == "HTTP"
    assert rest_route(probe["path"]) == ("ready", True, True)
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(settings.metrics_port)
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_inference_service_uses_the_runtime_over_v2_rest_and_grpc(kserve: list[dict[str, Any]]) -> None:
    from convserve.server.settings import from_args

    runtime = _one(kserve, "ServingRuntime")
    isvc = _one(kserve, "InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    # v2 = REST on the runtime's primary port; the h2c port it adds (KServe merges the two lists by
    # containerPort) is the runtime's gRPC port, so RawDeployment's Service routes both.
    assert model["protocolVersion"] == "v2"
    assert {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    (container,) = runtime["spec"]["containers"]
    settings = from_args(container["args"], env={e["name"]: e["value"] for e in container.get("env", [])})
    (grpc,) = model["ports"]
    assert grpc["name"] == "h2c" and grpc["containerPort"] == settings.grpc_port
    merged = {p["containerPort"]: p["name"] for p in [*container["ports"], *model["ports"]]}
    assert merged == {settings.http_port: "http1", settings.grpc_port: "h2c"}
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["storageUri"].split("://")[0] in {"pvc", "s3", "gs", "https", "hdfs", "oci"}
    assert json.dumps(isvc).count("CONVSERVE_") == 0  # settings live in the runtime, not per service


# ---- Prometheus Operator and the custom-metrics HPA ---------------------------------------------------

OPERATOR = K8S / "prometheus-operator"


@pytest.fixture(scope="module")
def operator() -> list[dict[str, Any]]:
    return _documents(OPERATOR)


def test_service_monitor_scrapes_the_metrics_port_of_the_convserve_service_only(
    k8s: list[dict[str, Any]], operator: list[dict[str, Any]], deployment: dict[str, Any]
) -> None:
    monitor = _one(operator, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [s for s in k8s if s["kind"] == "Service"]
    selected = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
    (endpoint,) = monitor["spec"]["endpoints"]
    # Only Services that have the endpoint's named port are scraped: exactly one, so no pod twice.
    scraped = [s for s in selected if endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}]
    assert [s["metadata"]["name"] for s in scraped] == ["convserve"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert endpoint["path"] == annotations["prometheus.io/path"]  # the same endpoint both ways
    (port,) = [p for p in scraped[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert str(port["port"]) == annotations["prometheus.io/port"]
    interval, timeout = (float(endpoint[k].rstrip("s")) for k in ("interval", "scrapeTimeout"))
    assert 0 < timeout < interval


def _server_families() -> dict[str, str]:
    """Metric family name → type, as convserve's /metrics declares them."""
    from prometheus_client import CollectorRegistry

    from convserve.server.observability.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry)
    return {family.name: family.type for family in registry.collect()}


def test_custom_metrics_hpa_scales_on_cpu_request_rate_and_queue_time_served_by_the_adapter(
    k8s: list[dict[str, Any]], operator: list[dict[str, Any]]
) -> None:
    hpa = _one(operator, "HorizontalPodAutoscaler")
    _validate(hpa)
    plain = _one(k8s, "HorizontalPodAutoscaler")
    # A replacement for hpa.yaml, not a second HPA beside it: same name, same target, same bounds.
    assert hpa["metadata"]["name"] == plain["metadata"]["name"]
    for key in ("scaleTargetRef", "minReplicas", "maxReplicas", "behavior"):
        assert hpa["spec"][key] == plain["spec"][key]
    metrics = hpa["spec"]["metrics"]
    assert plain["spec"]["metrics"][0] in metrics  # CPU as before
    pods = {m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"}
    assert pods == {"convserve_requests_per_second", "convserve_queue_wait_seconds"}

    (adapter,) = [d for d in operator if "rules" in d]
    served = {rule["name"]["as"]: rule for rule in adapter["rules"]}
    assert pods <= served.keys()
    families = _server_families()
    assert families["convserve_requests"] == "counter"  # exposed as convserve_requests_total
    assert families["convserve_queue_wait_seconds"] == "histogram"  # _sum and _count
    for rule in served.values():
        series = rule["seriesQuery"].split("{")[0]
        assert re.fullmatch(rule["name"]["matches"], series)
        # Every series a rule reads is one the server exports (counter _total; histogram _sum/_count).
        for name in re.findall(r"\bconvserve_\w+", rule["metricsQuery"] + rule["seriesQuery"]):
            base = re.sub(r"_(total|sum|count|bucket)$", "", name)
            assert base in families, f"{name}: convserve exports no such series"
        # Per-pod values: the Operator's namespace/pod labels map to the HPA's resources.
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"}, "pod": {"resource": "pod"},
        }  # fmt: skip
