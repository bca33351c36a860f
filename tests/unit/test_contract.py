"""sentinel_contract: the one action table both sides obey, the one endpoint rule, and the old names.

The trainer and the agent take their behaviour from the contract rather than from copies: a
changed entry of ``actions.TABLE`` changes what ``commands.decode`` accepts, the policy's
precedence and the trainer's checkpoint tainting together; an endpoint reads the same whether
the agent binds it or the trainer connects to it.
"""

from __future__ import annotations

import dataclasses

import pytest

from sentinel_contract import actions, channels, commands
from sentinel_contract.typedconfig import ConfigError


def test_the_wire_schema_the_policy_and_the_trainer_all_read_the_table() -> None:
    import agent.policy
    import sentinel.control

    assert agent.policy.STRENGTH is actions.STRENGTH and agent.policy.ACTIONS is actions.ACTIONS
    assert sentinel.control.CORRECTIVE is actions.CORRECTIVE
    assert commands.ACTIONS is actions.ACTIONS
    assert list(actions.ACTIONS) == [a.name for a in actions.TABLE]
    assert dict(actions.STRENGTH) == {a.name: a.strength for a in actions.TABLE}


def test_the_table_keeps_the_behaviour_it_replaced() -> None:
    """The values that were spelled in commands.ACTIONS, policy.STRENGTH and control.CORRECTIVE."""
    assert dict(actions.STRENGTH) == {"warn": 0, "eps_scale": 1, "lr_scale": 1, "skip_update": 2, "skip_batches": 3, "rollback": 4, "stop": 5}  # fmt: skip
    assert {"skip_update", "skip_batches", "rollback", "lr_scale", "eps_scale"} == actions.CORRECTIVE
    assert dict(actions.ACTIONS["rollback"]) == {"steps_back": (int, 0, 10_000_000), "skip": (int, 0, 10_000_000)}
    assert all(a.doc for a in actions.TABLE)


def test_decode_enforces_the_tables_bounds() -> None:
    for action in actions.TABLE:
        for name, (kind, lo, hi) in action.args.items():
            args = {arg: k(least) for arg, (k, least, _) in action.args.items()}
            ok = commands.Command("c1", "r", action.name, args).encode()
            assert commands.decode(ok).args == args
            too_big = {**args, name: kind(hi) + (1 if kind is int else hi)}
            too_small = {**args, name: lo - 1 if kind is int else lo / 10}
            for bad in (too_big, too_small):
                with pytest.raises(commands.CommandError, match=f"{action.name}.{name}="):
                    commands.decode(commands.Command("c2", "r", action.name, bad).encode())
    with pytest.raises(commands.CommandError, match="unknown_action"):
        commands.decode(commands.Command("c3", "r", "reboot", {}).encode())


def test_the_table_cannot_be_changed_at_run_time() -> None:
    with pytest.raises(TypeError):
        actions.ACTIONS["reboot"] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        actions.ACTIONS["warn"]["x"] = (int, 0, 1)  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        actions.TABLE[0].strength = 9  # type: ignore[misc]


def _check(endpoint: str, *, plain: bool = False, allow: bool = False, schemes=("tcp", "ipc")) -> str | None:
    return channels.check_endpoint(
        "x.endpoint", endpoint, plain=plain, allow_remote=allow, insecure_key="x.insecure",
        allow_key="x.allow_insecure_remote", risk="someone could listen", schemes=schemes,
    )  # fmt: skip


def test_one_endpoint_check_for_both_sides() -> None:
    assert _check("tcp://127.0.0.1:5557") == "127.0.0.1"
    assert _check("tcp://[::1]:*") == "[::1]"
    assert _check("ipc:///tmp/s") is None
    assert _check("inproc://x", schemes=("tcp", "ipc", "inproc")) is None
    with pytest.raises(ConfigError, match=r"^x.endpoint: 'inproc://x' is not allowed; allowed: tcp://HOST:PORT or ipc://PATH$"):  # fmt: skip
        _check("inproc://x")
    for bad in ("tcp://host", "tcp://h:99999", "tcp://h:abc", "ipc://", "udp://h:1", "127.0.0.1:5557"):
        with pytest.raises(ConfigError, match=r"^x.endpoint: .*allowed: tcp://HOST:PORT"):
            _check(bad)
    # off loopback without CURVE: refused, unless the network is declared trusted; with CURVE: fine
    with pytest.raises(ConfigError, match=r"not a loopback address and x.insecure is true; someone could listen"):
        _check("tcp://10.0.0.2:5557", plain=True)
    assert _check("tcp://10.0.0.2:5557", plain=True, allow=True) == "10.0.0.2"
    assert _check("tcp://10.0.0.2:5557") == "10.0.0.2"


def test_the_trainer_and_the_agent_apply_the_same_endpoint_rule() -> None:
    from agent.config import load_config as agent_config
    from sentinel.config import load_config as trainer_config

    for bad in ("tcp://127.0.0.1:99999", "tcp://127.0.0.1"):
        with pytest.raises(ConfigError, match=r"^publish.endpoint: .*allowed: tcp://HOST:PORT"):
            trainer_config({"publish": {"endpoint": bad}})
        with pytest.raises(ConfigError, match=r"^stats_endpoint: .*allowed: tcp://HOST:PORT"):
            agent_config(stats_endpoint=bad)
    remote = "tcp://10.0.0.2:5557"
    with pytest.raises(ConfigError, match="is not a loopback address"):
        trainer_config({"publish": {"endpoint": remote, "insecure": True}})
    with pytest.raises(ConfigError, match="is not a loopback address"):
        agent_config(stats_endpoint=remote, **{"security.insecure": True})


def test_a_curve_section_names_both_files_or_neither() -> None:
    channels.check_pair("c", channels.ClientCurve())
    channels.check_pair("c", channels.ClientCurve("s", "p"))
    with pytest.raises(ConfigError, match=r"^c.server_public_file: required, since c.secret_file is set"):
        channels.check_pair("c", channels.ClientCurve(secret_file="s"))
    with pytest.raises(ConfigError, match=r"^s.secret_file: required, since s.authorized_dir is set"):
        channels.check_pair("s", channels.ServerCurve(authorized_dir="d"))
    assert [f.name for f in dataclasses.fields(channels.ClientCurve)] == ["secret_file", "server_public_file"]
    assert [f.name for f in dataclasses.fields(channels.ServerCurve)] == ["secret_file", "authorized_dir"]


def test_agent_and_trainer_name_the_discovery_file_alike(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import autokeys
    from sentinel import discovery

    monkeypatch.setenv("SENTINEL_DISCOVERY_DIR", str(tmp_path))
    endpoint = "tcp://127.0.0.1:5557"
    written = autokeys.Discovery(None).directory / autokeys.discovery_name(endpoint)
    assert written == discovery.discovery_path(endpoint) == tmp_path / "tcp-127.0.0.1-5557.json"
    assert discovery.discovery_path("tcp://localhost:5557") == written


def test_old_names_still_import() -> None:
    import agent.commands
    import agent.config
    import agent.protocol
    import agent.spawn
    import agent.typedconfig
    import sentinel.config
    import sentinel_contract.agent_process
    import sentinel_contract.protocol
    import sentinel_contract.typedconfig
    from agent import protocol

    assert agent.protocol is protocol is sentinel_contract.protocol
    assert agent.commands is commands and agent.typedconfig is sentinel_contract.typedconfig
    assert agent.spawn.AgentProcess is sentinel_contract.agent_process.AgentProcess
    assert agent.config.is_loopback is channels.is_loopback and agent.config.bind_endpoint is channels.bind_endpoint
    assert agent.config.parse_tcp_endpoint is channels.parse_tcp_endpoint
    assert agent.config.CurveConfig is agent.config.StatsCurveConfig is channels.ServerCurve
    assert sentinel.config.PublishCurveConfig is sentinel.config.CurveConfig is channels.ClientCurve
    assert sentinel.config.ConfigError is ConfigError
