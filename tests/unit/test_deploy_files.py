"""The files under deploy/ parse, and their wiring agrees with the code's own defaults.

Ports, paths, names and thresholds are read from the configuration dataclasses (agent.config,
agent.predict, sentinel.config) rather than repeated here, so a changed default that the deploy
files do not follow fails a test instead of shipping a stack that cannot reach its agent.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from agent.cli import EXIT_USAGE
from agent.config import AgentConfig, is_loopback, load_config, parse_tcp_endpoint
from agent.predict import PredictConfig
from sentinel.config import EpsConfig
from sentinel.config import load_config as load_trainer_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
AGENT_YAML = DEPLOY / "sentinel-agent.yml"
RULES = DEPLOY / "prometheus" / "rules" / "sentinel.rules.yml"
OPERATIONS = ROOT / "docs" / "operations.md"

DEFAULTS = AgentConfig()
STATS_PORT = parse_tcp_endpoint(DEFAULTS.stats_endpoint)[1]
COMMANDS_PORT = parse_tcp_endpoint(DEFAULTS.commands.endpoint)[1]
METRICS_PORT = DEFAULTS.metrics.port
METRICS_URL = f"http://127.0.0.1:{METRICS_PORT}/metrics"


def _alerts() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def _scrape_job() -> str:
    (job,) = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    return job["job_name"]


# --- the example agent configuration ------------------------------------------------------------


def test_example_agent_config_loads_and_keeps_every_listener_on_loopback() -> None:
    cfg = load_config(AGENT_YAML)
    assert cfg.stats_endpoint == DEFAULTS.stats_endpoint
    assert cfg.commands.endpoint == DEFAULTS.commands.endpoint
    assert (cfg.metrics.host, cfg.metrics.port) == (DEFAULTS.metrics.host, DEFAULTS.metrics.port)
    assert not cfg.security.allow_insecure_remote
    for endpoint in (cfg.stats_endpoint, cfg.commands.endpoint):
        assert is_loopback(parse_tcp_endpoint(endpoint)[0])
    assert is_loopback(cfg.metrics.host)
    assert Path(cfg.state_dir).is_absolute(), "a service's working directory is not a place for state"


# --- docker-compose -----------------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's short-syntax volumes (read-only flag dropped)."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        out[target] = source
    return out


def _flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


def test_compose_runs_the_four_services_on_the_host_loopback() -> None:
    services = _compose()["services"]
    assert {"agent", "prometheus", "alertmanager", "grafana"} <= set(services)
    for name, svc in services.items():
        assert svc.get("network_mode") == "host", f"{name}: the layout relies on the host's loopback"
        assert "ports" not in svc, f"{name}: host networking publishes nothing; ports would mislead"
    assert services["trainer"]["profiles"] == ["demo"], "the demo trainer must not start by default"
    prom_args, am_args = services["prometheus"]["command"], services["alertmanager"]["command"]
    for args in (prom_args, am_args):
        host, _ = _flag(args, "web.listen-address").rsplit(":", 1)
        assert is_loopback(host)
    assert _flag(am_args, "cluster.listen-address") == "", "Alertmanager's gossip port would bind 0.0.0.0"
    env = services["grafana"]["environment"]
    assert is_loopback(env["GF_SERVER_HTTP_ADDR"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "${GRAFANA_ADMIN_PASSWORD:?" in env["GF_SECURITY_ADMIN_PASSWORD"], "no default admin password"


def test_compose_wiring_matches_the_prometheus_config_and_grafana_contract() -> None:
    services = _compose()["services"]
    prom_cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (target,) = prom_cfg["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target == f"127.0.0.1:{METRICS_PORT}"
    (am_target,) = prom_cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am_target == _flag(services["alertmanager"]["command"], "web.listen-address")

    prom = services["prometheus"]
    prom_mounts = _mounts(prom)
    config_file = Path(_flag(prom["command"], "config.file"))
    assert (DEPLOY / prom_mounts[str(config_file.parent)] / config_file.name).is_file()
    am = services["alertmanager"]
    am_file = Path(_flag(am["command"], "config.file"))
    assert (DEPLOY / _mounts(am)[str(am_file.parent)] / am_file.name).is_file()

    grafana = services["grafana"]
    g_mounts = _mounts(grafana)
    assert g_mounts["/etc/grafana/provisioning"] == "../grafana/provisioning"
    assert g_mounts["/var/lib/grafana/dashboards"] == "../grafana/dashboards"
    prom_host, prom_port = _flag(prom["command"], "web.listen-address").rsplit(":", 1)
    assert f"prometheus:{prom_host}" in grafana["extra_hosts"], "the datasource URL names the host 'prometheus'"
    datasource = ROOT / "grafana" / "provisioning" / "datasources" / "sentinel.yml"
    if datasource.exists():
        urls = [d["url"] for d in yaml.safe_load(datasource.read_text())["datasources"]]
        assert f"http://prometheus:{prom_port}" in urls


def test_compose_agent_uses_the_image_config_path_and_a_state_volume() -> None:
    compose = _compose()
    agent = compose["services"]["agent"]
    assert (DEPLOY / agent["build"]["context"] / agent["build"]["dockerfile"]).resolve() == (
        DEPLOY / "agent.Dockerfile"
    )
    mounts = _mounts(agent)
    config_path = _dockerfile_entrypoint()[-1]
    assert (DEPLOY / mounts[config_path]).resolve() == AGENT_YAML
    state_dir = load_config(AGENT_YAML).state_dir
    assert mounts[state_dir] in compose["volumes"], "agent state must outlive the container"
    assert agent["read_only"] is True and agent["cap_drop"] == ["ALL"]
    for svc in compose["services"].values():
        for target, source in _mounts(svc).items():
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"bind mount source {source} for {target} is missing"
            else:
                assert source in compose["volumes"], f"named volume {source} is not declared"


# --- Dockerfile ---------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "agent.Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _instructions(name: str) -> list[str]:
    return [args for word, args in _dockerfile() if word == name]


def _dockerfile_entrypoint() -> list[str]:
    (entry,) = _instructions("ENTRYPOINT")
    return json.loads(entry)


def test_dockerfile_builds_a_cpu_non_root_agent_image() -> None:
    (base,) = _instructions("FROM")
    assert re.fullmatch(r"python:3\.\d+-slim", base)
    runs = " ".join(_instructions("RUN"))
    ci_pin = re.search(r"torch==([\w.]+)", (ROOT / ".ci" / "run").read_text())
    assert ci_pin, "CI pins torch"
    assert f"torch=={ci_pin.group(1)}" in runs, "the image and CI must test the same torch"
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs
    assert "pip install ." in runs
    (user,) = _instructions("USER")
    assert user.split(":")[0] not in ("root", "0")
    for src in (args.split()[:-1] for args in _instructions("COPY")):
        for path in src:
            assert (ROOT / path).exists(), f"COPY source {path} does not exist"


def test_dockerfile_ports_healthcheck_and_entrypoint_follow_the_agent_defaults() -> None:
    exposed = {int(p) for args in _instructions("EXPOSE") for p in args.split()}
    assert exposed == {STATS_PORT, COMMANDS_PORT, METRICS_PORT}
    (health,) = _instructions("HEALTHCHECK")
    assert METRICS_URL in health
    entry = _dockerfile_entrypoint()
    assert entry[:3] == ["sentinel-agent", "run", "--config"]
    copies = [args.split() for args in _instructions("COPY")]
    assert ["deploy/sentinel-agent.yml", entry[-1]] in copies
    volumes = [json.loads(v) for v in _instructions("VOLUME")]
    assert [load_config(AGENT_YAML).state_dir] in volumes


# --- Kubernetes ---------------------------------------------------------------------------------


def _k8s(name: str) -> dict[str, dict]:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()))
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs if d}


def _pod() -> tuple[dict, dict[str, dict]]:
    objs = _k8s("training-pod.yaml")
    (pod,) = [o for o in objs.values() if o["kind"] == "Pod"]
    containers = {c["name"]: c for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", [])}
    return pod, containers


def test_kubernetes_configmap_holds_the_agent_and_trainer_configs_that_load() -> None:
    objs = _k8s("training-pod.yaml")
    data = objs["ConfigMap/sentinel-config"]["data"]
    agent_cfg = load_config(yaml.safe_load(data["agent.yml"]))
    shared = yaml.safe_load(AGENT_YAML.read_text())
    assert {k: v for k, v in yaml.safe_load(data["agent.yml"]).items() if k != "state_dir"} == {
        k: v for k, v in shared.items() if k != "state_dir"
    }, "the sidecar's configuration differs from deploy/sentinel-agent.yml in more than state_dir"
    trainer_cfg = load_trainer_config(yaml.safe_load(data["trainer.yml"]))
    assert trainer_cfg.publish.endpoint == agent_cfg.stats_endpoint
    assert trainer_cfg.control.endpoint == agent_cfg.commands.endpoint
    assert not agent_cfg.security.allow_insecure_remote

    pod, containers = _pod()
    agent, trainer = containers["sentinel-agent"], containers["trainer"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}

    def mount_of(container: dict, path: str) -> str:
        hits = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
        assert hits, f"{path} is on no volume of {container['name']}"
        return max(hits, key=lambda m: len(m["mountPath"]))["name"]

    state_vol = mount_of(agent, agent_cfg.state_dir)
    ckpt_vol = mount_of(trainer, trainer_cfg.checkpoint.dir)
    assert state_vol == ckpt_vol, "checkpoints and agent state share the pod's volume"
    claim = volumes[state_vol]["persistentVolumeClaim"]["claimName"]
    assert f"PersistentVolumeClaim/{claim}" in objs
    config_vol = mount_of(agent, agent["command"][-1])
    assert volumes[config_vol]["configMap"]["name"] == "sentinel-config"
    assert agent["command"][:3] == ["sentinel-agent", "run", "--config"]

    # CURVE with no key configured: the agent advertises its keys where the trainer looks for them
    env = {c: {e["name"]: e.get("value") for e in containers[c].get("env", [])} for c in ("sentinel-agent", "trainer")}
    discovery = env["sentinel-agent"]["SENTINEL_DISCOVERY_DIR"]
    assert env["trainer"]["SENTINEL_DISCOVERY_DIR"] == discovery
    shared = {mount_of(agent, discovery + "/x"), mount_of(trainer, discovery + "/x")}
    assert len(shared) == 1 and "emptyDir" in volumes[shared.pop()]
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # one uid: the 0600 discovery file is readable
    assert not agent_cfg.security.insecure and not trainer_cfg.publish.insecure and not trainer_cfg.control.insecure


def test_kubernetes_agent_is_a_sidecar_and_only_metrics_leave_the_pod() -> None:
    pod, containers = _pod()
    init = {c["name"] for c in pod["spec"].get("initContainers", [])}
    assert {"sentinel-agent", "kube-rbac-proxy"} <= init
    for name in init:
        assert containers[name]["restartPolicy"] == "Always", f"{name} must be a native sidecar"
    assert [c["name"] for c in pod["spec"]["containers"]] == ["trainer"]
    agent = containers["sentinel-agent"]
    assert "ports" not in agent, "the agent listens on loopback only"
    for probe in ("startupProbe", "livenessProbe"):
        assert METRICS_URL in " ".join(agent[probe]["exec"]["command"])
    proxy = containers["kube-rbac-proxy"]
    args = proxy["args"]
    assert _flag(args, "upstream") == f"http://127.0.0.1:{METRICS_PORT}/"
    assert _flag(args, "allow-paths") == "/metrics"
    assert _flag(args, "tls-cert-file") and _flag(args, "tls-private-key-file")
    (port,) = proxy["ports"]
    assert int(_flag(args, "secure-listen-address").rsplit(":", 1)[1]) == port["containerPort"]
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/scheme"] == "https"
    assert int(ann["prometheus.io/port"]) == port["containerPort"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    uid = _instructions("USER")[0].split(":")[0]
    assert pod["spec"]["securityContext"]["runAsUser"] == int(uid), "the image's user owns its state"


def test_kubernetes_service_monitor_selects_the_pod_and_yields_the_rules_job() -> None:
    pod, containers = _pod()
    objs = _k8s("training-pod.yaml")
    (svc,) = [o for o in objs.values() if o["kind"] == "Service"]
    labels = pod["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    (svc_port,) = svc["spec"]["ports"]
    (proxy_port,) = containers["kube-rbac-proxy"]["ports"]
    assert svc_port["targetPort"] == proxy_port["name"]

    monitors = _k8s("servicemonitor.yaml")
    sm = monitors["ServiceMonitor/sentinel-agent"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == svc_port["name"] and endpoint["scheme"] == "https"
    job = svc["metadata"]["labels"][sm["spec"]["jobLabel"]]
    assert job == _scrape_job()
    assert f'up{{job="{job}"}}' in _alerts()["SentinelAgentDown"]["expr"]

    (binding,) = [o for o in objs.values() if o["kind"] == "ClusterRoleBinding"]
    (subject,) = binding["subjects"]
    assert subject["name"] == pod["spec"]["serviceAccountName"]
    assert endpoint["tlsConfig"]["serverName"] == f"{svc['metadata']['name']}.{subject['namespace']}.svc"
    tls_secret = {v["name"]: v for v in pod["spec"]["volumes"]}["metrics-tls"]["secret"]["secretName"]
    assert endpoint["tlsConfig"]["ca"]["secret"]["name"] == tls_secret
    reader = monitors["ClusterRole/sentinel-metrics-reader"]
    assert reader["rules"] == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]


def test_kubernetes_prometheus_rule_carries_the_same_rules() -> None:
    (rule,) = _k8s("prometheusrule.yaml").values()
    assert rule["kind"] == "PrometheusRule"
    shipped = yaml.safe_load(RULES.read_text())["groups"]
    assert rule["spec"]["groups"] == shipped, (
        "deploy/kubernetes/prometheusrule.yaml differs from the rules file; copy the rules file's groups into it"
    )


# --- systemd ------------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "sentinel-agent.service"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_unit_runs_the_agent_with_the_example_config_and_state_dir() -> None:
    unit = _unit()
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "sentinel-agent" and argv[1:3] == ["run", "--config"]
    config_path = Path(argv[3])
    assert config_path.parent == Path("/etc") / service["ConfigurationDirectory"]
    state_dir = Path("/var/lib") / service["StateDirectory"]
    assert str(state_dir) == load_config(AGENT_YAML).state_dir
    assert service["WorkingDirectory"] == str(state_dir)
    assert int(service["RestartPreventExitStatus"]) == EXIT_USAGE, "a config error must not restart-loop"
    assert service["KillSignal"] == "SIGTERM", "the agent stops cleanly on SIGTERM"
    assert service["DynamicUser"] == "yes" and service["NoNewPrivileges"] == "yes"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    agent_bin = shutil.which("sentinel-agent")
    if analyze is None or agent_bin is None:
        pytest.skip("systemd-analyze or the sentinel-agent script is not installed")
    argv = shlex.split(_unit()["Service"]["ExecStart"])
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(argv[0], agent_bin))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


# --- alert rules against the configuration and the runbook -------------------------------------


def _threshold(expr: str, metric_selector: str) -> float:
    m = re.search(re.escape(metric_selector) + r"[^<>]*?\)?\s*(<=|<|>)\s*([0-9.e+-]+)", expr)
    assert m, f"no threshold after {metric_selector} in {expr}"
    return float(m.group(2))


def test_rule_thresholds_follow_the_configuration_defaults() -> None:
    alerts = _alerts()
    eta = _threshold(alerts["SentinelAttentionLogitGrowth"]["expr"], 'sentinel_spike_eta_steps{predictor="attn_logit"}')
    assert eta == PredictConfig().trend.warn_eta_steps
    eps = EpsConfig()
    expr = alerts["SentinelAdamEpsilonAtFloor"]["expr"]
    bucket = 10 ** (1 / eps.per_decade)
    for selector in ("sentinel_param_adam_epsilon", 'sentinel_observed_value{name="adam_eps_min"}'):
        t = _threshold(expr, selector)
        assert eps.floor <= t < eps.floor * bucket, f"{selector}: {t} is not 'at the floor' {eps.floor}"


def test_rules_name_only_documented_metrics() -> None:
    documented = set(re.findall(r"`(sentinel_[a-z0-9_]+)`", (ROOT / "docs" / "metrics.md").read_text()))
    for name, rule in _alerts().items():
        for metric in re.findall(r"\b(sentinel_[a-z0-9_]+)", rule["expr"]):
            assert metric in documented, f"{name} uses {metric}, which docs/metrics.md does not list"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_alert_has_a_runbook_section() -> None:
    text = OPERATIONS.read_text()
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    by_title = {s.splitlines()[0].strip(): s for s in sections}
    for name, rule in _alerts().items():
        assert name in by_title, f"docs/operations.md has no '### {name}' section"
        body = by_title[name]
        for part in ("**Means:**", "**The agent already:**", "**Do:**"):
            assert part in body, f"runbook of {name} lacks {part}"
        page, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert page == "docs/operations.md" and anchor == _anchor(name)
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["labels"]["severity"] in body, f"runbook of {name} does not state its severity"
