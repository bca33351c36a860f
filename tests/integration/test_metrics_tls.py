"""HTTPS and mutual TLS on the agent's HTTP server, with real certificates made by the openssl CLI.

A test CA signs the server certificate (for 127.0.0.1) and a client certificate; a second,
unrelated CA signs a rogue client certificate.  Clients are Python's ssl/urllib.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_proc import AgentProc, Pusher, make_frames, parse_metrics, require_binary

from agent.config import load_config
from agent.daemon import Agent, AgentStartError
from agent.typedconfig import ConfigError


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_binary("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _leaf(d: Path, name: str, ca: str, usage: str) -> None:
    ext = d / f"{name}.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.crt", "-days", "2", "-extfile", ext.name, cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "server", "ca", "serverAuth")
    _leaf(d, "client", "ca", "clientAuth")
    _leaf(d, "rogue", "rogue-ca", "clientAuth")
    return d


def _client(pki: Path, cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if cert is not None:
        ctx.load_cert_chain(pki / f"{cert}.crt", pki / f"{cert}.key")
    return ctx


def _get(url: str, ctx: ssl.SSLContext) -> str:
    with urllib.request.urlopen(url, timeout=5, context=ctx) as r:
        return r.read().decode()


def _agent(tmp_path: Path, pki: Path, **metrics: object) -> Agent:
    return Agent(
        {
            "stats_endpoint": "tcp://127.0.0.1:*",
            "commands": {"endpoint": "tcp://127.0.0.1:*"},
            "state_dir": str(tmp_path / "state"),
            "metrics": {"port": 0, "certfile": str(pki / "server.crt"), "keyfile": str(pki / "server.key"), **metrics},
        }
    ).start()


def _feed(agent: Agent) -> None:
    with Pusher(agent.stats_endpoint) as p:
        p.send(make_frames(run="tls", step=7, scalars={"loss": 1.25}))
    deadline = time.monotonic() + 10
    while agent.state.received_messages < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_https_serves_metrics_status_page_and_api(tmp_path: Path, pki: Path) -> None:
    agent = _agent(tmp_path, pki)
    try:
        _feed(agent)
        assert agent.metrics_url.startswith("https://127.0.0.1:")
        ctx = _client(pki)
        assert parse_metrics(_get(agent.metrics_url, ctx)).value("sentinel_loss", run="tls") == 1.25
        base = agent.metrics_url.removesuffix("metrics")
        assert json.loads(_get(base + "api/status", ctx))["runs"][0]["step"] == 7
        assert 'data-run="tls"' in _get(base, ctx)
        with pytest.raises(OSError):  # plain HTTP on the TLS port gets no answer
            urllib.request.urlopen(base.replace("https:", "http:") + "metrics", timeout=5).read()
        with pytest.raises(urllib.error.URLError) as info:  # a client that does not trust the CA refuses
            _get(agent.metrics_url, ssl.create_default_context())
        assert isinstance(info.value.reason, ssl.SSLCertVerificationError)
    finally:
        agent.stop()


def test_mutual_tls_rejects_clients_without_a_trusted_certificate(tmp_path: Path, pki: Path) -> None:
    agent = _agent(tmp_path, pki, client_cafile=str(pki / "ca.crt"))
    try:
        _feed(agent)
        base = agent.metrics_url.removesuffix("metrics")
        server = agent._http.server
        for n, who in enumerate((None, "rogue"), 1):  # no client certificate; one from an unknown CA
            with pytest.raises(OSError) as info:  # TLS 1.3: in the handshake (URLError) or at the first read
                _get(agent.metrics_url, _client(pki, who))
            err = info.value.reason if isinstance(info.value, urllib.error.URLError) else info.value
            assert isinstance(err, (ssl.SSLError, ConnectionError)), info.value
            deadline = time.monotonic() + 5  # the server's thread counts it, maybe after the client saw the alert
            while server.failed_handshakes < n and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.failed_handshakes == n  # refused by the server in the handshake
        ctx = _client(pki, "client")
        assert parse_metrics(_get(agent.metrics_url, ctx)).value("sentinel_training_step", run="tls") == 7
        assert json.loads(_get(base + "api/status", ctx))["runs"][0]["run"] == "tls"
    finally:
        agent.stop()


def test_a_client_stalled_before_the_tls_handshake_does_not_block_others(tmp_path: Path, pki: Path) -> None:
    agent = _agent(tmp_path, pki)
    stalled = [socket.create_connection(("127.0.0.1", agent.metrics_port)) for _ in range(3)]
    try:
        t0 = time.monotonic()
        assert "sentinel_" in _get(agent.metrics_url, _client(pki))
        assert time.monotonic() - t0 < 2.0
    finally:
        for s in stalled:
            s.close()
        agent.stop()


def test_the_agent_process_serves_mutual_tls(start_agent: Callable[..., AgentProc], pki: Path) -> None:
    config = {
        "metrics": {
            "certfile": str(pki / "server.crt"),
            "keyfile": str(pki / "server.key"),
            "client_cafile": str(pki / "ca.crt"),
        }
    }
    proc = start_agent(config=config)
    assert proc.metrics_url.startswith("https://")
    with pytest.raises(OSError):
        _get(proc.metrics_url, _client(pki))
    assert "sentinel_agent" in _get(proc.metrics_url, _client(pki, "client"))


def test_client_cafile_is_validated(tmp_path: Path, pki: Path) -> None:
    tls = {"metrics.certfile": str(pki / "server.crt"), "metrics.keyfile": str(pki / "server.key")}
    with pytest.raises(ConfigError, match=r"^metrics.client_cafile: .* is not a file"):
        load_config(**tls, **{"metrics.client_cafile": str(tmp_path / "missing.crt")})
    with pytest.raises(ConfigError, match=r"^metrics.client_cafile: needs metrics.certfile"):
        load_config(**{"metrics.client_cafile": str(pki / "ca.crt")})
    assert load_config(**tls, **{"metrics.client_cafile": str(pki / "ca.crt")}).metrics.client_cafile.endswith("ca.crt")
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    with pytest.raises(AgentStartError, match="garbage.crt"):
        _agent(tmp_path, pki, client_cafile=str(garbage))


def test_a_remote_metrics_host_is_allowed_with_mutual_tls_only(tmp_path: Path, pki: Path) -> None:
    """Mutual TLS authenticates clients, so it needs no security.allow_insecure_remote; TLS alone does."""
    tls = {
        "metrics.host": "0.0.0.0",
        "metrics.certfile": str(pki / "server.crt"),
        "metrics.keyfile": str(pki / "server.key"),
    }
    with pytest.raises(ConfigError, match=r"^metrics.host: '0.0.0.0' is not a loopback address.*client_cafile"):
        load_config(**tls)
    with pytest.raises(ConfigError, match=r"^metrics.host:"):
        load_config(**{"metrics.host": "0.0.0.0"})
    cfg = load_config(**tls, **{"metrics.client_cafile": str(pki / "ca.crt")})
    assert cfg.metrics.host == "0.0.0.0" and cfg.security.allow_insecure_remote is False
    agent = _agent(tmp_path, pki, host="0.0.0.0", client_cafile=str(pki / "ca.crt"))
    try:
        assert agent.config.security.allow_insecure_remote is False
        url = f"https://127.0.0.1:{agent.metrics_port}/metrics"
        with pytest.raises(OSError):
            _get(url, _client(pki))
        assert "sentinel_agent" in _get(url, _client(pki, "client"))
    finally:
        agent.stop()
