"""Agent configuration: defaults, YAML loading, cross-key checks, CLI error exits, docs in sync."""

from __future__ import annotations

import pytest

from agent import cli
from agent.config import AgentConfig, bind_endpoint, is_loopback, load_config
from agent.typedconfig import ConfigError, reference


def config_error(source=None, **overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source, **overrides)
    return str(info.value)


def test_defaults_match_the_documented_contract():
    cfg = load_config()
    assert cfg.stats_endpoint == "tcp://127.0.0.1:5557"
    assert (cfg.metrics.host, cfg.metrics.port, cfg.metrics.certfile, cfg.metrics.keyfile) == (
        "127.0.0.1",
        9477,
        None,
        None,
    )
    assert cfg.history.steps == 1024
    assert (cfg.limits.max_message_bytes, cfg.limits.max_series, cfg.limits.max_scalar_names) == (
        16 << 20,
        4096,
        64,
    )
    assert cfg.export.max_tensors_per_stat == 256
    assert cfg.security.allow_insecure_remote is False
    assert cfg.log_level == "info"


def test_every_option_is_documented_in_code():
    for key, _allowed, _default, doc in reference(AgentConfig):
        assert doc.strip(), f"{key} has no doc="


def test_yaml_file(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(
        "stats_endpoint: tcp://127.0.0.1:*\n"
        "metrics: {port: 0}\n"
        "history: {steps: 16}\n"
        "limits: {max_message_bytes: 65536, max_series: 2}\n"
        "export: {max_tensors_per_stat: 3}\n"
        "log_level: debug\n"
    )
    cfg = load_config(path)
    assert cfg.stats_endpoint == "tcp://127.0.0.1:*"
    assert (cfg.metrics.port, cfg.history.steps, cfg.limits.max_message_bytes) == (0, 16, 65536)
    assert (cfg.limits.max_series, cfg.export.max_tensors_per_stat, cfg.log_level) == (2, 3, "debug")


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("metrics:\n  prot: 1\n")
    msg = config_error(path)
    assert msg.startswith("metrics.prot: unknown key")
    assert "certfile, client_cafile, host, keyfile, port" in msg


@pytest.mark.parametrize("steps", [15, 1_000_001])
def test_history_steps_range(steps):
    msg = config_error({"history": {"steps": steps}})
    assert msg.startswith(f"history.steps: {steps} is out of range") and "[16, 1000000]" in msg


@pytest.mark.parametrize("steps", [16, 1_000_000])
def test_history_steps_bounds_are_inclusive(steps):
    assert load_config({"history": {"steps": steps}}).history.steps == steps


def test_log_level_choices():
    assert "one of 'debug', 'info', 'warning', 'error'" in config_error(log_level="verbose")


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://127.0.0.1:*", "tcp://127.0.0.1:0", "tcp://localhost:5557", "tcp://[::1]:*", "ipc:///tmp/s"],
)
def test_local_endpoints_are_accepted(endpoint):
    assert load_config(stats_endpoint=endpoint).stats_endpoint == endpoint


@pytest.mark.parametrize(
    "endpoint", ["127.0.0.1:5557", "tcp://127.0.0.1", "tcp://127.0.0.1:70000", "udp://x:1", "ipc://"]
)
def test_malformed_endpoints_are_rejected(endpoint):
    assert config_error(stats_endpoint=endpoint).startswith("stats_endpoint:")


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5557", "tcp://*:5557", "tcp://10.1.2.3:5557", "tcp://eth0:1"])
def test_remote_stats_endpoint_is_curve_or_needs_explicit_consent(endpoint):
    assert load_config(stats_endpoint=endpoint).stats_endpoint == endpoint  # the agent's own CURVE keys
    msg = config_error(stats_endpoint=endpoint, **{"security.insecure": True})
    assert msg.startswith("stats_endpoint:") and "security.allow_insecure_remote" in msg
    cfg = load_config(stats_endpoint=endpoint, **{"security.insecure": True, "security.allow_insecure_remote": True})
    assert cfg.stats_endpoint == endpoint


@pytest.mark.parametrize("host", ["0.0.0.0", "", "192.168.1.2", "::", "example.org"])
def test_remote_metrics_host_needs_explicit_consent(host):
    assert config_error(**{"metrics.host": host}).startswith("metrics.host:")
    load_config(**{"metrics.host": host, "security.allow_insecure_remote": True})


def test_loopback_detection():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "*", "::", "10.0.0.1", "lo", ""))


def test_port_zero_binds_as_wildcard():
    assert bind_endpoint("tcp://127.0.0.1:0") == "tcp://127.0.0.1:*"
    assert bind_endpoint("tcp://127.0.0.1:5557") == "tcp://127.0.0.1:5557"
    assert bind_endpoint("ipc:///tmp/x") == "ipc:///tmp/x"


def test_tls_needs_both_files():
    assert config_error(**{"metrics.certfile": "c.pem"}).startswith("metrics.keyfile:")
    assert config_error(**{"metrics.keyfile": "k.pem"}).startswith("metrics.certfile:")
    cfg = load_config(**{"metrics.certfile": "c.pem", "metrics.keyfile": "k.pem"})
    assert (cfg.metrics.certfile, cfg.metrics.keyfile) == ("c.pem", "k.pem")


# The CLI turns configuration errors into exit code 2 with a one-line message, no traceback.


def test_cli_config_error_exits_2_naming_the_key(tmp_path, capsys):
    path = tmp_path / "agent.yaml"
    path.write_text("history:\n  steps: 3\n")
    assert cli.main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "history.steps: 3 is out of range; allowed: int in [16, 1000000]" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_flag_is_validated_like_the_file(capsys):
    assert cli.main(["run", "--metrics-port", "70000"]) == 2
    assert "metrics.port: 70000 is out of range" in capsys.readouterr().err


def test_cli_unreadable_config_exits_2(tmp_path, capsys):
    assert cli.main(["run", "--config", str(tmp_path)]) == 2
    assert "configuration error" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["serve"], ["run", "--metrics-port", "many"], ["run", "--log-level", "loud"]])
def test_cli_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage: sentinel-agent" in capsys.readouterr().err


def test_cli_help_lists_exit_codes(capsys):
    for argv in (["--help"], ["run", "--help"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert "exit codes:" in out and "usage or configuration error" in out
