"""docker-compose.yml validated against the Compose Specification schema, and checked to agree with the
Dockerfile, the HAProxy and Prometheus configs, the Grafana provisioning and the server's own settings."""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
PROMETHEUS_CONF = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"


def _compose_schema() -> dict[str, Any]:
    """The Compose Specification JSON schema as vendored (offline) by the check-jsonschema package."""
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", duration))


def _mount(service: dict[str, Any], target: str) -> dict[str, Any]:
    (mount,) = [v for v in service["volumes"] if isinstance(v, dict) and v["target"] == target]
    return mount


@pytest.fixture(scope="module")
def settings(compose: dict[str, Any], settings_from_env: Any) -> Any:
    """The Settings a compose replica runs with (its CONVSERVE_* environment, nothing else)."""
    return settings_from_env(compose["services"]["convserve"]["environment"])


# ---- the file itself -------------------------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_specification(compose: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(_compose_schema())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    # Strict enough to catch a misspelt key and a wrong type (so the check above means something).
    broken = copy.deepcopy(compose)
    broken["services"]["convserve"]["stop_grace_periode"] = "25s"
    broken["services"]["lb"]["ports"] = "8001:8001"
    assert len(list(validator.iter_errors(broken))) >= 2


def test_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"convserve", "convserve-gpu", "lb", "prometheus", "grafana", "train"} <= set(services)
    assert "profiles" not in services["convserve"]  # `docker compose up` starts the CPU stack
    assert services["convserve-gpu"]["profiles"] == ["gpu"]
    assert services["train"]["profiles"] == ["train"]
    for name in ("lb", "prometheus", "grafana"):
        image = re.sub(r"^\$\{\w+:-(.*)\}$", r"\1", services[name]["image"])  # an override's default
        assert re.search(r":v?\d+\.\d+\.\d+(-\w+)?$", image), f"{name}: image not pinned by version: {image}"


# ---- convserve replicas ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["convserve", "convserve-gpu"])
def test_replica_builds_from_the_dockerfile_and_uses_only_settings_the_server_reads(
    compose: dict[str, Any], dockerfile: Any, settings_from_env: Any, name: str
) -> None:
    service = compose["services"][name]
    assert service["build"]["context"] == "."
    assert service["build"]["target"] in dockerfile.stages
    settings = settings_from_env(service["environment"])
    image_env = {
        k: v
        for k, v in dockerfile.stages[service["build"]["target"]].env().items()
        if k.startswith("CONVSERVE_")
    }
    image = settings_from_env(image_env)
    assert "CONVSERVE_HTTP_PORT" in service["environment"]  # named, as in the image
    for key in ("http_port", "grpc_port", "metrics_port", "model_repository", "host", "execution_providers"):
        assert getattr(settings, key) == getattr(image, key), f"{name}: {key} differs from the image's"


@pytest.mark.parametrize("name", ["convserve", "convserve-gpu"])
def test_replica_ports_health_volume_and_shutdown_agree_with_the_server(
    compose: dict[str, Any], dockerfile: Any, settings_from_env: Any, served_ports: Any, name: str
) -> None:
    service = compose["services"][name]
    settings = settings_from_env(service["environment"])
    # Every port the server listens on (REST, gRPC, metrics), published with no fixed host port, so
    # `--scale` cannot collide; loopback only on the host.
    assert sorted(p["target"] for p in service["ports"]) == sorted(served_ports(settings).values())
    assert all("published" not in p and p["host_ip"] == "127.0.0.1" for p in service["ports"])
    # Same health command as the image's HEALTHCHECK (`sh -c SCRIPT` there, CMD-SHELL here; compose
    # reads `$$` as a literal `$`, so the container's shell expands the port).
    (health,) = dockerfile.stages[service["build"]["target"]].args_of("HEALTHCHECK")
    shell, flag, script = json.loads(health.partition(" CMD ")[2])
    kind, compose_script = service["healthcheck"]["test"]
    assert (shell, flag, kind) == ("sh", "-c", "CMD-SHELL")
    assert compose_script.replace("$$", "$") == script
    # The repository is mounted read-only where the server looks for it.
    mount = _mount(service, settings.model_repository)
    assert mount["type"] == "bind" and mount["read_only"] is True
    assert (ROOT / mount["source"]).is_dir()
    # Docker waits at least the whole drain before SIGKILL, and not much longer.
    assert service["stop_signal"] == "SIGTERM"
    grace = _seconds(service["stop_grace_period"])
    assert settings.drain_grace_seconds < grace <= settings.drain_grace_seconds + 10
    assert service["restart"] == "unless-stopped"
    assert service["read_only"] is True and "/tmp" in service["tmpfs"]
    limits = service["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) > 0 and re.fullmatch(r"\d+[mg]", limits["memory"])


def test_cpu_replica_runs_one_worker_per_cpu_of_its_limit(compose: dict[str, Any], settings: Any) -> None:
    assert settings.workers == 0  # one per usable core: the container's cpus limit (cgroup quota)
    assert float(compose["services"]["convserve"]["deploy"]["resources"]["limits"]["cpus"]) >= 2


def test_gpu_variant_reserves_an_nvidia_device_and_tries_cuda_first(
    compose: dict[str, Any], settings_from_env: Any
) -> None:
    service = compose["services"]["convserve-gpu"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert settings_from_env(service["environment"]).execution_providers[0] == "cuda"
    # One process drives the GPU: each further worker would hold its own copy of the models on the device.
    assert settings_from_env(service["environment"]).workers == 1
    # Found by the load balancer and Prometheus under the CPU replicas' name.
    assert "convserve" in service["networks"]["default"]["aliases"]


def test_train_job_runs_real_convserve_commands_into_the_mounted_repository(
    compose: dict[str, Any], dockerfile: Any, settings: Any
) -> None:
    from convserve.cli import build_parser

    service = compose["services"]["train"]
    assert service["build"]["target"] == "train" and service["restart"] == "no"
    mount = _mount(service, settings.model_repository)
    assert not mount.get("read_only", False) and mount["source"] == "./model_repository"
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    steps = [shlex.split(step) for step in service["command"][0].split("&&")]
    assert [s[:2] for s in steps] == [["convserve", "train"], ["convserve", "export"]]
    train, export = (build_parser().parse_args(s[1:]) for s in steps)
    assert Path(export.checkpoint) == Path(train.out) / "checkpoint.pt"
    assert str(export.repository) == settings.model_repository
    assert export.version is None  # the next free version: never overwrites what is being served


# ---- load balancer ---------------------------------------------------------------------------------------


def _haproxy_sections(text: str) -> dict[str, list[list[str]]]:
    """``"section name" → [keyword, args...]`` lines, comments dropped."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if not raw[0].isspace():
            current = sections.setdefault(" ".join(words), [])
        else:
            current.append(words)
    return sections


def test_load_balancer_publishes_grpc_and_rest_and_balances_the_replicas_by_dns_name(
    compose: dict[str, Any], settings: Any, rest_route: Any
) -> None:
    lb = compose["services"]["lb"]
    ports = {p["target"]: p for p in lb["ports"]}
    assert sorted(ports) == sorted([settings.grpc_port, settings.http_port])
    overrides = {settings.grpc_port: "CONVSERVE_LB_PORT", settings.http_port: "CONVSERVE_LB_HTTP_PORT"}
    for target, override in overrides.items():
        assert ports[target]["published"] == f"${{{override}:-{target}}}"
        assert ports[target]["host_ip"] == "${CONVSERVE_PUBLISH_IP:-0.0.0.0}"  # both follow the one override
    conf = _mount(lb, "/usr/local/etc/haproxy/haproxy.cfg")  # where the haproxy image reads it
    assert (ROOT / conf["source"]).resolve() == HAPROXY_CFG and conf["read_only"] is True
    sections = _haproxy_sections(HAPROXY_CFG.read_text())
    assert ["bind", f":{settings.grpc_port}", "proto", "h2"] in sections["frontend grpc"]  # h2c in
    (template,) = [w for w in sections["backend convserve"] if w[0] == "server-template"]
    # One name, every replica behind it (h2c out), re-resolved through Docker's embedded DNS.
    assert template[3] == f"convserve:{settings.grpc_port}"
    assert template[template.index("proto") + 1] == "h2"
    assert template[template.index("resolvers") + 1] == "docker"
    assert ["nameserver", "dns", "127.0.0.11:53"] in sections["resolvers docker"]
    assert ["balance", "roundrobin"] in sections["backend convserve"]
    # Only connection failures are retried: a call that reached a replica never runs twice.
    assert ["retry-on", "conn-failure"] in sections["defaults"]

    # v2 REST: HTTP/1.1 in and out, to the same replicas' REST port, by the same DNS name.
    assert ["bind", f":{settings.http_port}"] in sections["frontend rest"]
    (backend,) = [w[1] for w in sections["frontend rest"] if w[0] == "default_backend"]
    rest = sections[f"backend {backend}"]
    (template,) = [w for w in rest if w[0] == "server-template"]
    assert template[3] == f"convserve:{settings.http_port}" and "proto" not in template
    assert template[template.index("resolvers") + 1] == "docker" and "check" in template
    assert ["balance", "roundrobin"] in rest
    # Its health check asks readiness, which the server answers without a token and while draining
    # (400 then), so a draining replica leaves the rotation.
    (check,) = [w for w in rest if w[:2] == ["option", "httpchk"]]
    method, path = check[2:]
    assert method == "GET" and rest_route(path) == ("ready", True, True)
    assert ["http-check", "expect", "status", "200"] in rest


def test_haproxy_config_passes_haproxy_c(system_binary: Any) -> None:
    haproxy = system_binary("haproxy", "/usr/sbin/haproxy")
    result = subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- Prometheus and Grafana ------------------------------------------------------------------------------


def test_prometheus_discovers_every_replica_by_dns_on_the_metrics_port(
    compose: dict[str, Any], settings: Any
) -> None:
    prometheus = compose["services"]["prometheus"]
    mount = _mount(prometheus, "/etc/prometheus/prometheus.yml")
    assert (ROOT / mount["source"]).resolve() == PROMETHEUS_CONF and mount["read_only"] is True
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load(PROMETHEUS_CONF.read_text())
    (job,) = [j for j in config["scrape_configs"] if j.get("dns_sd_configs")]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["convserve"] and sd["type"] == "A" and sd["port"] == settings.metrics_port
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_config_passes_promtool(system_binary: Any, tmp_path: Path) -> None:
    promtool = system_binary("promtool", "/usr/bin/promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONF)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_is_provisioned_with_the_prometheus_service_and_the_dashboard(
    compose: dict[str, Any],
) -> None:
    grafana = compose["services"]["grafana"]
    provisioning = _mount(grafana, "/etc/grafana/provisioning")
    assert (ROOT / provisioning["source"]).resolve() == GRAFANA / "provisioning"
    (datasource,) = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    prometheus_port = compose["services"]["prometheus"]["ports"][0]["target"]  # the in-network port
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
    (provider,) = yaml.safe_load((GRAFANA / "provisioning/dashboards/convserve.yml").read_text())["providers"]
    dashboards = _mount(grafana, provider["options"]["path"])
    assert (ROOT / dashboards["source"]).resolve() == GRAFANA / "dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    relative = Path(home).relative_to(provider["options"]["path"])
    dashboard = json.loads((GRAFANA / "dashboards" / relative).read_text())
    # Panels name the provisioned datasource (directly or through the datasource variable).
    uses = {json.dumps(p.get("datasource")) for p in dashboard["panels"] if p.get("type") != "row"}
    assert uses <= {
        json.dumps({"type": "prometheus", "uid": "${datasource}"}),
        json.dumps({"type": "prometheus", "uid": datasource["uid"]}),
    }
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
