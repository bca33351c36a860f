"""deploy/kubernetes/training-jobset.yaml: one agent per job, on the leader pod where rank 0 runs,
the same agent as the single-pod manifest, CURVE through the shared discovery emptyDir, and a
torchrun layout that really puts global rank 0 on that pod.

Parsed with yaml.safe_load and compared with the single-pod manifest, the agent configuration's
defaults and deploy/prometheus/prometheus-agent.yml, so that a change to one of them that the
multi-node manifest does not follow fails here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from sentinel.examples.torchrun_fsdp import parse_args

from agent.config import is_loopback, load_config, parse_tcp_endpoint
from sentinel.config import load_config as load_trainer_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
AGENT_MODE = ROOT / "deploy" / "prometheus" / "prometheus-agent.yml"
MODULE = "sentinel.examples.torchrun_fsdp"


def _objects(name: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


@pytest.fixture(scope="module")
def jobset_objects() -> dict[str, dict]:
    return _objects("training-jobset.yaml")


@pytest.fixture(scope="module")
def jobset(jobset_objects: dict[str, dict]) -> dict:
    (js,) = [o for o in jobset_objects.values() if o["kind"] == "JobSet"]
    assert js["apiVersion"].startswith("jobset.x-k8s.io/")
    return js


def _replicated(jobset: dict) -> dict[str, dict]:
    return {r["name"]: r for r in jobset["spec"]["replicatedJobs"]}


def _pod_spec(replicated: dict) -> dict:
    return replicated["template"]["spec"]["template"]["spec"]


def _containers(pod: dict) -> dict[str, dict]:
    return {c["name"]: c for c in pod.get("initContainers", []) + pod["containers"]}


def _single_pod() -> tuple[dict, dict[str, dict]]:
    objs = _objects("training-pod.yaml")
    (pod,) = [o for o in objs.values() if o["kind"] == "Pod"]
    return objs, _containers(pod["spec"])


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _mount_of(container: dict, path: str) -> str:
    hits = [m for m in container.get("volumeMounts", []) if (path + "/").startswith(m["mountPath"].rstrip("/") + "/")]
    assert hits, f"{path} is on no volume of {container['name']}"
    return max(hits, key=lambda m: len(m["mountPath"]))["name"]


def _torchrun(container: dict) -> dict[str, str]:
    """torchrun's --flag=value options and the module's own arguments of a trainer container;
    a `sh -c` command is split as the shell would (its $((...)) left as written)."""
    argv = container["command"]
    if argv[:2] == ["sh", "-c"]:
        script = argv[2]
        assert script.startswith("exec "), "the shell must exec torchrun, so signals reach it"
        argv = shlex.split(script.removeprefix("exec "))
    assert argv[0] == "torchrun"
    module_at = argv.index("-m")
    assert argv[module_at + 1] == MODULE
    opts = dict(a.removeprefix("--").split("=", 1) for a in argv[1:module_at])
    rest = argv[module_at + 2 :]
    opts.update({rest[i].removeprefix("--"): rest[i + 1] for i in range(0, len(rest), 2)})
    return opts


def test_the_agent_runs_on_the_leader_only_and_is_the_single_pod_agent(jobset: dict) -> None:
    jobs = _replicated(jobset)
    assert set(jobs) == {"leader", "workers"}
    leader, workers = jobs["leader"], jobs["workers"]
    assert leader["replicas"] == 1 and leader["template"]["spec"]["parallelism"] == 1
    assert leader["template"]["spec"]["completions"] == 1
    lead = _containers(_pod_spec(leader))
    work = _containers(_pod_spec(workers))
    assert {"sentinel-agent", "prometheus-agent", "trainer"} == set(lead)
    assert set(work) == {"trainer"}, "workers carry no agent: their ranks open no socket"
    assert not _pod_spec(workers).get("initContainers")
    for c in work.values():
        assert "sentinel-agent" not in c["image"] and "prometheus" not in c["image"]
    init = {c["name"] for c in _pod_spec(leader)["initContainers"]}
    assert init == {"sentinel-agent", "prometheus-agent"}
    for name in init:
        assert lead[name]["restartPolicy"] == "Always", f"{name} must be a native sidecar"
    assert _pod_spec(leader)["initContainers"][0]["name"] == "sentinel-agent", "the agent starts first"

    _, single = _single_pod()
    assert lead["sentinel-agent"] == single["sentinel-agent"], (
        "the leader's agent differs from deploy/kubernetes/training-pod.yaml's (image, command, probes, mounts)"
    )
    assert "ports" not in lead["sentinel-agent"], "the agent listens on loopback only"
    for c in (lead["trainer"], work["trainer"]):
        assert c["image"] == single["trainer"]["image"]
        assert c["volumeMounts"][0] == single["trainer"]["volumeMounts"][0], "the same config mount"


def test_configmap_agent_config_is_the_single_pod_one_and_rank_zero_alone_talks_to_it(
    jobset_objects: dict[str, dict], jobset: dict
) -> None:
    (cm,) = [o for o in jobset_objects.values() if o["kind"] == "ConfigMap"]
    single_objs, _ = _single_pod()
    single_data = single_objs["ConfigMap/sentinel-config"]["data"]
    assert yaml.safe_load(cm["data"]["agent.yml"]) == yaml.safe_load(single_data["agent.yml"])
    agent_cfg = load_config(yaml.safe_load(cm["data"]["agent.yml"]))
    trainer_cfg = load_trainer_config(yaml.safe_load(cm["data"]["trainer.yml"]))
    assert trainer_cfg.publish.ranks == "zero", "ranks on other nodes cannot reach a loopback agent"
    assert trainer_cfg.publish.endpoint == agent_cfg.stats_endpoint
    assert trainer_cfg.control.endpoint == agent_cfg.commands.endpoint
    for endpoint in (agent_cfg.stats_endpoint, agent_cfg.commands.endpoint):
        assert is_loopback(parse_tcp_endpoint(endpoint)[0])
    assert is_loopback(agent_cfg.metrics.host)
    # CURVE by default: nothing turns it off on either side, and no insecure remote listener.
    assert not agent_cfg.security.insecure and not agent_cfg.security.allow_insecure_remote
    assert not trainer_cfg.publish.insecure and not trainer_cfg.control.insecure
    assert cm["data"]["prometheus-agent.yml"] == AGENT_MODE.read_text(), (
        "the ConfigMap's prometheus-agent.yml differs from deploy/prometheus/prometheus-agent.yml"
    )
    prom = yaml.safe_load(cm["data"]["prometheus-agent.yml"])
    (job,) = prom["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"{agent_cfg.metrics.host}:{agent_cfg.metrics.port}"]

    # Every pod mounts that ConfigMap, and the checkpoint folder is one volume that every node
    # shares (ReadWriteMany), also holding the agent's state.
    claims = {o["metadata"]["name"]: o for o in jobset_objects.values() if o["kind"] == "PersistentVolumeClaim"}
    for name, rj in _replicated(jobset).items():
        pod = _pod_spec(rj)
        volumes = {v["name"]: v for v in pod["volumes"]}
        trainer = _containers(pod)["trainer"]
        assert volumes[_mount_of(trainer, "/etc/sentinel/trainer.yml")]["configMap"]["name"] == cm["metadata"]["name"]
        ckpt = volumes[_mount_of(trainer, trainer_cfg.checkpoint.dir)]
        claim = claims[ckpt["persistentVolumeClaim"]["claimName"]]
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], f"{name}: DCP needs one folder for all nodes"
        if name == "leader":
            agent = _containers(pod)["sentinel-agent"]
            assert _mount_of(agent, agent_cfg.state_dir) == _mount_of(trainer, trainer_cfg.checkpoint.dir)
        assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"]
        assert pod["automountServiceAccountToken"] is False


def test_curve_keys_reach_the_leader_trainer_through_the_discovery_emptydir(jobset: dict) -> None:
    jobs = _replicated(jobset)
    pod = _pod_spec(jobs["leader"])
    c = _containers(pod)
    volumes = {v["name"]: v for v in pod["volumes"]}
    discovery = _env(c["sentinel-agent"])["SENTINEL_DISCOVERY_DIR"]["value"]
    assert _env(c["trainer"])["SENTINEL_DISCOVERY_DIR"]["value"] == discovery
    vol = {_mount_of(c["sentinel-agent"], discovery + "/x"), _mount_of(c["trainer"], discovery + "/x")}
    assert len(vol) == 1 and "emptyDir" in volumes[vol.pop()]
    trainer_mount = [m for m in c["trainer"]["volumeMounts"] if m["mountPath"] == discovery]
    assert trainer_mount[0]["readOnly"] is True
    workers = _pod_spec(jobs["workers"])
    assert "SENTINEL_DISCOVERY_DIR" not in _env(_containers(workers)["trainer"])
    assert not [v for v in workers["volumes"] if v["name"] == "sentinel-discovery"]


def test_torchrun_puts_global_rank_zero_on_the_leader(jobset: dict) -> None:
    jobs = _replicated(jobset)
    lead = _containers(_pod_spec(jobs["leader"]))["trainer"]
    work = _containers(_pod_spec(jobs["workers"]))["trainer"]
    lo, wo = _torchrun(lead), _torchrun(work)
    workers_spec = jobs["workers"]["template"]["spec"]
    n_workers = jobs["workers"]["replicas"] * workers_spec["parallelism"]
    assert workers_spec["completions"] == workers_spec["parallelism"]
    assert workers_spec["completionMode"] == "Indexed", "node ranks come from the completion index"
    assert int(lo["nnodes"]) == int(wo["nnodes"]) == 1 + n_workers
    assert lo["node-rank"] == "0"
    assert wo["node-rank"] == "$((JOB_COMPLETION_INDEX+1))"
    assert "rdzv-backend" not in lo and "rdzv-backend" not in wo, "static rendezvous: node rank 0 is rank 0"
    for opts, c in ((lo, lead), (wo, work)):
        assert int(opts["nproc-per-node"]) == c["resources"]["limits"]["nvidia.com/gpu"]
        assert opts["config"] == "/etc/sentinel/trainer.yml"
        assert opts["run"] in ("$(SENTINEL_RUN)", "$SENTINEL_RUN")
        assert _env(c)["SENTINEL_RUN"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.labels['jobset.sigs.k8s.io/jobset-name']"
        ), "one run name on every rank and across restarts"
        # The module takes these arguments (and only these) as the manifest passes them.
        parsed = parse_args([f"--{k}={v}" for k, v in opts.items() if k in ("config", "run", "steps")])
        assert parsed.config == opts["config"] and parsed.steps == int(opts["steps"])
    assert lo["master-port"] == wo["master-port"]
    # JobSet's pod DNS name: <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>
    net = jobset["spec"]["network"]
    assert net["enableDNSHostnames"] is True
    leader_host = f"{jobset['metadata']['name']}-leader-0-0.{net['subdomain']}"
    assert lo["master-addr"] == wo["master-addr"] == leader_host
    assert jobset["spec"]["startupPolicy"]["startupPolicyOrder"] == "InOrder", "the leader is up first"


def test_prometheus_agent_sidecar_runs_the_shipped_config_on_loopback(jobset: dict) -> None:
    pod = _pod_spec(_replicated(jobset)["leader"])
    prom = _containers(pod)["prometheus-agent"]
    args = dict(a.removeprefix("--").split("=", 1) for a in prom["args"])
    assert set(args["enable-feature"].split(",")) == {"agent", "expand-external-labels"}
    host, _ = args["web.listen-address"].rsplit(":", 1)
    assert is_loopback(host), "the Prometheus agent serves nothing off the pod"
    assert "ports" not in prom
    config_path = Path(args["config.file"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[_mount_of(prom, str(config_path))]["configMap"]["name"] == "sentinel-jobset-config"
    assert config_path.name == AGENT_MODE.name
    assert "emptyDir" in volumes[_mount_of(prom, args["storage.agent.path"] + "/wal")]
    cfg = yaml.safe_load(AGENT_MODE.read_text())
    wanted = set(re.findall(r"\$\{(\w+)\}", yaml.safe_dump(cfg["global"]["external_labels"])))
    assert wanted and wanted <= set(_env(prom)), f"external labels need {sorted(wanted - set(_env(prom)))}"
    assert _env(prom)["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    (remote,) = cfg["remote_write"]
    for key in ("authorization", "tls_config"):
        path = remote[key]["credentials_file" if key == "authorization" else "ca_file"]
        assert "secret" in volumes[_mount_of(prom, path)], f"{path} must come from a Secret"
