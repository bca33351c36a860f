"""Typed configuration: every error names the dotted key, the value and what is allowed."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from agent.typedconfig import ConfigError, load, merge, option, reference


@dataclass
class Inner:
    size: int = option(8, range=(1, 64), doc="a size")
    ratio: float = option(0.5, range=(0.0, 1.0), doc="a ratio")
    mode: str = option("fast", choices=("fast", "safe"), doc="a mode")
    path: str | None = option(None, doc="optional path")


@dataclass
class Outer:
    name: str = option("x", doc="a name")
    enabled: bool = option(True, doc="a switch")
    tags: list[str] = option(["a"], doc="some tags")
    inner: Inner = field(default_factory=Inner)


def error(source, **overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load(Outer, source, **overrides)
    return str(info.value)


def test_defaults():
    cfg = load(Outer)
    assert cfg == Outer()
    assert cfg.inner.size == 8 and cfg.tags == ["a"]


def test_list_default_is_not_shared():
    a, b = load(Outer), load(Outer)
    a.tags.append("b")
    assert b.tags == ["a"]


def test_range_error_names_dotted_key_value_and_range():
    msg = error({"inner": {"size": 100}})
    assert msg.startswith("inner.size: 100 is out of range")
    assert "int in [1, 64]" in msg


def test_type_error_names_key_value_and_type():
    msg = error({"inner": {"ratio": "high"}})
    assert "inner.ratio" in msg and "'high'" in msg and "float in [0.0, 1.0]" in msg


def test_choice_error_lists_choices():
    msg = error({"inner": {"mode": "turbo"}})
    assert "inner.mode" in msg and "'turbo'" in msg and "'fast', 'safe'" in msg


def test_unknown_key_lists_allowed_keys():
    msg = error({"inner": {"sise": 3}})
    assert msg.startswith("inner.sise: unknown key")
    assert "mode, path, ratio, size" in msg


def test_bool_is_not_an_int_and_int_is_not_a_bool():
    assert "inner.size" in error({"inner": {"size": True}})
    assert "enabled" in error({"enabled": 1})


def test_section_must_be_a_mapping():
    assert error({"inner": 3}).startswith("inner: 3 is not a mapping")


def test_list_items_are_checked():
    assert "tags[1]" in error({"tags": ["a", 2]})


def test_int_and_yaml_string_floats_are_accepted_for_float():
    assert load(Outer, {"inner": {"ratio": 1}}).inner.ratio == 1.0
    assert load(Outer, {"inner": {"ratio": "1e-1"}}).inner.ratio == pytest.approx(0.1)


def test_optional_accepts_null_and_value():
    assert load(Outer, {"inner": {"path": None}}).inner.path is None
    assert load(Outer, {"inner": {"path": "/x"}}).inner.path == "/x"


def test_overrides_with_dotted_keys_win_over_source():
    cfg = load(Outer, {"inner": {"size": 4, "mode": "safe"}}, **{"inner.size": 16, "name": "y"})
    assert (cfg.inner.size, cfg.inner.mode, cfg.name) == (16, "safe", "y")


def test_overrides_are_validated_too():
    assert error({}, **{"inner.size": 0}).startswith("inner.size: 0 is out of range")


def test_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: z\ninner:\n  size: 32\n  ratio: 1e-3\n")
    cfg = load(Outer, path)
    assert (cfg.name, cfg.inner.size, cfg.inner.ratio) == ("z", 32, 0.001)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(Outer, path)


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# nothing\n")
    assert load(Outer, path) == Outer()


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load(Outer, path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(Outer, tmp_path / "nope.yaml")


def test_required_key():
    @dataclass
    class Needs:
        must: int = field(metadata={"doc": "required"})

    with pytest.raises(ConfigError, match="must: required key is missing"):
        load(Needs, {})
    assert load(Needs, {"must": 3}).must == 3


def test_instance_passes_through_and_accepts_overrides():
    cfg = Outer(name="q")
    assert load(Outer, cfg) is cfg
    assert load(Outer, cfg, **{"inner.size": 2}).inner.size == 2


def test_merge_is_deep_and_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}}
    out = merge(base, {"a.b": 5, "d": 1})
    assert out == {"a": {"b": 5, "c": 2}, "d": 1}
    assert base == {"a": {"b": 1, "c": 2}}


def test_reference_rows():
    rows = {key: (allowed, default, doc) for key, allowed, default, doc in reference(Outer)}
    assert list(rows) == ["name", "enabled", "tags", "inner.size", "inner.ratio", "inner.mode", "inner.path"]
    assert rows["inner.size"] == ("int in [1, 64]", 8, "a size")
    assert rows["inner.path"][0] == "str or null"
    assert rows["inner.mode"][0] == "one of 'fast', 'safe'"


# Found while writing the agent config.


@pytest.mark.parametrize("value", ["nan", float("nan")])
def test_nan_is_out_of_any_range(value):
    error({"inner": {"ratio": value}})


def test_three_level_dotted_override():
    @dataclass
    class Top:
        outer: Outer = field(default_factory=Outer)

    assert load(Top, {}, **{"outer.inner.size": 3}).outer.inner.size == 3
