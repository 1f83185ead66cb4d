"""docker/compose.yml without a Docker engine (none on our machines).

The file is checked against the Compose Specification schema (vendored in check-jsonschema),
and for what the schema cannot see: each service's command is a real `ike-cluster`
subcommand, every mounted file exists, ports and secrets agree with config/cluster.toml and
docker/prometheus.yml, scaled services publish nothing fixed, and the Grafana dashboard
queries only metrics the project exports. The topology itself runs as processes in network
namespaces in tests/interop.
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
from ruamel.yaml import YAML

from cluster import metrics
from cluster.cli import build_parser
from cluster.config import MetricsConfig, NodeConfig, load_config

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yml"
CLUSTER_TOML = REPO / "config" / "cluster.toml"
DASHBOARDS = DOCKER / "grafana" / "dashboards"
IKE_SERVICES = {"responder", "worker"}  # the services that run the image built from the repo
SCALED = ("responder",)  # README: docker compose up --scale responder=3
GENERATED = {"cluster.key": "keygen > "}  # host files the user makes; how, say the docs
WORKER_CAPS = {"NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"}
WILDCARDS = ("0.0.0.0", "::")
PSK = "compose-test-psk"


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = load_yaml(COMPOSE)
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def cluster_toml() -> dict[str, Any]:
    return tomllib.loads(CLUSTER_TOML.read_text())


def ike_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {
        name: service
        for name, service in compose["services"].items()
        if service.get("build", {}).get("dockerfile") == "docker/Dockerfile"
    }
    assert set(found) == IKE_SERVICES
    return found


def compose_schema_validator(schema: dict[str, Any]) -> Any:
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@pytest.fixture(scope="module")
def validator() -> Any:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return compose_schema_validator(schema)


def schema_errors(validator: Any, document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def test_compose_file_follows_the_compose_specification(
    validator: Any, compose: dict[str, Any]
) -> None:
    assert schema_errors(validator, compose) == []


def test_the_schema_check_rejects_a_mistake(validator: Any, compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["cap_addd"] = ["NET_ADMIN"]  # a typo of cap_add
    broken["services"]["redis"]["ports"] = {"6379": 6379}
    errors = schema_errors(validator, broken)
    assert any(e.startswith("services/worker") for e in errors), errors
    assert any(e.startswith("services/redis/ports") for e in errors), errors


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("ike-cluster has no subcommands")


def bind_mounts(service: dict[str, Any]) -> Iterator[tuple[str, str, list[str]]]:
    """(host source, container target, options) of each short-syntax bind mount."""
    for volume in service.get("volumes", ()):
        assert isinstance(volume, str), f"long volume syntax is not checked here: {volume}"
        source, target, *options = volume.split(":")
        if source.startswith((".", "/")):
            yield source, target, options


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """Where a path inside the container comes from in the repository (the longest mount)."""
    path = PurePosixPath(container_path)
    best: tuple[int, Path] | None = None
    for source, target, _ in bind_mounts(service):
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            relative = path.relative_to(target)
            depth = len(PurePosixPath(target).parts)
            if best is None or depth > best[0]:
                best = (depth, (DOCKER / source / relative).resolve())
    assert best is not None, f"{container_path} is not mounted into the container"
    return best[1]


def test_every_ike_cluster_command_is_a_real_subcommand_with_valid_arguments(
    compose: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    known = subcommands(parser)
    for name, service in ike_services(compose).items():
        command = service["command"]
        assert isinstance(command, list), f"{name}: give the command as a list"
        assert command[0] in known, f"{name}: {command[0]!r} is not one of {sorted(known)}"
        try:
            args = parser.parse_args(command)
        except SystemExit:
            pytest.fail(f"{name}: ike-cluster {' '.join(command)}: {capsys.readouterr().err}")
        config = host_path(service, args.config)
        assert config == CLUSTER_TOML, f"{name}: --config {args.config} is {config}"


def test_every_mounted_host_path_exists(compose: dict[str, Any]) -> None:
    mounts = [(name, m) for name, s in compose["services"].items() for m in bind_mounts(s)]
    assert {name for name, _ in mounts} >= IKE_SERVICES | {"prometheus", "grafana"}
    for name, (source, target, _) in mounts:
        assert (DOCKER / source).exists(), f"{name}: {source} (for {target}) does not exist"
    for name, service in ike_services(compose).items():
        config = [m for m in bind_mounts(service) if m[1] == "/etc/ike-cluster"]
        assert config == [("../config", "/etc/ike-cluster", ["ro"])], name
    build = compose["services"]["worker"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"


def test_secret_files_exist_or_are_generated_as_documented(
    compose: dict[str, Any], cluster_toml: dict[str, Any]
) -> None:
    readme = (REPO / "README.md").read_text()
    compose_text = COMPOSE.read_text()
    ignored = (REPO / ".gitignore").read_text().split()
    for name, secret in compose["secrets"].items():
        path = DOCKER / secret["file"]
        how = GENERATED.get(path.name)
        if how is None:
            assert path.exists(), f"secret {name}: {secret['file']} does not exist"
            continue
        assert f"ike-cluster {how}docker/{path.name}" in readme
        assert f"ike-cluster {how}{path.name}" in compose_text
        assert f"docker/{path.name}" in ignored, f"{path.name} must not be committed"
    key = cluster_toml["cluster"]["key"]
    assert key.startswith("/run/secrets/")
    secret_name = key.removeprefix("/run/secrets/")
    assert secret_name in compose["secrets"]
    for name, service in ike_services(compose).items():
        assert secret_name in service["secrets"], f"{name} does not get {key}"


def test_every_secret_env_of_the_config_reaches_the_services(
    compose: dict[str, Any], cluster_toml: dict[str, Any]
) -> None:
    variables = {s["secret_env"] for s in cluster_toml["secrets"].values() if "secret_env" in s}
    assert variables  # compose passes the PSK from the environment, not in the file
    for name, service in ike_services(compose).items():
        environment = service["environment"]
        passed = (
            {e.split("=")[0] for e in environment}
            if isinstance(environment, list)
            else set(environment)
        )
        assert variables <= passed, name


def test_scaled_services_have_no_fixed_host_port_name_or_host_name(
    compose: dict[str, Any], cluster_toml: dict[str, Any]
) -> None:
    for name in SCALED:
        service = compose["services"][name]
        for port in service.get("ports", ()):
            # "9464" (a container port Docker maps to a free host port) is fine, "9464:9464" not
            fixed = "published" in port if isinstance(port, dict) else ":" in str(port)
            assert not fixed, f"{name} publishes {port}: a second replica could not start"
        assert "container_name" not in service
        assert "hostname" not in service  # [node] id = "%hostname" must differ per replica
    assert cluster_toml["node"]["id"] == "%hostname"


def published_udp(service: dict[str, Any]) -> set[tuple[int, int]]:
    found = set()
    for port in service.get("ports", ()):
        assert str(port).endswith("/udp"), f"{port}: IKE and ESP in UDP are UDP"
        host, container = str(port).removesuffix("/udp").split(":")
        found.add((int(host), int(container)))
    return found


def node_default(name: str) -> Any:
    return NodeConfig.__dataclass_fields__[name].default


def test_worker_publishes_the_configured_ike_ports_with_capabilities_not_privileged(
    compose: dict[str, Any], cluster_toml: dict[str, Any]
) -> None:
    ike = cluster_toml["ike"]
    ports = {
        ike.get("port", node_default("ike_port")),
        ike.get("port_nat_t", node_default("natt_port")),
    }
    assert ports == {500, 4500}
    worker = compose["services"]["worker"]
    assert published_udp(worker) == {(port, port) for port in ports}
    assert set(ike["addresses"]) & set(WILDCARDS), (
        "the worker must listen on the container's address"
    )
    assert set(worker["cap_add"]) >= WORKER_CAPS
    assert any(d.split(":")[0] == "/dev/net/tun" for d in worker["devices"])
    assert "worker" in cluster_toml  # its TUN device
    for name, service in compose["services"].items():
        assert not service.get("privileged", False), name
        assert "no-new-privileges:true" not in service.get("security_opt", ()), name


def test_prometheus_scrapes_every_replica_on_the_configured_metrics_port(
    compose: dict[str, Any], cluster_toml: dict[str, Any]
) -> None:
    listen = cluster_toml["metrics"]["listen"]
    host, _, port = listen.rpartition(":")
    assert host.strip("[]") in WILDCARDS, f"{listen}: Prometheus scrapes from another container"
    assert int(port or MetricsConfig.port) == 9464
    prometheus = load_yaml(DOCKER / "prometheus.yml")
    scraped: dict[str, int] = {}
    for job in prometheus["scrape_configs"]:
        assert "static_configs" not in job, "a static target would miss scaled replicas"
        for sd in job["dns_sd_configs"]:
            for name in sd["names"]:
                scraped[name] = sd["port"]
    assert scraped == dict.fromkeys(IKE_SERVICES, int(port))
    assert set(scraped) <= set(compose["services"])
    mounted = [m for m in bind_mounts(compose["services"]["prometheus"])]
    assert ("./prometheus.yml", "/etc/prometheus/prometheus.yml", ["ro"]) in mounted


def test_cluster_toml_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IKE_CLUSTER_PSK", PSK)
    config = load_config(CLUSTER_TOML)
    assert config.metrics is not None and config.metrics.port == 9464
    assert config.worker is not None and config.worker.tun == "ikec0"
    assert (config.ike_port, config.natt_port) == (500, 4500)
    assert config.node_id and config.node_id != "%hostname"  # each container's host name
    assert config.cluster is not None
    assert config.cluster.store == "redis://redis:6379/0"  # the compose service redis
    assert config.cluster.key == "/run/secrets/cluster_key"
    assert config.cluster.relay == "0.0.0.0:4800"


# --- Grafana ---------------------------------------------------------------------------

# PromQL words the dashboard may use that are not metric names
PROMQL_WORDS = {
    "sum", "count", "avg", "max", "min", "rate", "irate", "increase", "histogram_quantile",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
}  # fmt: skip
_LABELS = re.compile(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"")  # matchers, ranges, strings
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_SERIES_SUFFIXES = ("_bucket", "_sum", "_count")  # histogram series of one family


def dashboards() -> list[Path]:
    found = sorted(DASHBOARDS.glob("*.json"))
    assert found
    return found


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def metric_names(expr: str) -> set[str]:
    stripped = _GROUPING.sub(" ", _LABELS.sub(" ", expr))
    words = set(_IDENTIFIER.findall(re.sub(r"\b\d+(\.\d+)?\b", " ", stripped)))
    return words - PROMQL_WORDS


def exported_names() -> set[str]:
    """Every string literal of cluster/metrics.py, with and without the prefix."""
    tree = ast.parse(Path(metrics.__file__).read_text())
    literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    texts = {text for text in literals if isinstance(text, str)}
    return texts | {metrics.PREFIX + text for text in texts}


def test_metric_names_parsing() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, role) (rate(ike_cluster_x_bucket{role="r"}'
        "[5m]))) * on(instance) group_left(node) ike_cluster_node_info"
    )
    assert metric_names(expr) == {"ike_cluster_x_bucket", "ike_cluster_node_info"}


def test_dashboard_queries_only_metrics_the_project_exports() -> None:
    exported = exported_names()
    provisioned = load_yaml(DOCKER / "grafana/provisioning/datasources/prometheus.yml")
    uids = {source["uid"] for source in provisioned["datasources"]}
    queried: set[str] = set()
    for path in dashboards():
        dashboard = json.loads(path.read_text())
        for panel in walk_panels(dashboard["panels"]):
            if panel.get("type") == "row":
                continue
            assert panel["datasource"]["uid"] in uids, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                queried |= metric_names(target["expr"])
    assert queried
    for name in sorted(queried):
        assert name.startswith(metrics.PREFIX), f"{name} is not one of ours"
        family = next((name.removesuffix(s) for s in _SERIES_SUFFIXES if name.endswith(s)), name)
        found = name in exported or family in exported
        assert found, f"{name} does not appear in cluster/metrics.py"


def test_grafana_provisioning_points_at_the_mounted_dashboards(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    provider = load_yaml(DOCKER / "grafana/provisioning/dashboards/ike-cluster.yml")
    path = provider["providers"][0]["options"]["path"]
    assert host_path(grafana, path) == DASHBOARDS
    assert host_path(grafana, "/etc/grafana/provisioning") == DOCKER / "grafana" / "provisioning"
    datasource = load_yaml(DOCKER / "grafana/provisioning/datasources/prometheus.yml")
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]


# --- the image -------------------------------------------------------------------------


def test_dockerfile_copies_existing_files_and_runs_as_a_user() -> None:
    lines = (DOCKER / "Dockerfile").read_text().splitlines()
    context = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()  # "*" then "!keep"
    assert context[context.index("*") + 1 :]
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in (s for s in sources if not s.startswith("--")):
            assert (REPO / source).exists(), f"COPY {source}: not in the build context"
            assert f"!{source.rstrip('/')}" in context, f"COPY {source}: excluded from the context"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["ike-cluster"]' in lines
    setcap = next(line for line in lines if line.lstrip().startswith("&& setcap "))
    assert "cap_net_admin,cap_net_raw,cap_net_bind_service+ep /usr/local/bin/python3-net" in setcap
    assert "COPY --chmod=0755 docker/ike-cluster /usr/local/bin/ike-cluster" in lines


PR_CAPBSET_DROP = 24  # prctl(2)
CAP_NET_ADMIN = 12


def run_entrypoint(tmp_path: Path, drop_net_admin: bool) -> str:
    """docker/ike-cluster with its two interpreters replaced by `echo net` / `echo plain`."""
    script = (DOCKER / "ike-cluster").read_text()
    assert script.count("exec /usr/local/bin/python3-net -I -m cluster") == 1
    assert script.count("exec /usr/local/bin/python3 -I -m cluster") == 1
    script = script.replace("exec /usr/local/bin/python3-net -I -m cluster", "exec echo net")
    script = script.replace("exec /usr/local/bin/python3 -I -m cluster", "exec echo plain")
    copy = tmp_path / "ike-cluster"
    copy.write_text(script)

    def drop() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_CAPBSET_DROP, CAP_NET_ADMIN, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")

    sh = shutil.which("sh")
    assert sh is not None
    done = subprocess.run(
        [sh, str(copy), "worker", "--config", "x"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
        preexec_fn=drop if drop_net_admin else None,
    )
    return done.stdout.strip()


def test_entrypoint_uses_the_capable_interpreter_only_where_it_can_be_executed(
    tmp_path: Path,
) -> None:
    status = Path("/proc/self/status").read_text()
    bounding = int(re.search(r"CapBnd:\s*([0-9a-f]+)", status).group(1), 16)  # type: ignore[union-attr]
    assert bounding >> CAP_NET_ADMIN & 1  # the usual full bounding set, as with cap_add
    assert run_entrypoint(tmp_path, drop_net_admin=False) == "net worker --config x"
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("dropping from the bounding set needs CAP_SETPCAP (root; CI has it)")
    # a responder's container: NET_ADMIN is not in the bounding set, python3-net would fail
    assert run_entrypoint(tmp_path, drop_net_admin=True) == "plain worker --config x"


def test_readme_explains_running_a_cluster() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Run a cluster", 1)[1].split("\n## ", 1)[0]
    for needed in (
        "docker compose up",
        "--scale responder=3",
        "ike-cluster keygen",
        "IKE_CLUSTER_PSK",
        "tests/interop/cluster_lab.py",
        ":3000",
        ":9090",
    ):
        assert needed in section, needed
