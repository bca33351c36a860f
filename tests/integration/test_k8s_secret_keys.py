"""deploy/kubernetes/remote-agent.yaml: CURVE keys from one Secret, each side mounting only its part.

The manifest's own ConfigMap is run: ``sentinel-agent keys`` makes the Secret's four files, each
pod's secret volume is materialised in a temp dir exactly as its ``items`` and ``defaultMode``
say, the mount paths in the two configs are pointed there, and a real agent and a real trainer
then talk over loopback with those keys: statistics arrive, and an agent command is acked by
the trainer's key from the Secret.  The agent's configuration is checked as written (it binds
0.0.0.0, which the agent refuses for a channel made plain with ``security.insecure``).
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
import zmq
from agent_proc import AgentProc, free_port, nonfinite_policy

import sentinel
from agent.config import load_config as load_agent_config
from agent.typedconfig import ConfigError
from sentinel.config import load_config as load_trainer_config

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kubernetes" / "remote-agent.yaml"
MOUNT = "/etc/sentinel/keys"


def count(scrape, metric: str, **labels: object) -> float:
    return scrape.value(metric, **labels) or 0.0


def _docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def _one(kind: str, name: str) -> dict:
    (doc,) = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _key_mount(pod: dict, container: str) -> dict:
    """The secret volume mounted at MOUNT in ``container`` of ``pod`` (a pod spec)."""
    (c,) = [c for c in pod["containers"] if c["name"] == container]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == MOUNT]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume["secret"]


def _materialise(secret: dict, files: Path, into: Path) -> Path:
    """The files a kubelet would project for ``secret`` (its items, its defaultMode) under ``into``."""
    assert secret["secretName"] == "sentinel-curve"
    for item in secret["items"]:
        target = into / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files / item["key"], target)
        os.chmod(target, secret["defaultMode"])
    return into


def _pods() -> tuple[dict, dict]:
    agent = _one("Deployment", "sentinel-agent")["spec"]["template"]["spec"]
    trainer = _one("Job", "llm-training")["spec"]["template"]["spec"]
    return agent, trainer


def test_each_side_mounts_only_its_part_of_the_secret() -> None:
    agent, trainer = _pods()
    agent_items = {i["key"]: i["path"] for i in _key_mount(agent, "sentinel-agent")["items"]}
    trainer_items = {i["key"]: i["path"] for i in _key_mount(trainer, "trainer")["items"]}
    assert agent_items == {"server.key": "server.key", "server.key_secret": "server.key_secret",
                           "client.key": "authorized/client.key"}  # fmt: skip
    assert trainer_items == {"client.key_secret": "client.key_secret", "server.key": "server.key"}
    for secret in (_key_mount(agent, "sentinel-agent"), _key_mount(trainer, "trainer")):
        assert secret["defaultMode"] == 0o440, "group-readable under the pod's fsGroup, by nobody else"
    assert agent["securityContext"]["fsGroup"] == trainer["securityContext"]["fsGroup"] == 10001
    # the trainer pods carry the label the NetworkPolicy admits to the ZeroMQ ports
    policy = _one("NetworkPolicy", "sentinel-agent")["spec"]
    zmq_rule = next(r for r in policy["ingress"] if "from" in r)
    label = zmq_rule["from"][0]["podSelector"]["matchLabels"]
    assert label.items() <= _one("Job", "llm-training")["spec"]["template"]["metadata"]["labels"].items()
    assert {p["port"] for p in zmq_rule["ports"]} == {5557, 5558}


def test_the_service_and_the_trainer_endpoints_agree_with_the_agent() -> None:
    config = _one("ConfigMap", "sentinel-remote-config")["data"]
    agent_cfg, trainer_cfg = yaml.safe_load(config["agent.yml"]), yaml.safe_load(config["trainer.yml"])
    service = _one("Service", "sentinel-agent")
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    host = f"{service['metadata']['name']}.training.svc.cluster.local"
    assert trainer_cfg["publish"]["endpoint"] == f"tcp://{host}:{ports['stats']}"
    assert trainer_cfg["control"]["endpoint"] == f"tcp://{host}:{ports['commands']}"
    assert agent_cfg["stats_endpoint"] == f"tcp://0.0.0.0:{ports['stats']}"
    assert agent_cfg["commands"]["endpoint"] == f"tcp://0.0.0.0:{ports['commands']}"
    assert agent_cfg["metrics"]["host"] == "127.0.0.1", "/metrics leaves the pod only through kube-rbac-proxy"


@pytest.fixture
def secret_files(tmp_path: Path) -> Path:
    out = tmp_path / "secret"
    subprocess.run([sys.executable, "-m", "agent", "keys", str(out)], check=True, capture_output=True, timeout=60)
    return out


def _configs(tmp_path: Path, secret_files: Path) -> tuple[str, str, Path, Path]:
    agent_pod, trainer_pod = _pods()
    agent_keys = _materialise(_key_mount(agent_pod, "sentinel-agent"), secret_files, tmp_path / "agent-keys")
    trainer_keys = _materialise(_key_mount(trainer_pod, "trainer"), secret_files, tmp_path / "trainer-keys")
    data = _one("ConfigMap", "sentinel-remote-config")["data"]
    return (data["agent.yml"].replace(MOUNT, str(agent_keys)), data["trainer.yml"].replace(MOUNT, str(trainer_keys)),
            agent_keys, trainer_keys)  # fmt: skip


def test_the_configs_as_written_load_and_a_plain_remote_channel_is_refused(tmp_path: Path, secret_files: Path) -> None:
    agent_yml, trainer_yml, agent_keys, _ = _configs(tmp_path, secret_files)
    agent_cfg = yaml.safe_load(agent_yml)
    agent_cfg["state_dir"] = str(tmp_path / "state")
    loaded = load_agent_config(agent_cfg)
    assert loaded.stats_curve.secret_file == str(agent_keys / "server.key_secret")
    load_trainer_config(yaml.safe_load(trainer_yml.replace("/data/checkpoints", str(tmp_path / "ckpt"))))
    del agent_cfg["stats_curve"]
    agent_cfg["security"]["insecure"] = True
    with pytest.raises(ConfigError, match="stats_endpoint"):  # a plain channel on 0.0.0.0 is refused
        load_agent_config(agent_cfg)


def test_a_trainer_with_the_secrets_keys_publishes_and_acks_the_agents_command(
    tmp_path: Path, secret_files: Path
) -> None:
    agent_yml, trainer_yml, agent_keys, trainer_keys = _configs(tmp_path, secret_files)
    stats, commands = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    agent_cfg = yaml.safe_load(agent_yml)
    agent_cfg.update(nonfinite_policy("skip_batches", n=2), state_dir=str(tmp_path / "state"))
    agent_cfg["stats_endpoint"], agent_cfg["commands"]["endpoint"] = stats, commands
    agent_cfg["metrics"]["port"] = 0
    trainer_cfg = yaml.safe_load(trainer_yml)
    trainer_cfg["publish"]["endpoint"], trainer_cfg["control"]["endpoint"] = stats, commands
    trainer_cfg["checkpoint"] = {"dir": None}
    trainer_cfg["control"]["hello_interval"] = 0.2
    trainer_cfg.update(run="k8s-secret", log_level="warning")
    for path in trainer_keys.rglob("*"):
        assert not path.is_file() or stat.S_IMODE(path.stat().st_mode) == 0o440
    assert not (trainer_keys / "server.key_secret").exists() and not (agent_keys / "client.key_secret").exists()

    agent = AgentProc(tmp_path / "agent", config=agent_cfg, stats_endpoint=stats, commands_endpoint=commands)
    agent.start(timeout=20.0)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sn = sentinel.attach(model, optimizer, config=trainer_cfg)
    try:
        assert sn.publisher.security.mode == "curve"  # the keys of the config, not discovered ones
        batches = sn.batches(list(range(1000)))
        deadline = time.monotonic() + 20

        def step(loss: float | None = None) -> None:
            next(batches)
            out = model(torch.randn(8, 4)).pow(2).mean()
            out.backward()
            optimizer.step()
            optimizer.zero_grad()
            sn.observe(loss=out.detach() if loss is None else torch.tensor(loss))

        while not count(agent.scrape(), "sentinel_training_step", run="k8s-secret"):
            assert time.monotonic() < deadline, agent.log()
            step()
            time.sleep(0.05)
        step(math.nan)
        while not agent.acks("skip_batches"):
            assert time.monotonic() < deadline, agent.log()
            step()
            time.sleep(0.05)
        (ack,) = agent.acks("skip_batches")
        trainer_public = zmq.auth.load_certificate(secret_files / "client.key")[0].decode()
        assert (ack["status"], ack["key"]) == ("applied", trainer_public)
        assert count(agent.scrape(), "sentinel_agent_refused_client_keys_total") == 0
    finally:
        sn.close()
        agent.stop(timeout=5.0)
